"""GPU tests: every op on cupy arrays against the float64 NumPy oracle, for the fast kernels and the plain
reference kernels (FASTNN_CUDA_KERNELS=plain), float32 (<= 1e-5 relative) and float16 (<= 2e-3).

Without a usable GPU the GPU tests skip and say why (no cupy / fastnn built without CUDA / no CUDA device).
The first tests need no GPU: `import fastnn` and `cuda_is_available()` work everywhere, and a GPU array on a
machine that cannot run it is a RuntimeError that says why.
"""
import math

import numpy as np
import pytest

import fastnn
from fastnn import _gpu
from fastnn import reference as ref

pytestmark = pytest.mark.gpu


# ---- no GPU needed ------------------------------------------------------------------------------------

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


# ---- GPU availability ---------------------------------------------------------------------------------

def _skip_reason():
    try:
        import cupy  # noqa: F401
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


_REASON = _skip_reason()
needs_gpu = pytest.mark.skipif(_REASON is not None, reason=f"GPU tests skipped: {_REASON}")

if _REASON is None:
    import cupy as cp
else:
    cp = None

TOL = {np.float32: 1e-5, np.float16: 2e-3}
DTYPES = [np.float32, np.float16]


@pytest.fixture(params=["fast", "plain"])
def variant(request):
    """Runs a test with the fast kernels, then with the plain reference kernels."""
    with _gpu.plain_kernels(request.param == "plain"):
        yield request.param


@pytest.fixture(autouse=True)
def poisoned_pool():
    """Fills cupy's memory pool with NaN bytes before each test, so outputs the kernels allocate start as NaN
    and any element a kernel forgets to write fails the comparison."""
    if cp is None:
        yield
        return
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    junk = cp.full(64 << 20, 0xFF, dtype=cp.uint8)  # 0xFFFF / 0xFFFFFFFF are NaN in float16 / float32
    del junk
    yield
    cp.cuda.Device().synchronize()


def rand(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def gpu(a):
    return cp.asarray(a)


def check(got, want, dtype, tol=None, scale=0.0):
    """got (GPU or host) matches the float64 oracle: same shape, NaN / inf positions, relative-norm error."""
    got = cp.asnumpy(got) if isinstance(got, cp.ndarray) else np.asarray(got)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    assert got.dtype == np.dtype(dtype), f"dtype {got.dtype} != {np.dtype(dtype)}"
    g = got.astype(np.float64)
    assert np.array_equal(np.isnan(g), np.isnan(want)), "NaN positions differ"
    assert np.array_equal(np.isposinf(g), np.isposinf(want)) and np.array_equal(np.isneginf(g), np.isneginf(want))
    fin = np.isfinite(want)
    err = np.linalg.norm(g[fin] - want[fin]) / max(np.linalg.norm(want[fin]), scale, 1e-300)
    bound = TOL[dtype] if tol is None else tol
    assert err <= bound, f"relative error {err:.3e} > {bound:.1e} ({np.dtype(dtype)})"


def f64(*arrays):
    out = tuple(None if a is None else np.asarray(a, np.float64) for a in arrays)
    return out[0] if len(out) == 1 else out


# ---- element-wise ---------------------------------------------------------------------------------------

@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 4097, 1 << 20])
def test_relu(rng, variant, dtype, n):
    x = rand(rng, n, dtype)
    if n > 7:
        x[::7] = np.nan
    check(fastnn.relu(gpu(x)), ref.relu(f64(x)), dtype)
    g = rand(rng, n, dtype)
    check(fastnn.relu_backward(gpu(g), gpu(x)), ref.relu_backward(f64(g), f64(x)), dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_views_out_and_in_place(rng, variant, dtype):
    base = rand(rng, (33, 70), dtype)
    x = gpu(base)[:, 3:68:2]               # strided view, misaligned start
    want = ref.relu(f64(base[:, 3:68:2]))
    check(fastnn.relu(x), want, dtype)
    out = cp.full(x.shape, cp.nan, dtype)   # poisoned out=
    assert fastnn.relu(x, out=out) is out
    check(out, want, dtype)
    y = gpu(base)
    assert fastnn.relu(y, out=y) is y       # in place
    check(y, ref.relu(f64(base)), dtype)
    xt = gpu(base).T                        # Fortran-ordered view
    check(fastnn.relu(xt), ref.relu(f64(base.T)), dtype)
    g = rand(rng, (33, 70), dtype)
    dout = cp.full((33, 70), cp.nan, dtype)
    check(fastnn.relu_backward(gpu(g), gpu(base), out=dout), ref.relu_backward(f64(g), f64(base)), dtype)


# ---- softmax family ---------------------------------------------------------------------------------------

SOFTMAX_SHAPES = [(1, 1), (3, 31), (5, 32), (4, 33), (17, 1000), (3, 1024), (2, 1025), (3, 4099), (2, 3, 50)]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SOFTMAX_SHAPES)
def test_softmax_and_log_softmax(rng, variant, dtype, shape):
    x = rand(rng, shape, dtype, scale=3.0)
    x.reshape(-1, shape[-1])[0, 0] = 60.0    # an outlier: the max must be subtracted
    for fn, oracle in ((fastnn.softmax, ref.softmax), (fastnn.log_softmax, ref.log_softmax)):
        check(fn(gpu(x)), oracle(f64(x)), dtype)
        check(fn(gpu(x), axis=0), oracle(f64(x), axis=0), dtype)
        out = cp.full(shape, cp.nan, dtype)
        assert fn(gpu(x), out=out) is out
        check(out, oracle(f64(x)), dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_special_rows(variant, dtype):
    x = np.array([[0.0, -np.inf, 1.0, 2.0],       # -inf entries: probability 0
                  [1.0, np.nan, 0.0, 0.0],        # NaN: the whole row NaN (as NumPy's formula)
                  [0.0, np.inf, 1.0, 1.0],        # +inf: NaN
                  [1e4, -1e4, 0.0, 1e4]], dtype)
    with np.errstate(invalid="ignore"):
        check(fastnn.softmax(gpu(x)), ref.softmax(f64(x)), dtype)
        check(fastnn.log_softmax(gpu(x)), ref.log_softmax(f64(x)), dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 33), (7, 1000), (2, 2049)])
def test_softmax_backward(rng, variant, dtype, shape):
    x = rand(rng, shape, dtype, scale=2.0)
    g = rand(rng, shape, dtype)
    y = ref.softmax(f64(x)).astype(dtype)
    terms = np.abs(f64(y)) * (np.abs(f64(g)) + np.sum(np.abs(f64(g * y)), axis=-1, keepdims=True))
    check(fastnn.softmax_backward(gpu(g), gpu(y)), ref.softmax_backward(f64(g), f64(y)), dtype,
          scale=float(np.linalg.norm(terms)))
    ly = ref.log_softmax(f64(x)).astype(dtype)
    want = f64(g) - np.exp(f64(ly)) * np.sum(f64(g), axis=-1, keepdims=True)
    lterms = np.abs(f64(g)) + np.exp(f64(ly)) * np.sum(np.abs(f64(g)), axis=-1, keepdims=True)
    check(fastnn.log_softmax_backward(gpu(g), gpu(ly)), want, dtype, scale=float(np.linalg.norm(lterms)))
    check(fastnn.softmax_backward(gpu(g), gpu(y), axis=0), ref.softmax_backward(f64(g), f64(y), axis=0), dtype,
          scale=float(np.linalg.norm(terms)))


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 10), (33, 1000), (4, 1025), (3, 5000)])
@pytest.mark.parametrize("label_dtype", [np.int32, np.int64])
def test_cross_entropy(rng, variant, dtype, shape, label_dtype):
    x = rand(rng, shape, dtype, scale=2.0)
    labels = rng.integers(0, shape[1], shape[0]).astype(label_dtype)
    loss, grad = fastnn.cross_entropy(gpu(x), gpu(labels))
    want_loss, want_grad = ref.cross_entropy(f64(x), labels)
    assert isinstance(loss, float)
    assert abs(loss - want_loss) <= TOL[dtype] * max(abs(want_loss), 1.0)
    check(grad, want_grad, dtype)


@needs_gpu
def test_cross_entropy_errors():
    x = gpu(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="labels"):
        fastnn.cross_entropy(x, gpu(np.array([0, 4, 1])))
    with pytest.raises(TypeError, match="labels"):
        fastnn.cross_entropy(x, np.array([0, 1, 1]))          # host labels with GPU logits
    loss, grad = fastnn.cross_entropy(gpu(np.zeros((0, 4), np.float32)), gpu(np.zeros(0, np.int64)))
    assert math.isnan(loss) and grad.shape == (0, 4)


# ---- matmul and linear ----------------------------------------------------------------------------------

MATMUL_SHAPES = [  # (a shape, b shape)
    ((1, 1), (1, 1)), ((7, 13), (13, 5)), ((127, 129), (129, 65)), ((128, 128), (128, 128)),
    ((129, 257), (257, 33)), ((64, 784), (784, 128)), ((3, 17, 19), (3, 19, 23)), ((3, 1, 17, 19), (4, 19, 23)),
    ((19,), (19, 7)), ((5, 19), (19,)), ((19,), (19,)), ((8, 0), (0, 9)), ((256, 512), (512, 136)),
]


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=str)
def test_matmul(rng, variant, dtype, shapes):
    a, b = rand(rng, shapes[0], dtype), rand(rng, shapes[1], dtype)
    want = np.matmul(f64(a), f64(b))
    check(fastnn.matmul(gpu(a), gpu(b)), want, dtype)
    out = cp.full(want.shape, cp.nan, dtype)
    assert fastnn.matmul(gpu(a), gpu(b), out=out) is out
    check(out, want, dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["T", "TT", "neg", "step", "offset"])
def test_matmul_views(rng, variant, dtype, layout):
    A, B = rand(rng, (130, 97), dtype), rand(rng, (97, 71), dtype)
    if layout == "T":        # column-major a (unit stride down the rows)
        a, b = gpu(np.ascontiguousarray(A.T)).T, gpu(B)
    elif layout == "TT":     # both transposed
        a, b = gpu(np.ascontiguousarray(A.T)).T, gpu(np.ascontiguousarray(B.T)).T
    elif layout == "neg":    # reversed rows and columns
        a, b = gpu(A[::-1].copy())[::-1], gpu(B[:, ::-1].copy())[:, ::-1]
    elif layout == "step":   # every other element
        a, b = gpu(np.repeat(A, 2, axis=1))[:, ::2], gpu(np.repeat(B, 2, axis=0))[::2]
    else:                    # a start that is not 16-byte aligned (scalar loads in the float16 kernel)
        a = gpu(np.concatenate([np.zeros((130, 1), dtype), A], axis=1))[:, 1:]
        b = gpu(B)
    check(fastnn.matmul(a, b), np.matmul(f64(A), f64(B)), dtype)


@needs_gpu
def test_matmul_large_by_random_vector(rng):
    """A 1024^3 float32 product checked cheaply: C t against A (B t) in float64."""
    n = 1024
    a, b = rand(rng, (n, n), np.float32), rand(rng, (n, n), np.float32)
    c = cp.asnumpy(fastnn.matmul(gpu(a), gpu(b))).astype(np.float64)
    t = rng.standard_normal(n)
    want = f64(a) @ (f64(b) @ t)
    assert np.linalg.norm(c @ t - want) / np.linalg.norm(want) <= 1e-5


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (64, 784, 128), (2, 33, 70, 129), (5, 8, 8)])
def test_linear(rng, variant, dtype, activation, shape):
    *lead, n_in, n_out = shape
    x = rand(rng, tuple(lead) + (n_in,), dtype)
    w = rand(rng, (n_in, n_out), dtype)
    bias = rand(rng, n_out, dtype)
    check(fastnn.linear(gpu(x), gpu(w), gpu(bias), activation=activation),
          ref.linear(f64(x), f64(w), f64(bias), activation), dtype)
    check(fastnn.linear(gpu(x), gpu(w)), ref.linear(f64(x), f64(w)), dtype)


@needs_gpu
def test_matmul_argument_errors():
    a = gpu(np.ones((3, 4), np.float32))
    with pytest.raises(TypeError, match="^b: got a numpy.ndarray"):
        fastnn.matmul(a, np.ones((4, 2), np.float32))
    with pytest.raises(TypeError, match="^b: got a cupy.ndarray in a call whose a is a numpy.ndarray"):
        fastnn.matmul(np.ones((3, 4), np.float32), gpu(np.ones((4, 2), np.float32)))
    with pytest.raises(TypeError, match="float32 or float16"):
        fastnn.matmul(a.astype(cp.float64), a.T.astype(cp.float64))
    with pytest.raises(TypeError, match="dtype"):
        fastnn.matmul(a, a.T.astype(cp.float16))
    with pytest.raises(ValueError, match="inner dimensions"):
        fastnn.matmul(a, a)


# ---- attention --------------------------------------------------------------------------------------------

def _attn_case(rng, dtype, batch, L, S, E, Ev, hk=None):
    hq = batch[-1] if batch else 1
    kb = batch[:-1] + (hk,) if hk else batch
    q = rand(rng, batch + (L, E), dtype)
    k = rand(rng, kb + (S, E), dtype)
    v = rand(rng, kb + (S, Ev), dtype)
    return q, k, v


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", [(1, 1, 1, 1), (97, 97, 59, 59), (64, 64, 64, 64), (65, 130, 111, 47),
                                  (33, 1025, 128, 128), (7, 5, 16, 16), (5, 300, 256, 64)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa(rng, variant, dtype, dims, causal):
    L, S, E, Ev = dims
    q, k, v = _attn_case(rng, dtype, (2, 3), L, S, E, Ev)
    out, lse = fastnn.scaled_dot_product_attention(gpu(q), gpu(k), gpu(v), is_causal=causal, return_lse=True)
    want, want_lse = ref.scaled_dot_product_attention(f64(q), f64(k), f64(v), is_causal=causal, return_lse=True)
    check(out, want, dtype)
    check(lse, want_lse, np.float32, tol=TOL[dtype])   # lse is float32 for float16 inputs too


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_masks_and_fully_masked_rows(rng, variant, dtype, kind):
    L, S, E = 70, 97, 40
    q, k, v = _attn_case(rng, dtype, (2, 2), L, S, E, E)
    allowed = rng.random((2, 1, L, S)) > 0.3          # broadcast over heads
    allowed[0, 0, 5] = False                           # fully masked rows: zeros
    allowed[1, 0, :, 64:] = False                      # a masked key tile edge
    if kind == "bool":
        mask = allowed
    else:
        mask = np.where(allowed, rng.standard_normal(allowed.shape), -np.inf).astype(dtype)
    got = fastnn.scaled_dot_product_attention(gpu(q), gpu(k), gpu(v), attn_mask=gpu(mask))
    want = ref.scaled_dot_product_attention(f64(q), f64(k), f64(v), attn_mask=mask if kind == "bool" else f64(mask))
    check(got, want, dtype)
    assert not cp.asnumpy(got)[0, :, 5].any()


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_gqa_broadcast_views_scale(rng, variant, dtype):
    q, k, v = _attn_case(rng, dtype, (2, 6), 50, 77, 32, 24, hk=2)
    got = fastnn.scaled_dot_product_attention(gpu(q), gpu(k), gpu(v), enable_gqa=True, scale=0.3)
    want = ref.scaled_dot_product_attention(f64(q), f64(k), f64(v), enable_gqa=True, scale=0.3)
    check(got, want, dtype)
    # a key/value shared by every batch (broadcast) and a transposed-then-transposed query view
    q2 = rand(rng, (3, 2, 40, 24), dtype)
    k2, v2 = rand(rng, (40, 24), dtype), rand(rng, (40, 16), dtype)
    qv = gpu(np.ascontiguousarray(np.swapaxes(q2, -1, -2))).swapaxes(-1, -2)
    check(fastnn.scaled_dot_product_attention(qv, gpu(k2), gpu(v2), is_causal=True),
          ref.scaled_dot_product_attention(f64(q2), f64(k2), f64(v2), is_causal=True), dtype)


@needs_gpu
def test_sdpa_errors():
    q = gpu(np.ones((2, 4, 8), np.float32))
    with pytest.raises(TypeError, match="^key: got a numpy.ndarray"):
        fastnn.scaled_dot_product_attention(q, np.ones((2, 4, 8), np.float32), q)
    with pytest.raises(ValueError, match="dropout_p"):
        fastnn.scaled_dot_product_attention(q, q, q, dropout_p=1.0)
    with pytest.raises(ValueError, match="lse: expected shape"):
        fastnn.scaled_dot_product_attention_backward(q, q, q, q, q, q)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"mask": "bool"}, {"mask": "float"}, {"enable_gqa": True}],
                         ids=str)
def test_sdpa_backward_matches_the_cpu(rng, dtype, kw):
    kw = dict(kw)
    q, k, v = _attn_case(rng, dtype, (2, 4), 37, 45, 24, 16, hk=2 if kw.get("enable_gqa") else None)
    mask = kw.pop("mask", None)
    if mask == "bool":
        mask = rng.random((37, 45)) < 0.7
        mask[3] = False                                  # a fully masked row
    elif mask == "float":
        mask = rand(rng, (2, 1, 37, 45), dtype)
    m64 = mask if mask is None or mask.dtype == np.bool_ else f64(mask)
    o, lse = fastnn.scaled_dot_product_attention(f64(q), f64(k), f64(v), attn_mask=m64, return_lse=True, **kw)
    g = rand(rng, o.shape, dtype)
    want = fastnn.scaled_dot_product_attention_backward(f64(g), f64(q), f64(k), f64(v), o, lse, attn_mask=m64, **kw)
    got = fastnn.scaled_dot_product_attention_backward(
        gpu(g), gpu(q), gpu(k), gpu(v), gpu(o.astype(dtype)), gpu(lse.astype(np.float32)),
        attn_mask=None if mask is None else gpu(mask), **kw)
    for a, b in zip(got, want):
        assert isinstance(a, cp.ndarray) and a.dtype == dtype and a.shape == b.shape
        check(a, b, dtype, tol=TOL[dtype] * (1 if dtype == np.float32 else 20))


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_dropout_mask_is_the_cpus_bit_for_bit(variant, dtype, causal):
    # query 0: equal probabilities over the allowed keys; value = I: output (b, i, j) = keep * scale / count.
    from fastnn._dropout import forward_dropout, keep_mask
    L, S, p = 70, 131, 0.3                              # past one key tile (64), S % 4 != 0
    q = np.zeros((2, 3, L, 8), dtype)
    k = np.ones((2, 3, S, 8), dtype)
    v = np.broadcast_to(np.eye(S, dtype=dtype), (2, 3, S, S))
    out, lse, st = fastnn.scaled_dot_product_attention(gpu(q), gpu(k), gpu(np.ascontiguousarray(v)),
                                                       is_causal=causal, dropout_p=p, rng=42, return_lse=True)
    assert st == (42, 0)
    count = np.minimum(np.arange(L) + 1, S)[:, None] if causal else S
    got = cp.asnumpy(out).astype(np.float64) * (1 - p) * count > 0.5
    want = keep_mask(np, forward_dropout(p, 42), range(6), range(L), S).reshape(2, 3, L, S)
    if causal:
        want &= np.tril(np.ones((L, S), bool))
    assert np.array_equal(got, want)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims", [(97, 130, 64, 64), (65, 63, 59, 33), (1, 5, 16, 16)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_dropout(rng, variant, dtype, dims, causal):
    L, S, E, Ev = dims
    q, k, v = _attn_case(rng, dtype, (2, 3), L, S, E, Ev)
    out, lse, st = fastnn.scaled_dot_product_attention(gpu(q), gpu(k), gpu(v), is_causal=causal, dropout_p=0.25,
                                                       rng=np.random.default_rng(1), return_lse=True)
    want, want_lse, _ = ref.scaled_dot_product_attention(f64(q), f64(k), f64(v), is_causal=causal, dropout_p=0.25,
                                                         rng=st, return_lse=True)
    check(out, want, dtype)
    check(lse, want_lse, dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"enable_gqa": True}], ids=str)
def test_sdpa_dropout_backward_matches_the_cpu(rng, dtype, kw):
    q, k, v = _attn_case(rng, dtype, (2, 4), 37, 45, 24, 16, hk=2 if kw.get("enable_gqa") else None)
    o, lse, st = fastnn.scaled_dot_product_attention(f64(q), f64(k), f64(v), return_lse=True, dropout_p=0.4,
                                                     rng=9, **kw)
    g = rand(rng, o.shape, dtype)
    want = fastnn.scaled_dot_product_attention_backward(f64(g), f64(q), f64(k), f64(v), o, lse, dropout_p=0.4,
                                                        rng_state=st, **kw)
    got = fastnn.scaled_dot_product_attention_backward(
        gpu(g), gpu(q), gpu(k), gpu(v), gpu(o.astype(dtype)), gpu(lse.astype(dtype)), dropout_p=0.4, rng_state=st,
        **kw)
    for a, b in zip(got, want):
        assert isinstance(a, cp.ndarray) and a.dtype == dtype and a.shape == b.shape
        check(a, b, dtype, tol=TOL[dtype] * (1 if dtype == np.float32 else 20))


# ---- training --------------------------------------------------------------------------------------------

@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_backward_matches_the_cpu(rng, dtype):
    x, w, g = rand(rng, (3, 7, 33), dtype), rand(rng, (33, 20), dtype), rand(rng, (3, 7, 20), dtype)
    want = fastnn.linear_backward(f64(g), f64(x), f64(w))
    got = fastnn.linear_backward(gpu(g), gpu(x), gpu(w))
    for a, b in zip(got, want):
        assert isinstance(a, cp.ndarray) and a.dtype == dtype
        check(a, b, dtype)
    gx, gw, gb = fastnn.linear_backward(gpu(g), gpu(x), gpu(w), bias=False, x_grad=False)
    assert gx is None and gb is None
    check(gw, want[1], dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_optimizer_on_gpu_arrays(rng, dtype):
    shapes = [(5, 3), (3,), (17,)]
    host = [rand(rng, s, dtype) for s in shapes]
    params = [gpu(p) for p in host]
    ref_params = [f64(p) for p in host]
    opt = fastnn.Adam(params, lr=1e-2, amsgrad=True, weight_decay=0.01)
    ref_state = [(np.zeros(s), np.zeros(s), np.zeros(s)) for s in shapes]
    for step in range(1, 4):
        grads = [rand(rng, s, dtype) for s in shapes]
        opt.step([gpu(g) for g in grads])
        for p, g, (m, v, vmax) in zip(ref_params, grads, ref_state):
            ref.adam_update(p, f64(g), m, v, step=step, lr=1e-2, weight_decay=0.01, max_exp_avg_sq=vmax)
    for p, r in zip(params, ref_params):
        check(p, r, dtype)
    sd = opt.state_dict()
    assert all(isinstance(v, (int, float, bool)) or type(v) is np.ndarray for v in sd.values())
    other = fastnn.Adam([p.copy() for p in params], lr=1e-2, amsgrad=True, weight_decay=0.01)
    other.load_state_dict(sd)
    grads = [gpu(rand(rng, s, dtype)) for s in shapes]
    opt.step(grads)
    other.step(grads)
    for a, b in zip(opt.params, other.params):
        assert cp.array_equal(a, b)
    with pytest.raises(TypeError, match=r"grads\[0\]: got a numpy.ndarray in a call whose params\[0\] is a cupy"):
        opt.step([np.zeros(s, dtype) for s in shapes])
    with pytest.raises(TypeError, match=r"params\[1\]: got a numpy.ndarray in a call whose params\[0\] is a cupy"):
        fastnn.Adam([params[0], host[1]])


# ---- Adam -----------------------------------------------------------------------------------------------

@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 3, 4, 5, 1000, 100003])
@pytest.mark.parametrize("opts", [{}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "decoupled_weight_decay": True},
                                  {"maximize": True}, {"amsgrad": True}], ids=str)
def test_adam_several_steps(rng, variant, dtype, n, opts):
    opts = dict(opts)
    ams = opts.pop("amsgrad", False)
    p = rand(rng, n, dtype)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    vmax = np.zeros(n, np.float32) if ams else None
    gp, gm, gv = gpu(p), gpu(m), gpu(v)
    gvmax = gpu(vmax) if ams else None
    rp, rm, rv = f64(p, m, v)
    rvmax = f64(vmax) if ams else None
    for step in range(1, 6):
        g = rand(rng, n, dtype)
        fastnn.adam_update(gp, gpu(g), gm, gv, step=step, lr=1e-2, max_exp_avg_sq=gvmax, **opts)
        ref.adam_update(rp, f64(g), rm, rv, step=step, lr=1e-2, max_exp_avg_sq=rvmax, **opts)
    check(gp, rp, dtype)
    check(gm, rm, np.float32, tol=TOL[dtype])
    check(gv, rv, np.float32, tol=TOL[dtype])


@needs_gpu
def test_adam_errors():
    p = gpu(np.zeros(8, np.float16))
    with pytest.raises(TypeError, match="exp_avg: expected a float32"):
        fastnn.adam_update(p, p, p, p, step=1)             # float16 moments are not accepted
    s = gpu(np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="exp_avg_sq: shares memory"):
        fastnn.adam_update(p, p, s, s, step=1)
    with pytest.raises(TypeError, match="^grad: got a numpy.ndarray"):
        fastnn.adam_update(s, np.zeros(8, np.float32), gpu(np.zeros(8, np.float32)), gpu(np.zeros(8, np.float32)),
                           step=1)


# ---- streams ------------------------------------------------------------------------------------------

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
