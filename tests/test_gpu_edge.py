"""GPU edge cases: NaN / inf inputs, the grid-stride loops past the grid caps, more than 2**31 elements,
out-of-bounds writes (outputs inside a guard band), stream ordering, misaligned contiguous inputs, and the
attention lse (float32, with masks and fully masked rows). Each case against the float64 oracle.

Without a usable GPU every test skips and says why. The large cases need about 10 GiB of GPU memory
(they skip, saying so, on a smaller card).
"""
import math

import numpy as np
import pytest

import fastnn
from fastnn import _gpu
from fastnn import reference as ref
from gpu_helpers import GPU_DTYPES, GPU_TOL, cp, gpu, needs_gpu, rand
from gpu_helpers import gpu_check as check

pytestmark = pytest.mark.gpu


DTYPES, TOL = GPU_DTYPES, GPU_TOL
# lse is float32 for both dtypes: float16 inputs give it to float32 accuracy (a float16 lse would be off by
# up to 2**-11 relative, over this bound).
LSE_TOL = {np.float32: 1e-5, np.float16: 1e-4}


def f64(a):
    return None if a is None else np.asarray(a, np.float64)


def need_gpu_memory(gib):
    free = cp.cuda.Device().mem_info[0]
    if free < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory, {free / 2**30:.1f} GiB free")


def sdpa_both(q, k, v, **kw):
    """(out, lse) from fastnn on the GPU and from the oracle, for host arrays q, k, v (and attn_mask)."""
    mask = kw.pop("attn_mask", None)
    out, lse = fastnn.scaled_dot_product_attention(gpu(q), gpu(k), gpu(v), return_lse=True,
                                                   attn_mask=None if mask is None else gpu(mask), **kw)
    m64 = mask if mask is None or mask.dtype == np.bool_ else f64(mask)
    with np.errstate(invalid="ignore"):
        want, want_lse = ref.scaled_dot_product_attention(f64(q), f64(k), f64(v), attn_mask=m64, return_lse=True,
                                                          **kw)
    return out, lse, want, want_lse


# ---- NaN and inf inputs ---------------------------------------------------------------------------------

@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["nan_q", "nan_q_causal", "nan_mask_row", "nan_only_allowed", "inf_k"])
def test_sdpa_nan_and_inf(rng, variant, dtype, case):
    """A row whose allowed scores are all NaN is NaN, out and lse (not zeros / -inf as a row with no allowed
    key); a fully masked row stays zeros with lse -inf; +inf scores make their rows NaN, -inf ones drop out."""
    B, H, L, S, E = 2, 2, 70, 97, 32
    q, k, v = rand(rng, (B, H, L, E), dtype), rand(rng, (B, H, S, E), dtype), rand(rng, (B, H, S, E), dtype)
    kw = {}
    if case in ("nan_q", "nan_q_causal"):
        q[0, 1, 5, 3] = np.nan                 # every score of that row is NaN
        q[1, 0, 0, 0] = np.nan                 # causal: row 0 has one allowed key, and its score is NaN
        kw["is_causal"] = case == "nan_q_causal"
    elif case == "nan_mask_row":
        mask = rand(rng, (L, S), dtype)
        mask[7] = np.nan                       # a float mask row of NaN
        mask[3] = -np.inf                      # a fully masked row
        kw["attn_mask"] = mask
    elif case == "nan_only_allowed":
        mask = np.zeros((B, 1, L, S), dtype)
        mask[:, :, 9] = -np.inf                # row 9: every key masked but one, whose mask is NaN
        mask[:, :, 9, 80] = np.nan
        mask[:, :, 11] = -np.inf               # row 11: fully masked
        kw["attn_mask"] = mask
    else:
        k[1, 0, 10, 2] = np.inf                # key 10 of one head scores +-inf against every query
        k[0, 1, 90, 0] = -np.inf
    out, lse, want, want_lse = sdpa_both(q, k, v, **kw)
    assert np.isnan(want).any()
    check(out, want, dtype)
    assert lse.dtype == np.float32
    check(lse, want_lse, np.float32, tol=LSE_TOL[dtype])


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", [{}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "decoupled_weight_decay": True},
                                  {"maximize": True}], ids=str)
def test_adam_nan_and_inf(rng, variant, dtype, opts):
    n = 1003
    p, g = rand(rng, n, dtype), rand(rng, n, dtype)
    g[5], g[17], g[100] = np.nan, np.inf, -np.inf
    p[200], p[300] = np.nan, np.inf
    gp, gm, gv = gpu(p), cp.zeros(n, cp.float32), cp.zeros(n, cp.float32)
    rp, rm, rv = f64(p), np.zeros(n), np.zeros(n)
    with np.errstate(invalid="ignore", over="ignore"):
        for step in (1, 2):
            fastnn.adam_update(gp, gpu(g), gm, gv, step=step, lr=1e-2, **opts)
            ref.adam_update(rp, f64(g), rm, rv, step=step, lr=1e-2, **opts)
    assert np.isnan(rp).any()
    check(gp, rp, dtype)
    check(gm, rm, np.float32, tol=TOL[dtype])
    check(gv, rv, np.float32, tol=TOL[dtype])


@needs_gpu
@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_adam_rejects_non_finite_hyperparameters(value):
    """As on the CPU: lr, eps and weight_decay must be finite (an infinite lr would write NaN everywhere)."""
    p = gpu(np.zeros(8, np.float32))
    for name in ("lr", "eps", "weight_decay"):
        with pytest.raises(ValueError, match=name):
            fastnn.adam_update(p, p.copy(), cp.zeros(8, cp.float32), cp.zeros(8, cp.float32), step=1,
                               **{name: value})
        with pytest.raises(ValueError, match=name):   # the CPU function says the same
            q = np.zeros(8, np.float32)
            fastnn.adam_update(q, q.copy(), np.zeros(8, np.float32), np.zeros(8, np.float32), step=1,
                               **{name: value})


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 45, 29), (130, 97, 71), (3, 129, 65, 130)], ids=str)
def test_matmul_nan_and_inf(rng, variant, dtype, shape):
    bshape, (M, K, N) = shape[:-3], shape[-3:]
    a, b = rand(rng, bshape + (M, K), dtype), rand(rng, (K, N), dtype)
    a[..., 3, 5] = np.nan       # row 3 of the product: NaN
    a[..., 10, 7] = np.inf      # row 10: +-inf (NaN where it meets column 4's -inf with the other sign)
    b[2, 4] = -np.inf           # column 4: +-inf
    b[K - 1, N - 1] = np.nan    # the last column (a tile edge): NaN
    with np.errstate(invalid="ignore"):
        want = np.matmul(f64(a), f64(b))
    check(fastnn.matmul(gpu(a), gpu(b)), want, dtype)


# ---- grid caps: the grid-stride loops -----------------------------------------------------------------------

@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_batch_over_the_grid_limit(rng, variant, dtype):
    """More than 65,535 batch entries: the z dimension of the grid is capped, the kernels loop over the rest."""
    nb = 70000
    a, b = rand(rng, (nb, 3, 5), dtype), rand(rng, (nb, 5, 2), dtype)
    check(fastnn.matmul(gpu(a), gpu(b)), np.matmul(f64(a), f64(b)), dtype)
    w = rand(rng, (5, 4), dtype)                        # one matrix broadcast over the batch
    check(fastnn.matmul(gpu(a), gpu(w)), np.matmul(f64(a), f64(w)), dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_tiles_over_the_grid_limit(rng, variant, dtype, causal):
    """66,000 (batch, query tile) pairs (and 132,000 rows for the plain kernel): past the 65,536-block cap."""
    nb, L, S, E = 66000, 2, 5, 8
    q, k, v = rand(rng, (nb, L, E), dtype), rand(rng, (nb, S, E), dtype), rand(rng, (nb, S, E), dtype)
    out, lse, want, want_lse = sdpa_both(q, k, v, is_causal=causal)
    check(out, want, dtype)
    check(lse, want_lse, np.float32, tol=LSE_TOL[dtype])


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_beyond_the_grid_cap(variant, dtype):
    """relu, relu_backward over more than 2**24 16-byte vectors (the grid holds 65,536 x 256 threads), with
    a tail that is not a whole vector; every element checked on the GPU."""
    need_gpu_memory(3)
    n = (1 << 24) * (16 // np.dtype(dtype).itemsize) + 3 * 8 + 5
    r = cp.random.default_rng(1)
    x = r.standard_normal(n, dtype=cp.float32).astype(dtype)
    g = r.standard_normal(n, dtype=cp.float32).astype(dtype)
    y = fastnn.relu(x)
    assert bool(cp.array_equal(y, cp.where(x > 0, x, cp.zeros((), dtype))))
    d = fastnn.relu_backward(g, x)
    assert bool(cp.array_equal(d, cp.where(x > 0, g, cp.zeros((), dtype))))


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_beyond_the_grid_cap(rng, variant, dtype):
    """adam_update over 2**26 + 7 parameters (past the grid cap in 4-element vectors); the head and the tail
    checked against the oracle."""
    need_gpu_memory(3)
    n = (1 << 26) + 7
    r = cp.random.default_rng(2)
    p = r.standard_normal(n, dtype=cp.float32).astype(dtype)
    g = r.standard_normal(n, dtype=cp.float32).astype(dtype)
    m, v = cp.zeros(n, cp.float32), cp.zeros(n, cp.float32)
    parts = [slice(0, 1000), slice(n - 100003, n)]
    host = [(f64(cp.asnumpy(p[s])), f64(cp.asnumpy(g[s])), np.zeros(s.stop - s.start), np.zeros(s.stop - s.start))
            for s in parts]
    fastnn.adam_update(p, g, m, v, step=1, lr=1e-2, weight_decay=0.1)
    for s, (rp, rg, rm, rv) in zip(parts, host):
        ref.adam_update(rp, rg, rm, rv, step=1, lr=1e-2, weight_decay=0.1)
        check(p[s], rp, dtype)
        check(m[s], rm, np.float32, tol=TOL[dtype])


@needs_gpu
@pytest.mark.slow
def test_relu_over_2_31_elements(variant):
    """A float16 relu of 2**31 + 9 elements (4 GiB): 64-bit indexing everywhere, out of place then in place."""
    need_gpu_memory(10)
    n = (1 << 31) + 9
    chunk = 1 << 28
    r = cp.random.default_rng(3)
    x = cp.empty(n, cp.float16)
    for i in range(0, n, chunk):
        x[i:i + chunk] = r.standard_normal(min(chunk, n - i), dtype=cp.float32).astype(cp.float16)
    x[(1 << 31) - 1], x[1 << 31], x[n - 1] = 5.0, -3.0, 7.0
    y = fastnn.relu(x)
    assert (float(y[(1 << 31) - 1]), float(y[1 << 31]), float(y[n - 1])) == (5.0, 0.0, 7.0)
    for i in range(0, n, chunk):
        assert bool(cp.array_equal(y[i:i + chunk], cp.maximum(x[i:i + chunk], cp.float16(0)))), f"chunk at {i}"
    assert fastnn.relu(x, out=x) is x
    for i in range(0, n, chunk):
        assert bool(cp.array_equal(x[i:i + chunk], y[i:i + chunk])), f"in place, chunk at {i}"


# ---- out-of-bounds writes: outputs inside a guard band ------------------------------------------------------

SENTINEL = {np.float32: -7777.0, np.float16: -777.0}


def guarded(shape, dtype, pad):
    """(buffer, view): a C-contiguous `shape` view in the middle of a buffer whose `pad` elements on each side
    hold a sentinel value, which any write past the view's ends would change."""
    n = math.prod(shape)
    buf = cp.full(n + 2 * pad, SENTINEL[dtype], dtype)
    return buf, buf[pad:pad + n].reshape(shape)


def assert_borders(buf, pad, dtype):
    s = SENTINEL[dtype]
    assert bool(cp.all(buf[:pad] == s)), "a write before the start of the output"
    assert bool(cp.all(buf[buf.size - pad:] == s)), "a write past the end of the output"


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pad", [64, 37])     # 64: the view stays 16-byte aligned (vector kernels); 37: not
def test_out_views_in_a_guard_band(rng, variant, dtype, pad):
    shape = (33, 1029)
    x, g = rand(rng, shape, dtype), rand(rng, shape, dtype)
    for fn, want in ((lambda o: fastnn.relu(gpu(x), out=o), ref.relu(f64(x))),
                     (lambda o: fastnn.relu_backward(gpu(g), gpu(x), out=o), ref.relu_backward(f64(g), f64(x))),
                     (lambda o: fastnn.softmax(gpu(x), out=o), ref.softmax(f64(x))),
                     (lambda o: fastnn.log_softmax(gpu(x), out=o), ref.log_softmax(f64(x)))):
        buf, out = guarded(shape, dtype, pad)
        assert fn(out) is out
        check(out, want, dtype)
        assert_borders(buf, pad, dtype)
    a, b = rand(rng, (3, 67, 131), dtype), rand(rng, (131, 129), dtype)
    buf, out = guarded((3, 67, 129), dtype, pad)
    assert fastnn.matmul(gpu(a), gpu(b), out=out) is out
    check(out, np.matmul(f64(a), f64(b)), dtype)
    assert_borders(buf, pad, dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pad", [64, 37])
def test_adam_state_in_a_guard_band(rng, variant, dtype, pad):
    n = 1003
    p0, g = rand(rng, n, dtype), rand(rng, n, dtype)
    pbuf, p = guarded((n,), dtype, pad)
    mbuf, m = guarded((n,), np.float32, pad)
    vbuf, v = guarded((n,), np.float32, pad)
    vmbuf, vm = guarded((n,), np.float32, pad)
    p[...] = gpu(p0)
    for a in (m, v, vm):
        a.fill(0)
    fastnn.adam_update(p, gpu(g), m, v, step=1, lr=1e-2, max_exp_avg_sq=vm)
    rp, rm, rv, rvm = f64(p0), np.zeros(n), np.zeros(n), np.zeros(n)
    ref.adam_update(rp, f64(g), rm, rv, step=1, lr=1e-2, max_exp_avg_sq=rvm)
    check(p, rp, dtype)
    check(m, rm, np.float32, tol=TOL[dtype])
    assert_borders(pbuf, pad, dtype)
    for b in (mbuf, vbuf, vmbuf):
        assert_borders(b, pad, np.float32)


# ---- stream ordering ----------------------------------------------------------------------------------------

_SPIN = r"""
extern "C" __global__ void spin_then_fill(float* x, long long n, long long cycles) {
  if (threadIdx.x == 0) {
    const long long t0 = clock64();
    while (clock64() - t0 < cycles) { }
  }
  __syncthreads();
  for (long long i = threadIdx.x; i < n; i += blockDim.x) x[i] = (float)(i % 13) - 4.0f;
}
"""


@needs_gpu
@pytest.mark.parametrize("op", ["relu", "softmax", "matmul", "sdpa", "adam"])
def test_ops_wait_for_earlier_work_on_the_current_stream(op):
    """A long kernel on a non-blocking stream writes x, then the op reads x on that stream: the op must see
    the written values. (Launched on the legacy default stream, which does not wait for a non-blocking
    stream, the op would read x before the fill and see -1s.)"""
    n = 96 * 96
    spin = cp.RawKernel(_SPIN, "spin_then_fill")
    fill = (np.arange(n) % 13 - 4.0).astype(np.float32)
    x = cp.full(n, -1.0, cp.float32)
    w = gpu(np.linspace(-1, 1, 96 * 32, dtype=np.float32).reshape(96, 32))
    cp.cuda.Device().synchronize()
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        spin((1,), (256,), (x, cp.int64(n), cp.int64(200_000_000)))   # ~0.1 to 0.5 s
        if op == "relu":
            y = fastnn.relu(x)
            want = ref.relu(f64(fill))
        elif op == "softmax":
            y = fastnn.softmax(x.reshape(96, 96))
            want = ref.softmax(f64(fill).reshape(96, 96))
        elif op == "matmul":
            y = fastnn.matmul(x.reshape(96, 96), w)
            want = f64(fill).reshape(96, 96) @ f64(cp.asnumpy(w))
        elif op == "sdpa":
            t = x.reshape(1, 96, 96)   # scale 2**-10: the integer dot products scale exactly, scores <= 6
            y = fastnn.scaled_dot_product_attention(t, t, t, scale=2.0 ** -10)
            t64 = f64(fill).reshape(1, 96, 96)
            want = ref.scaled_dot_product_attention(t64, t64, t64, scale=2.0 ** -10)
        else:
            m, v = cp.zeros(n, cp.float32), cp.zeros(n, cp.float32)
            fastnn.adam_update(x, cp.ones(n, cp.float32), m, v, step=1, lr=0.5)
            y = x
            want = f64(fill)
            ref.adam_update(want, np.ones(n), np.zeros(n), np.zeros(n), step=1, lr=0.5)
    stream.synchronize()
    check(y, want, np.float32)


# ---- misaligned but contiguous inputs -------------------------------------------------------------------------

@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_contiguous_inputs(rng, variant, dtype):
    """x[1:] of a contiguous array: contiguous, but its start is not 16-byte aligned, so the vector paths
    must fall back (element-wise, softmax rows, float16 GEMM tiles, attention tiles, Adam)."""
    def shifted(shape):
        host = rand(rng, math.prod(shape) + 1, dtype)
        dev = gpu(host)[1:].reshape(shape)
        assert dev.flags.c_contiguous and dev.data.ptr % 16 != 0
        return host[1:].reshape(shape), dev

    hx, x = shifted((4099,))
    hg, g = shifted((4099,))
    check(fastnn.relu(x), ref.relu(f64(hx)), dtype)
    check(fastnn.relu_backward(g, x), ref.relu_backward(f64(hg), f64(hx)), dtype)
    hs, s = shifted((37, 111))
    check(fastnn.softmax(s), ref.softmax(f64(hs)), dtype)
    check(fastnn.log_softmax(s), ref.log_softmax(f64(hs)), dtype)
    labels = rng.integers(0, 111, 37)
    loss, grad = fastnn.cross_entropy(s, gpu(labels))
    want_loss, want_grad = ref.cross_entropy(f64(hs), labels)
    assert abs(loss - want_loss) <= TOL[dtype] * max(abs(want_loss), 1.0)
    check(grad, want_grad, dtype)
    ha, a = shifted((67, 96))
    hb, b = shifted((96, 72))
    check(fastnn.matmul(a, b), np.matmul(f64(ha), f64(hb)), dtype)
    hq, q = shifted((2, 70, 40))
    hk, k = shifted((2, 90, 40))
    hv, v = shifted((2, 90, 40))
    out, lse = fastnn.scaled_dot_product_attention(q, k, v, return_lse=True)
    want, want_lse = ref.scaled_dot_product_attention(f64(hq), f64(hk), f64(hv), return_lse=True)
    check(out, want, dtype)
    check(lse, want_lse, np.float32, tol=LSE_TOL[dtype])
    hp, p = shifted((1003,))
    mbuf = cp.zeros(1004, cp.float32)
    m, vv = mbuf[1:], cp.zeros(1003, cp.float32)           # a misaligned moment too
    fastnn.adam_update(p, gpu(hg[:1003]), m, vv, step=1, lr=1e-2)
    rp, rm, rv = f64(hp), np.zeros(1003), np.zeros(1003)
    ref.adam_update(rp, f64(hg[:1003]), rm, rv, step=1, lr=1e-2)
    check(p, rp, dtype)
    check(m, rm, np.float32, tol=TOL[dtype])


# ---- attention lse -------------------------------------------------------------------------------------------

@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "float", "causal"])
@pytest.mark.parametrize("dims", [(70, 97, 40, 40), (130, 65, 64, 24)], ids=str)
def test_sdpa_lse_with_masks_and_fully_masked_rows(rng, variant, dtype, kind, dims):
    L, S, E, Ev = dims
    q, k, v = rand(rng, (2, 2, L, E), dtype), rand(rng, (2, 2, S, E), dtype), rand(rng, (2, 2, S, Ev), dtype)
    kw = {}
    if kind == "causal":
        kw["is_causal"] = True
    else:
        allowed = rng.random((2, 1, L, S)) > 0.3
        allowed[0, 0, 5] = False                       # fully masked rows: zeros, lse -inf
        allowed[1, 0, L - 1] = False                   # the last row of the last query tile
        allowed[1, 0, :, 64:] = False                  # a masked key tile
        kw["attn_mask"] = allowed if kind == "bool" else \
            np.where(allowed, rng.standard_normal(allowed.shape), -np.inf).astype(dtype)
    out, lse, want, want_lse = sdpa_both(q, k, v, **kw)
    assert lse.dtype == np.float32 and lse.shape == (2, 2, L)
    check(out, want, dtype)
    check(lse, want_lse, np.float32, tol=LSE_TOL[dtype])
    if kind != "causal":
        host = cp.asnumpy(lse)
        assert np.all(host[0, :, 5] == -np.inf) and np.all(host[1, :, L - 1] == -np.inf)
        assert not cp.asnumpy(out)[0, :, 5].any()


@needs_gpu
def test_sdpa_backward_takes_the_float32_lse(rng):
    q = gpu(rand(rng, (2, 16, 8), np.float16))
    o, lse = fastnn.scaled_dot_product_attention(q, q, q, return_lse=True)
    assert lse.dtype == cp.float32
    grads = fastnn.scaled_dot_product_attention_backward(o, q, q, q, o, lse)
    assert all(gr.dtype == cp.float16 for gr in grads)
    with pytest.raises(TypeError, match="lse: expected a float32"):
        fastnn.scaled_dot_product_attention_backward(o, q, q, q, o, lse.astype(cp.float16))


# ---- no GPU needed; streams ------------------------------------------------------------------

class FakeGpuArray:
    """The smallest object that claims to live in GPU memory."""
    __cuda_array_interface__ = {"shape": (4,), "typestr": "<f4", "data": (0, False), "version": 3}


def test_cuda_is_available_never_raises():
    avail = fastnn.cuda_is_available()
    assert isinstance(avail, bool)
    info = fastnn.info()
    assert isinstance(info["cuda_built"], bool)
    assert info["cuda_available"] is avail
    if not avail:
        assert info["cuda_unavailable_reason"]
    if info["cuda_built"]:
        assert info["cuda_toolkit"] and info["cuda_architectures"]


def test_gpu_array_without_usable_gpu_is_a_clear_runtime_error(monkeypatch):
    if fastnn.cuda_is_available():  # reach the no-GPU error path by making the probe report no device
        monkeypatch.setitem(_gpu._state, "reason", "no CUDA device is usable (simulated)")
    reason = _gpu.unavailable_reason()
    for call in (lambda: fastnn.relu(FakeGpuArray()),
                 lambda: fastnn.matmul(FakeGpuArray(), FakeGpuArray()),
                 lambda: fastnn.softmax(x=FakeGpuArray())):
        with pytest.raises(RuntimeError, match="GPU array") as e:
            call()
        assert reason is None or reason in str(e.value)
    # a GPU array mixed with a numpy array is a TypeError naming both
    with pytest.raises(TypeError, match="^b: got a GPU array .* whose a is a numpy.ndarray"):
        fastnn.matmul(np.ones((2, 2), np.float32), FakeGpuArray())


def test_one_public_function_per_op():
    from fastnn import _ops
    for name in ("matmul", "linear", "relu", "relu_backward", "softmax", "log_softmax", "softmax_backward",
                 "cross_entropy", "scaled_dot_product_attention", "adam_update", "linear_backward"):
        assert getattr(fastnn, name) is getattr(_ops, name), name
        assert getattr(fastnn, name).__doc__
    x = np.array([-1.0, 2.0], np.float32)
    np.testing.assert_array_equal(fastnn.relu(x), [0.0, 2.0])


def test_arch_rule():
    archs = "80-real,86-real,89-real,90-real,90-virtual"
    assert _gpu._arch_supports(archs, (8, 0))
    assert _gpu._arch_supports(archs, (8, 7))      # sm_86 machine code runs on 8.7
    assert _gpu._arch_supports(archs, (10, 0))     # PTX 90 is JIT-compiled for newer GPUs
    assert not _gpu._arch_supports(archs, (7, 5))
    assert not _gpu._arch_supports("90-real", (10, 0))


@needs_gpu
def test_launches_go_to_the_current_stream(rng):
    """Ops run on cupy's current stream and do not synchronize: results are right after that stream syncs."""
    a, b = rand(rng, (300, 200), np.float32), rand(rng, (200, 100), np.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        ga, gb = gpu(a), gpu(b)
        c = fastnn.softmax(fastnn.relu(fastnn.matmul(ga, gb)))
    stream.synchronize()
    check(c, ref.softmax(ref.relu(f64(a) @ f64(b))), np.float32)
