"""fork() safety: after a threaded fastnn call in the parent, a forked child (os.fork, a 'fork'
multiprocessing pool, a fork while another thread is inside a kernel) must run threaded fastnn calls.
Each scenario runs in a fresh interpreter with a timeout, so a hang fails the test instead of blocking."""
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import pkg_env

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")

_PRELUDE = textwrap.dedent("""
    import os, sys, threading, time, warnings
    import numpy as np
    import fastnn
    warnings.simplefilter("ignore", DeprecationWarning)  # Python >= 3.12 warns on fork with threads
    fastnn.set_num_threads(2)  # a real pool even on one core
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 512)).astype(np.float32)
    q = rng.standard_normal((2, 4, 256, 64)).astype(np.float32)
    expected = a.astype(np.float64) @ a.astype(np.float64)

    def threaded_calls():
        # matmul (the pool's ranges and phases), attention (items) and softmax (ranges): all split.
        ok = np.allclose(fastnn.matmul(a, a), expected, rtol=1e-3, atol=1e-2)
        o = fastnn.scaled_dot_product_attention(q, q, q, is_causal=True)
        ok = ok and bool(np.isfinite(o).all()) and fastnn.softmax(a).shape == a.shape
        return bool(ok)

    assert threaded_calls()  # the parent's pool is running

    def wait_child(pid, seconds=60):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        return "hung"
""")

_OS_FORK = _PRELUDE + textwrap.dedent("""
    pid = os.fork()
    if pid == 0:
        os._exit(0 if threaded_calls() and threaded_calls() else 1)
    code = wait_child(pid)
    assert code == 0, f"child: {code}"
    assert threaded_calls()  # and the parent's pool still works
    print("ok")
""")

_POOL = _PRELUDE + textwrap.dedent("""
    import multiprocessing as mp

    def job(i):
        return threaded_calls() and fastnn.get_num_threads() == 2

    with mp.get_context("fork").Pool(2) as pool:
        results = pool.map_async(job, range(6)).get(timeout=60)
    assert all(results), results
    print("ok")
""")

_FORK_DURING_CALL = _PRELUDE + textwrap.dedent("""
    stop = threading.Event()
    calls = [0]

    def busy():
        big = rng.standard_normal((768, 768)).astype(np.float32)
        while not stop.is_set():
            fastnn.matmul(big, big)  # releases the GIL: the fork lands inside it most of the time
            calls[0] += 1

    t = threading.Thread(target=busy)
    t.start()
    try:
        while calls[0] == 0:
            time.sleep(0.001)
        for i in range(8):
            time.sleep(0.003 * i)
            pid = os.fork()
            if pid == 0:
                os._exit(0 if threaded_calls() else 1)
            code = wait_child(pid)
            assert code == 0, f"fork {i}: child {code}"
    finally:
        stop.set()
        t.join()
    assert threaded_calls()
    print("ok")
""")


def run_script(code, timeout=180):
    # cwd: not the repository root, whose fastnn/ (the sources) would shadow the installed package.
    try:
        r = subprocess.run([sys.executable, "-c", code], env=pkg_env(), capture_output=True, text=True,
                           timeout=timeout, cwd=os.path.dirname(os.path.abspath(__file__)))
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hung for {timeout} s\nstdout:\n{e.stdout}\nstderr:\n{e.stderr}")
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (
        f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")


def test_os_fork_after_threaded_call():
    run_script(_OS_FORK)


def test_fork_pool_after_threaded_call():
    run_script(_POOL)


def test_fork_while_another_thread_is_in_a_call():
    run_script(_FORK_DURING_CALL)
