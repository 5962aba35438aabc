"""Thread-pool interplay: fastnn (its own pool), NumPy (OpenBLAS, its own threads) and PyTorch (its bundled
OpenMP runtime) imported in either order and used together in one process, each in a fresh interpreter so
the import order is real. threadpoolctl must see and limit fastnn's pool."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import fastnn

try:
    import importlib.util
    HAVE_TORCH = importlib.util.find_spec("torch") is not None
except ValueError:
    HAVE_TORCH = False

# Run in a fresh interpreter: imports `modules` in that order, then uses every one of them, alone and
# interleaved from two Python threads (fastnn and torch both release the GIL), with 2 threads each so
# every thread pool really starts. Prints a JSON report on its last line.
_SCRIPT = textwrap.dedent("""
    import importlib, json, sys
    from concurrent.futures import ThreadPoolExecutor
    mods = {name: importlib.import_module(name) for name in sys.argv[1].split(",")}
    import numpy as np
    import fastnn
    torch = mods.get("torch")
    fastnn.set_num_threads(2)
    if torch is not None:
        torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((96, 80)); b = rng.standard_normal((80, 72))
    ref = a @ b  # NumPy / OpenBLAS

    def rel(x):
        return float(np.linalg.norm(np.asarray(x, np.float64) - ref) / np.linalg.norm(ref))

    def use_fastnn():
        return rel(fastnn.matmul(a, b))

    def use_torch():
        return rel(torch.from_numpy(a) @ torch.from_numpy(b))

    def use_numpy():
        return rel(np.dot(a, b))

    errors = {"fastnn": use_fastnn(), "numpy": use_numpy()}
    if torch is not None:
        errors["torch"] = use_torch()
        # torch's softmax and fastnn's on the same data, fastnn output fed back into torch.
        x = rng.standard_normal((64, 33)).astype(np.float32)
        errors["softmax"] = float(abs(fastnn.softmax(x) - torch.softmax(torch.from_numpy(x), -1).numpy()).max())
    calls = [use_fastnn, use_numpy] + ([use_torch] if torch is not None else [])
    with ThreadPoolExecutor(max_workers=2) as pool:
        interleaved = list(pool.map(lambda f: f(), calls * 8))
    errors["interleaved"] = max(interleaved)
    errors["fastnn_after"] = use_fastnn()
    print(json.dumps({"errors": errors, "modules": sorted(sys.modules.keys() & {"torch", "numpy", "fastnn"})}))
""")


def run_fresh(*args, code=_SCRIPT, env_extra=None):
    """Runs code in a fresh interpreter that imports the same fastnn as this process."""
    env = dict(os.environ)
    env.update(env_extra or {})
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(fastnn.__file__)))
    env["PYTHONPATH"] = pkg_parent + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.abspath(__file__)))


def check_report(r):
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    report = json.loads(r.stdout.strip().splitlines()[-1])
    for name, err in report["errors"].items():
        assert err < 1e-5, f"{name}: relative error {err:.3e}"
    return report


@pytest.mark.parametrize("order", ["numpy,fastnn", "fastnn,numpy"])
def test_numpy_and_fastnn_in_either_order(order):
    report = check_report(run_fresh(order))
    assert report["modules"] == ["fastnn", "numpy"]


@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed")
@pytest.mark.parametrize("order", ["numpy,fastnn,torch", "torch,fastnn,numpy", "fastnn,torch,numpy",
                                   "torch,numpy,fastnn"])
def test_torch_numpy_fastnn_in_any_order(order):
    report = check_report(run_fresh(order))
    assert report["modules"] == ["fastnn", "numpy", "torch"]
    assert set(report["errors"]) >= {"fastnn", "numpy", "torch", "softmax", "interleaved"}


# threadpoolctl imported after fastnn (the registration hook) or before it (registered at import).
_THREADPOOLS = textwrap.dedent("""
    import json, os, sys
    if sys.argv[1] == "threadpoolctl_first":
        import threadpoolctl
    import numpy as np
    import fastnn
    from threadpoolctl import threadpool_info, threadpool_limits
    fastnn.set_num_threads(3)
    a = np.arange(64.0 * 64).reshape(64, 64) / 4096
    fastnn.matmul(a, a)
    pools = threadpool_info()
    seen = {}
    with threadpool_limits(limits=1):
        seen["limits_1"] = fastnn.get_num_threads()
        ok = bool(np.allclose(fastnn.matmul(a, a), a @ a))
    seen["after"] = fastnn.get_num_threads()
    with threadpool_limits(limits=2, user_api="openmp"):
        seen["openmp_2"] = fastnn.get_num_threads()
    with threadpool_limits(limits=1, user_api="blas"):
        seen["blas_1"] = fastnn.get_num_threads()
    print(json.dumps({"pools": pools, "seen": seen, "ok_under_limit": ok,
                      "module": os.path.realpath(fastnn._C.__file__), "loaded": open("/proc/self/maps").read()}))
""")


@pytest.mark.parametrize("order", ["fastnn_first", "threadpoolctl_first"])
def test_threadpoolctl_sees_and_limits_fastnn(order):
    """threadpool_info() lists fastnn's pool (user_api "openmp", internal_api "fastnn"); threadpool_limits
    with no user_api or with user_api="openmp" limits it and restores it; a BLAS limit leaves it alone."""
    pytest.importorskip("threadpoolctl")
    r = run_fresh(order, code=_THREADPOOLS)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    ours = [p for p in report["pools"] if p["internal_api"] == "fastnn"]
    assert len(ours) == 1, f"threadpoolctl does not list fastnn's pool once: {report['pools']}"
    assert ours[0]["user_api"] == "openmp" and ours[0]["num_threads"] == 3, ours
    assert os.path.realpath(ours[0]["filepath"]) == report["module"], ours
    assert report["seen"] == {"limits_1": 1, "after": 3, "openmp_2": 2, "blas_1": 3}, report["seen"]
    assert report["ok_under_limit"]


def test_no_openmp_runtime_loaded():
    """fastnn runs on its own pool: importing it (with NumPy) loads no OpenMP runtime, so a process with
    PyTorch holds PyTorch's alone; info() describes the pool."""
    pytest.importorskip("threadpoolctl")
    r = run_fresh("fastnn_first", code=_THREADPOOLS)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    runtimes = {os.path.basename(line.split()[-1]) for line in report["loaded"].splitlines()
                if any(name in line for name in ("libgomp", "libomp", "libiomp"))}
    assert not runtimes, f"an OpenMP runtime was loaded: {runtimes}"
    assert "fastnn" in fastnn.info()["thread_pool"]
