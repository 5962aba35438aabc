"""OpenMP interplay: fastnn (its own OpenMP runtime; the wheel bundles libgomp), NumPy (OpenBLAS, its own
threads) and PyTorch (its own bundled OpenMP runtime) imported in either order and used together in one
process, each in a fresh interpreter so the import order is real. threadpoolctl must see fastnn's pool."""
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
# every OpenMP / BLAS pool really starts. Prints a JSON report on its last line.
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


_THREADPOOLS = textwrap.dedent("""
    import json
    import numpy as np
    import fastnn
    from threadpoolctl import threadpool_info, threadpool_limits
    fastnn.set_num_threads(2)
    a = np.arange(64.0 * 64).reshape(64, 64) / 4096
    fastnn.matmul(a, a)
    info = threadpool_info()
    with threadpool_limits(limits=1, user_api="openmp"):
        ok = bool(np.allclose(fastnn.matmul(a, a), a @ a))
    print(json.dumps({"pools": info, "ok_under_limit": ok, "fastnn_dir": fastnn.__path__[0]}))
""")


def test_threadpoolctl_sees_fastnn_openmp_pool():
    pytest.importorskip("threadpoolctl")
    if fastnn.info()["openmp"] is None:
        pytest.skip("this fastnn was built without OpenMP")
    r = run_fresh(code=_THREADPOOLS)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    openmp = [p for p in report["pools"] if p["user_api"] == "openmp"]
    # Only fastnn was imported (NumPy's OpenBLAS has its own pthreads pool, user_api "blas"), so every
    # OpenMP runtime threadpoolctl finds was loaded for fastnn._C.
    assert openmp, f"threadpoolctl lists no OpenMP runtime after importing fastnn: {report['pools']}"
    assert report["ok_under_limit"]
    libs_dir = report["fastnn_dir"] + ".libs"  # where auditwheel puts the bundled libgomp
    if os.path.isdir(libs_dir):
        bundled = [p for p in openmp if os.path.dirname(os.path.realpath(p["filepath"])) == os.path.realpath(libs_dir)]
        assert bundled, f"the wheel bundles {os.listdir(libs_dir)} but the OpenMP pool found is {openmp}"


def test_info_names_the_openmp_runtime():
    """fastnn.info() says which OpenMP runtime library the kernels run on (the bundled libgomp in a wheel)."""
    info = fastnn.info()
    if info["openmp"] is None:
        pytest.skip("this fastnn was built without OpenMP")
    runtime = info.get("openmp_runtime")
    assert runtime, f"fastnn.info() has no openmp_runtime: {info}"
    assert os.path.isfile(runtime), runtime
    assert "omp" in os.path.basename(runtime), runtime
