"""What the GPU tests of every op file share: whether a GPU is usable (else the reason every GPU test skips
with), cupy (None without a GPU), the float32 / float16 tolerances, and the check against the float64
oracle. The fixtures `variant` (fast, then plain kernels) and `poisoned_pool` are in conftest.py.
`python -m pytest -m gpu` runs every GPU test (bench/gpu_check.sh lists the files)."""
import importlib

import numpy as np
import pytest

import fastnn
from fastnn import _gpu


def _skip_reason():
    try:
        importlib.import_module("cupy")
    except ImportError:
        return "no cupy"
    if _gpu.cuda_module() is None:
        return "fastnn built without CUDA"
    reason = _gpu.unavailable_reason()
    if reason is not None:
        return f"no CUDA device ({reason})"
    if not fastnn.cuda_is_available():
        return "the current CUDA device is not covered by the compiled architectures"
    return None


GPU_REASON = _skip_reason()
if GPU_REASON is None:
    import cupy as cp
else:
    cp = None

GPU_DTYPES = [np.float32, np.float16]
GPU_TOL = {np.float32: 1e-5, np.float16: 2e-3}


def needs_gpu(test):
    """Marks a GPU test: marker `gpu`, skipped with the reason without a usable GPU, run with cupy's memory
    pool poisoned (outputs a kernel forgets to write stay NaN)."""
    test = pytest.mark.usefixtures("poisoned_pool")(test)
    test = pytest.mark.skipif(GPU_REASON is not None, reason=f"GPU tests skipped: {GPU_REASON}")(test)
    return pytest.mark.gpu(test)


def rand(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def gpu(a):
    return cp.asarray(a)


def gpu_check(got, want, dtype, tol=None, scale=0.0):
    """got (GPU or host) matches the float64 oracle: shape, dtype, NaN and +-inf positions, relative-norm
    error (over the norm of `want`, or `scale` when larger)."""
    got = cp.asnumpy(got) if isinstance(got, cp.ndarray) else np.asarray(got)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    assert got.dtype == np.dtype(dtype), f"dtype {got.dtype} != {np.dtype(dtype)}"
    g = got.astype(np.float64)
    assert np.array_equal(np.isnan(g), np.isnan(want)), \
        f"NaN positions differ: {np.argwhere(np.isnan(g) != np.isnan(want))[:5].tolist()}"
    assert np.array_equal(np.isposinf(g), np.isposinf(want)) and np.array_equal(np.isneginf(g), np.isneginf(want))
    fin = np.isfinite(want)
    err = np.linalg.norm(g[fin] - want[fin]) / max(np.linalg.norm(want[fin]), scale, 1e-300)
    bound = GPU_TOL[dtype] if tol is None else tol
    assert err <= bound, f"relative error {err:.3e} > {bound:.1e} ({np.dtype(dtype)})"


def attn_inputs(rng, dtype, batch, L, S, E, Ev, hk=None):
    """query (batch, L, E), key (kb, S, E), value (kb, S, Ev); kb is batch with hk heads last when given (GQA)."""
    kb = batch[:-1] + (hk,) if hk else batch
    q = rand(rng, batch + (L, E), dtype)
    k = rand(rng, kb + (S, E), dtype)
    v = rand(rng, kb + (S, Ev), dtype)
    return q, k, v
