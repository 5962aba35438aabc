"""Shared test helpers: tolerance check against float64 oracles, array layouts, ISA and thread fixtures, the
GPU tests' kernel-variant and poisoned-pool fixtures (the rest of their helpers: gpu_helpers.py)."""
import os

import numpy as np
import pytest

import fastnn

DTYPES = [np.float32, np.float64]
# Layouts a kernel must treat identically: C order, Fortran order, a transpose,
# a step-2 slice on every axis and a reversed (negative-stride) view.
LAYOUTS = ["C", "F", "T", "step", "neg"]


def tolerance(dtype, k=1):
    """Relative-norm bound for a result whose entries each reduce over k terms."""
    k = max(int(k), 1)
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return 2e-6 * np.sqrt(k) + 1e-6
    if dtype.itemsize == 2:
        # float16 / bfloat16 results are float32 computations (every sum in float32: the float32 bound
        # above) rounded once to the dtype: relative error u = 2^-11 (float16, 11 significant bits) or
        # 2^-8 (bfloat16, 8). The float64 oracle's result is rounded too, and where the two straddle a
        # rounding boundary they differ by one ulp, up to 2u relative: so 2u plus the float32 bound.
        u = 2.0 ** -11 if dtype == np.float16 else 2.0 ** -8
        return 2 * u + 2e-6 * np.sqrt(k) + 1e-6
    return 1e-13 * np.sqrt(k) + 1e-14


def assert_close(got, ref, dtype, k=1, check_dtype=True, scale=0.0):
    """got matches the float64 oracle ref: same shape (and dtype), same NaN and
    signed-inf positions, and ||got - ref|| / max(||ref||, scale) within
    tolerance(dtype, k) over the finite entries. `scale` is the norm of the terms
    the result is made of, for results that cancel (see softmax_backward_scale)."""
    assert isinstance(got, np.ndarray) or not check_dtype, f"expected an ndarray, got {type(got)}"
    got = np.asarray(got)
    ref = np.asarray(ref)
    assert got.shape == ref.shape, f"shape {got.shape} != expected {ref.shape}"
    if check_dtype:
        assert got.dtype == np.dtype(dtype), f"dtype {got.dtype} != expected {np.dtype(dtype)}"
    nan_got, nan_ref = np.isnan(got), np.isnan(ref)
    assert np.array_equal(nan_got, nan_ref), (
        f"NaN positions differ: {np.argwhere(nan_got != nan_ref)[:5].tolist()} (first 5)")
    for inf in (np.isposinf, np.isneginf):
        assert np.array_equal(inf(got), inf(ref)), (
            f"{inf.__name__} positions differ: {np.argwhere(inf(got) != inf(ref))[:5].tolist()}")
    finite = np.isfinite(ref)
    g = got[finite].astype(np.float64)
    r = ref[finite].astype(np.float64)
    err = np.linalg.norm(g - r) / max(np.linalg.norm(r), scale, np.finfo(np.float64).tiny)
    tol = tolerance(dtype, k)
    assert err <= tol, f"relative error {err:.3e} > {tol:.3e} (dtype {np.dtype(dtype)}, k={k})"


def softmax_backward_scale(grad_output, output, axis=-1):
    """Norm of the terms in y * (g - sum(g * y)): when y is peaked the result cancels to far below them,
    and a same-precision computation is only accurate relative to these terms."""
    g, y = np.abs(f64(grad_output)), np.abs(f64(output))
    terms = y * (g + np.sum(g * y, axis=axis, keepdims=True))
    return float(np.linalg.norm(terms[np.isfinite(terms)]))


def f64(*arrays):
    """float64 copies of the inputs, for the oracle."""
    out = tuple(None if a is None else np.array(a, dtype=np.float64) for a in arrays)
    return out[0] if len(out) == 1 else out


def make_array(rng, shape, dtype, layout="C", scale=1.0):
    """Random normal array of logical `shape` stored in the given layout."""
    shape = tuple(shape)
    if layout == "C":
        return np.ascontiguousarray((rng.standard_normal(shape) * scale).astype(dtype))
    if layout == "F":
        return np.asfortranarray(make_array(rng, shape, dtype, "C", scale))
    if layout == "T":
        return make_array(rng, shape[::-1], dtype, "C", scale).T
    if layout == "step":
        base = make_array(rng, tuple(2 * n for n in shape), dtype, "C", scale)
        return base[(slice(None, None, 2),) * len(shape)]
    if layout == "neg":
        return make_array(rng, shape, dtype, "C", scale)[(slice(None, None, -1),) * len(shape)]
    raise ValueError(layout)


class Unchanged:
    """Snapshot of input arrays; .check() asserts none was modified."""

    def __init__(self, *arrays):
        self.arrays = [a for a in arrays if isinstance(a, np.ndarray)]
        self.copies = [a.copy() for a in self.arrays]

    def check(self):
        for i, (a, c) in enumerate(zip(self.arrays, self.copies)):
            assert np.array_equal(a, c, equal_nan=True), f"input #{i} was modified"


def poisoned(shape, dtype):
    """An out= buffer full of NaN, so any element the kernel forgets to write fails."""
    return np.full(shape, np.nan, dtype=dtype)


def supported_isas():
    names = fastnn.info()["cpu_isa_supported"]
    if isinstance(names, str):
        names = [n for n in names.split(",") if n]
    return list(names)


def pytest_generate_tests(metafunc):
    # A test that takes the `isa` fixture runs once per ISA path this CPU supports.
    if "isa" in metafunc.fixturenames:
        metafunc.parametrize("isa", supported_isas(), indirect=True)


@pytest.fixture
def isa(request):
    """Switches the kernel table to request.param for one test, then restores it."""
    old = fastnn.cpu_isa()
    fastnn.set_cpu_isa(request.param)
    assert fastnn.cpu_isa() == request.param
    try:
        yield request.param
    finally:
        fastnn.set_cpu_isa(old)


@pytest.fixture
def restore_threads():
    n = fastnn.get_num_threads()
    try:
        yield n
    finally:
        fastnn.set_num_threads(n)


@pytest.fixture
def rng(request):
    """A generator seeded from the test id, so each test is reproducible."""
    seed = sum(ord(ch) * (i + 1) for i, ch in enumerate(request.node.nodeid)) % (2**32)
    return np.random.default_rng(seed)


@pytest.fixture(params=["fast", "plain"])
def variant(request):
    """GPU tests: runs a test with the fast kernels, then with the plain reference kernels."""
    from fastnn import _gpu
    with _gpu.plain_kernels(request.param == "plain"):
        yield request.param


@pytest.fixture
def poisoned_pool():
    """GPU tests: fills cupy's memory pool with NaN bytes before the test, so outputs the kernels allocate
    start as NaN and any element a kernel forgets to write fails the comparison; frees it after."""
    from gpu_helpers import cp
    if cp is None:
        yield
        return
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    junk = cp.full(64 << 20, 0xFF, dtype=cp.uint8)  # 0xFFFF / 0xFFFFFFFF are NaN in float16 / float32
    del junk
    yield
    cp.cuda.Device().synchronize()
    pool.free_all_blocks()


def pkg_env():
    """The environment for a child Python process that imports the fastnn these tests import."""
    env = dict(os.environ)
    parent = os.path.dirname(os.path.dirname(os.path.abspath(fastnn.__file__)))
    env["PYTHONPATH"] = parent + os.pathsep + env.get("PYTHONPATH", "")
    return env
