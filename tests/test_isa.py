"""ISA selection through the environment, in a fresh interpreter (the core correctness tests of each op
take the `isa` fixture from conftest.py and run under every path this CPU supports)."""
import os
import subprocess
import sys

import pytest

from conftest import supported_isas


def run_fresh(env_value, code="import fastnn; print(fastnn.cpu_isa())"):
    env = dict(os.environ)
    env["FASTNN_CPU_ISA"] = env_value
    # Run from a neutral directory so the fresh interpreter imports the same fastnn as this one.
    import fastnn
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(fastnn.__file__)))
    env["PYTHONPATH"] = pkg_parent + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, cwd=os.path.dirname(os.path.abspath(__file__)))


def test_env_forces_generic():
    r = run_fresh("generic")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "generic"


@pytest.mark.parametrize("name", ["generic", "avx2", "avx512", "avx512bf16"])
def test_env_forces_each_supported_isa(name):
    if name not in supported_isas():
        pytest.skip(f"{name} not usable on this CPU")
    code = ("import numpy as np, fastnn\n"
            "a = np.arange(12.0).reshape(3, 4); b = np.ones((4, 2))\n"
            "assert np.array_equal(fastnn.matmul(a, b), a @ b)\n"
            "print(fastnn.cpu_isa())")
    r = run_fresh(name, code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == name


def test_env_unknown_isa_is_clear():
    # Documented choice: an unavailable request warns (a RuntimeWarning naming the variable and the value)
    # and keeps the best path; never a crash or a silent change.
    r = run_fresh("bogus", "import fastnn; print(fastnn.cpu_isa())")
    assert r.returncode == 0, r.stderr
    assert "RuntimeWarning" in r.stderr and "FASTNN_CPU_ISA='bogus'" in r.stderr, r.stderr
    assert r.stdout.strip().splitlines()[-1] == supported_isas()[-1]
