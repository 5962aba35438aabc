"""float16 and bfloat16 (ml_dtypes) on the CPU: every op against the float64 oracle on the same rounded inputs,
on every ISA path, 1 and 2 threads, odd sizes, non-contiguous views and NaN/inf; the widening and rounding
kernels bit for bit against ml_dtypes / numpy; torch and JAX arrays; Adam against torch.optim.Adam.

Tolerances: conftest.tolerance for a 2-byte dtype, 2u + the float32 bound (u = 2^-8 bfloat16, 2^-11
float16), derived there: results are float32 computations rounded once to the dtype.
"""
import numpy as np
import pytest

import fastnn
from fastnn import _C
from fastnn import reference as ref

from conftest import assert_close, make_array, softmax_backward_scale

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
HALF = [pytest.param(BF16, id="bf16"), pytest.param(F16, id="f16")]


def close(got, want, dtype, k=1, scale=0.0):
    """got has `dtype` and matches the rounded oracle result within tolerance(dtype, k)."""
    assert got.dtype == dtype, f"dtype {got.dtype} != {dtype}"
    assert_close(np.asarray(got, np.float64), np.asarray(want, np.float64), dtype, k, check_dtype=False,
                 scale=scale)


def half(rng, shape, dtype, layout="C", scale=1.0):
    return make_array(rng, shape, dtype, layout, scale)


def with_specials(a):
    """a (a copy) with NaN, +inf and -inf at the start of its flat order."""
    a = a.copy()
    flat = a.reshape(-1)
    flat[:3] = np.array([np.nan, np.inf, -np.inf], np.float32).astype(a.dtype)
    return a


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request, restore_threads):
    fastnn.set_num_threads(request.param)
    return request.param


# ---- the conversions ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF)
def test_rounding_matches_ml_dtypes_and_numpy(isa, dtype):
    """float32 -> half rounds to nearest even exactly as ml_dtypes / numpy do (halfway cases, subnormals,
    overflow to inf, NaN kept NaN), and half -> float32 is exact, on every path (vector body and tail)."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 40_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32).copy()
    fmax = 65504.0 if dtype == F16 else 3.3895313892515355e38
    x[:12] = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, fmax, -fmax, 65519.99, 65520.0, 1e-45, 6e-8]
    # Exact halfway points between neighbouring half values (ties go to even) and their neighbours.
    h = rng.standard_normal(2000).astype(dtype).astype(np.float32)
    step = (np.nextafter(h.astype(dtype), dtype.type(np.inf)).astype(np.float32) - h) if dtype == F16 else None
    if step is None:
        mid = (h.view(np.uint32) + np.uint32(0x8000)).view(np.float32)
    else:
        mid = h + step / 2
    x = np.concatenate([x, mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(-np.inf))])
    for n in (len(x), 1, 15, 17, 33):  # lengths around the vector widths
        got = np.empty(n, dtype)
        _C.float_to_half(x[:n], got.view(np.uint16), dtype == BF16)
        with np.errstate(over="ignore", invalid="ignore"):
            want = x[:n].astype(dtype)
        nan = np.isnan(x[:n])
        assert np.isnan(got.astype(np.float32)[nan]).all()
        assert np.array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])
        back = np.empty(n, np.float32)
        _C.half_to_float(want.view(np.uint16), back, dtype == BF16)
        assert np.array_equal(back, want.astype(np.float32), equal_nan=True)


def test_importing_fastnn_does_not_import_ml_dtypes():
    import subprocess
    import sys
    from conftest import pkg_env
    code = ("import sys, numpy as np, fastnn; fastnn.relu(np.ones(3, np.float16)); "
            "assert 'ml_dtypes' not in sys.modules, 'ml_dtypes imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env=pkg_env(), cwd="/")


# ---- element-wise and the softmax family ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("layout", ["C", "T", "step", "neg"])
def test_relu(isa, threads, rng, dtype, layout):
    x = with_specials(half(rng, (67, 131), dtype))
    if layout != "C":
        x = half(rng, (67, 131), dtype, layout)
    g = half(rng, x.shape, dtype)
    y = fastnn.relu(x)
    assert y.dtype == dtype and np.array_equal(y, ref.relu(x), equal_nan=True)  # exact: a select
    gx = fastnn.relu_backward(g, x)
    assert gx.dtype == dtype and np.array_equal(gx, ref.relu_backward(g, x), equal_nan=True)
    out = np.empty_like(x)
    assert fastnn.relu(x, out=out) is out and np.array_equal(out, y, equal_nan=True)
    big = half(rng, (300_001,), dtype)  # several threads' chunks
    assert np.array_equal(fastnn.relu(big), ref.relu(big))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape,axis", [((7, 1), -1), ((5, 129), -1), ((3, 33, 17), 1), ((1000,), 0)])
def test_softmax_family(isa, threads, rng, dtype, shape, axis):
    x = half(rng, shape, dtype, scale=4.0)
    n = shape[axis]
    for op, oracle in ((fastnn.softmax, ref.softmax), (fastnn.log_softmax, ref.log_softmax)):
        close(op(x, axis), oracle(x, axis), dtype, n)
    y = fastnn.softmax(x, axis)
    g = half(rng, shape, dtype)
    close(fastnn.softmax_backward(g, y, axis), ref.softmax_backward(g, y, axis), dtype, n,
          scale=softmax_backward_scale(g, y, axis))
    ly = fastnn.log_softmax(x, axis)
    g64, ly64 = np.asarray(g, np.float64), np.asarray(ly, np.float64)  # g - exp(y) * sum(g), in float64
    close(fastnn.log_softmax_backward(g, ly, axis), g64 - np.exp(ly64) * g64.sum(axis, keepdims=True), dtype, n)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(3, 40_001), (2001, 33)], ids=["long_rows", "many_blocks"])
def test_softmax_row_blocks(isa, threads, rng, dtype, shape):
    """Rows longer than a thread's block, and many blocks of rows per thread (the half kernels' workspaces)."""
    x = half(rng, shape, dtype, scale=3.0)
    g = half(rng, shape, dtype)
    close(fastnn.softmax(x), ref.softmax(x), dtype, shape[1])
    close(fastnn.log_softmax(x), ref.log_softmax(x), dtype, shape[1])
    y = fastnn.softmax(x)
    close(fastnn.softmax_backward(g, y), ref.softmax_backward(g, y), dtype, shape[1],
          scale=softmax_backward_scale(g, y))
    out = x.copy()
    assert fastnn.softmax(out, out=out) is out  # in place
    assert np.array_equal(out, y)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("dtype", HALF)
def test_softmax_nonfinite_rows(isa, rng, dtype):
    x = half(rng, (4, 37), dtype)
    x[0, 3] = np.nan
    x[1, 5] = np.inf
    x[2, 7] = -np.inf
    close(fastnn.softmax(x), ref.softmax(x), dtype, 37)
    close(fastnn.log_softmax(x), ref.log_softmax(x), dtype, 37)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy(isa, threads, rng, dtype, reduction):
    logits = half(rng, (37, 101), dtype, scale=3.0)
    labels = rng.integers(0, 101, 37)
    labels[4] = -100
    loss, grad = fastnn.cross_entropy(logits, labels, reduction=reduction)
    rloss, rgrad = ref.cross_entropy(logits, labels, reduction=reduction)
    close(grad, rgrad, dtype, 101)
    if reduction == "none":
        close(loss, rloss, dtype, 101)
    else:  # a Python float summed in float64 over float32 row losses
        assert abs(loss - rloss) <= 1e-5 * max(1.0, abs(rloss))


# ---- products ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (37, 29, 53), (65, 130, 17), (8, 33, 300)])
@pytest.mark.parametrize("la,lb", [("C", "C"), ("T", "step"), ("neg", "F")])
def test_matmul(isa, threads, rng, dtype, M, N, K, la, lb):
    a, b = half(rng, (M, K), dtype, la), half(rng, (K, N), dtype, lb)
    close(fastnn.matmul(a, b), ref.matmul(a, b), dtype, K)


@pytest.mark.parametrize("dtype", HALF)
def test_matmul_batched_nonfinite(isa, rng, dtype):
    a, b = half(rng, (3, 1, 19, 23), dtype), half(rng, (4, 23, 11), dtype)
    close(fastnn.matmul(a, b), ref.matmul(a, b), dtype, 23)
    a = with_specials(a)
    close(fastnn.matmul(a, b), ref.matmul(a, b), dtype, 23)
    v = half(rng, (23,), dtype)
    close(fastnn.matmul(a, v), ref.matmul(a, v), dtype, 23)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("activation", [None, "relu"])
def test_linear_and_backward(isa, threads, rng, dtype, activation):
    x, w, b = half(rng, (5, 7, 45), dtype), half(rng, (45, 31), dtype), half(rng, (31,), dtype)
    close(fastnn.linear(x, w, b, activation=activation), ref.linear(x, w, b, activation), dtype, 45)
    g = half(rng, (5, 7, 31), dtype)
    for got, want, k in zip(fastnn.linear_backward(g, x, w), ref.linear_backward(g, x, w), (31, 35, 35)):
        close(got, want, dtype, k)


# ---- the avx512bf16 path: bfloat16 products on the AVX512-BF16 dot product ------------------------------

def _gemm32(a, b):
    """The float32 product of 2-D bfloat16 a @ b before its rounding to bfloat16 (any strides)."""
    c = np.full((a.shape[0], b.shape[1]), np.nan, np.float32)
    e = lambda x: [s // 2 for s in x.strides]
    _C.gemm_half(a.view(np.uint16), b.view(np.uint16), c, np.zeros(1, np.int64), np.zeros(1, np.int64),
                 a.shape[0], b.shape[1], a.shape[1], *e(a), *e(b), None, False, True)
    return c


def _on(isa, f, *args):
    """f(*args) with the kernel path isa."""
    old = fastnn.cpu_isa()
    fastnn.set_cpu_isa(isa)
    try:
        return f(*args)
    finally:
        fastnn.set_cpu_isa(old)


needs_bf16_path = pytest.mark.skipif("avx512bf16" not in fastnn.info()["cpu_isa_supported"],
                                     reason="this CPU has no AVX512-BF16 (the avx512bf16 path is not available)")


@needs_bf16_path
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (8, 32, 2), (9, 33, 3), (17, 16, 255), (130, 70, 513)])
@pytest.mark.parametrize("la,lb", [("C", "C"), ("F", "F"), ("T", "step"), ("neg", "C")])
def test_bf16_dot_product_accumulates_in_float32(threads, rng, M, N, K, la, lb):
    # The float32 sums before rounding, against the float64 oracle at the float32 bound: the pair dot
    # product rounds like the FMA chain (each bf16 product is exact in float32).
    a, b = half(rng, (M, K), BF16, la), half(rng, (K, N), BF16, lb)
    want = a.astype(np.float64) @ b.astype(np.float64)
    for isa in ("avx512", "avx512bf16"):
        assert_close(_on(isa, _gemm32, a, b).astype(np.float64), want, np.float32, K, check_dtype=False)


# Inputs the dot product would get wrong (subnormal inputs read as zero, subnormal sums flushed to zero,
# overflowing products) or whose special values must behave as IEEE float32: the product is computed on
# the widening path instead, so it is the avx512 path's result bit for bit.
OUTSIDE = {"subnormal": (1e-39, 1e38), "tiny products": (1e-20, 1e-20), "below 2^-55": (2.0**-56, 1.0),
           "2^63": (2.0**63, 1.0), "huge products": (3e38, -3e38), "inf": (np.inf, 1.0), "nan": (np.nan, 1.0)}


@needs_bf16_path
@pytest.mark.parametrize("case", list(OUTSIDE))
@pytest.mark.parametrize("where", ["a", "b"])
def test_bf16_dot_product_leaves_what_it_would_get_wrong_to_float32(rng, case, where):
    x, y = OUTSIDE[case]
    a, b = half(rng, (19, 37), BF16), half(rng, (37, 45), BF16)
    a[3, 5], b[5, 7] = (x, y) if where == "a" else (y, x)
    if case in ("subnormal", "tiny products"):  # the only term of c[3, 7]: the rest of row 3 / column 7 zero
        a[3, :5] = a[3, 6:] = 0
    wide, dot = _on("avx512", _gemm32, a, b), _on("avx512bf16", _gemm32, a, b)
    np.testing.assert_array_equal(dot, wide)
    want = (a.astype(np.float64) @ b.astype(np.float64)).astype(np.float32)
    if case in ("subnormal", "tiny products"):  # the IEEE float32 answer, nonzero
        assert dot[3, 7] == want[3, 7] != 0
    # And through the public API, rounded to bfloat16 (the row-3 zeros make some sums exactly 0).
    np.testing.assert_array_equal(_on("avx512bf16", fastnn.matmul, a, b).view(np.uint16),
                                  _on("avx512", fastnn.matmul, a, b).view(np.uint16))


@needs_bf16_path
@pytest.mark.parametrize("x,y", [(2.0**-55, 2.0**-55), (2.0**62 * 1.9921875, 2.0**62 * 1.9921875)],
                         ids=["smallest", "largest"])
def test_bf16_dot_product_range_edges_are_exact(x, y):
    # The edges of the range the dot product takes: products 2^-110 and (2^63 - 2^55)^2, exact in float32.
    a = np.full((8, 4), x, np.float32).astype(BF16)
    b = np.full((4, 32), y, np.float32).astype(BF16)
    b[1::2] *= -1  # every sum cancels pairwise to exactly zero, and the one product of column 0 below stays
    b[:, 0] = 0
    b[0, 0] = y
    got = _on("avx512bf16", _gemm32, a, b)
    want = a.astype(np.float64) @ b.astype(np.float64)
    assert got[0, 0] == np.float32(x * y) and np.array_equal(got, want.astype(np.float32))


# ---- attention -----------------------------------------------------------------------------------------

ATTN = [  # (q shape, S, Ev, extra arguments)
    ((2, 3, 17, 8), 29, 8, {}),
    ((1, 2, 33, 59), 97, 111, {"is_causal": True}),
    ((2, 4, 9, 16), 13, 16, {"enable_gqa": True, "kv_heads": 2}),
    ((3, 20, 24), 20, 24, {"mask": "bool"}),
    ((3, 20, 24), 21, 5, {"mask": "float"}),
]


def attn_inputs(rng, dtype, qshape, S, Ev, extra):
    extra = dict(extra)
    heads = extra.pop("kv_heads", None)
    kvb = qshape[:-2] if heads is None else qshape[:-3] + (heads,)
    q = half(rng, qshape, dtype)
    k = half(rng, kvb + (S, qshape[-1]), dtype)
    v = half(rng, kvb + (S, Ev), dtype)
    mask = extra.pop("mask", None)
    L = qshape[-2]
    if mask == "bool":
        extra["attn_mask"] = rng.random((L, S)) < 0.7
    elif mask == "float":
        extra["attn_mask"] = half(rng, (L, S), dtype)
    return q, k, v, extra


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("case", range(len(ATTN)))
def test_attention_forward_backward(isa, threads, rng, dtype, case):
    qshape, S, Ev, extra = ATTN[case]
    q, k, v, kw = attn_inputs(rng, dtype, qshape, S, Ev, extra)
    E = qshape[-1]
    out, lse = fastnn.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    rout, rlse = ref.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    close(out, rout, dtype, S + E)
    assert lse.dtype == np.float32  # float32 for half inputs: a rounded lse would shift whole rows
    assert_close(lse, rlse.astype(np.float64), np.float32, E + S, check_dtype=False)
    g = half(rng, out.shape, dtype)
    got = fastnn.scaled_dot_product_attention_backward(g, q, k, v, out, lse, **kw)
    want = ref.scaled_dot_product_attention_backward(g, q, k, v, rout, rlse, **kw)
    # The backward reads the forward's output rounded to the dtype (D = rowsum(dO * O), as PyTorch's): one
    # more rounding of relative size u in the terms of dS, so the gradients get twice the forward's bound.
    for x, w in zip(got, want):
        close(x, w, dtype, 2 * (S + E + L_of(qshape)))


def L_of(qshape):
    return qshape[-2]


# The avx512bf16 attention: every product on the dot product, the probabilities (and in the backward the score
# gradients) rounded to bfloat16 for the products that take them (relative 2^-9 each: within the results' own
# rounding, 2^-9, so the bounds of test_attention_forward_backward still hold).
BF16_ATTN = [  # (q shape, S, Ev, extra): several query and key blocks (64 queries, 128 keys per block)
    ((2, 150, 64), 300, 40, {}),
    ((1, 2, 130, 33), 257, 7, {"is_causal": True}),
    ((1, 70, 1), 129, 65, {"is_causal": True}),     # L < S: the causal rule aligned to the top left
    ((2, 4, 65, 16), 200, 16, {"enable_gqa": True, "kv_heads": 2, "mask": "bool"}),
    ((3, 80, 24), 131, 32, {"mask": "float", "dropout_p": 0.3}),
]


@needs_bf16_path
@pytest.mark.parametrize("case", range(len(BF16_ATTN)))
def test_bf16_attention_on_the_dot_product(threads, rng, case):
    qshape, S, Ev, extra = BF16_ATTN[case]
    q, k, v, kw = attn_inputs(rng, BF16, qshape, S, Ev, extra)
    bw = dict(kw)
    if "dropout_p" in kw:
        kw["rng"] = 11
    E, L = qshape[-1], qshape[-2]
    out, lse, *state = _on("avx512bf16", lambda: fastnn.scaled_dot_product_attention(q, k, v, return_lse=True, **kw))
    want = ref.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    close(out, want[0], BF16, S + E)
    assert_close(lse, want[1].astype(np.float64), np.float32, E + S, check_dtype=False)
    if state:
        bw["rng_state"] = state[0]
    g = half(rng, out.shape, BF16)
    got = _on("avx512bf16", lambda: fastnn.scaled_dot_product_attention_backward(g, q, k, v, out, lse, **bw))
    wanted = ref.scaled_dot_product_attention_backward(g, q, k, v, want[0], want[1], **bw)
    for x, w in zip(got, wanted):
        close(x, w, BF16, 2 * (S + E + L))


@needs_bf16_path
@pytest.mark.parametrize("case", list(OUTSIDE))
@pytest.mark.parametrize("where", ["query", "key", "value"])
def test_bf16_attention_leaves_what_it_would_get_wrong_to_float32(rng, case, where):
    # An operand with a value outside the dot product's exact range: the whole call runs the float32 kernel
    # on widened copies, so it is the avx512 path's result bit for bit (NaN and inf as PyTorch defines them).
    q, k, v = half(rng, (2, 70, 20), BF16), half(rng, (2, 140, 20), BF16), half(rng, (2, 140, 12), BF16)
    {"query": q, "key": k, "value": v}[where][1, 5, 3] = OUTSIDE[case][0]
    g = half(rng, (2, 70, 12), BF16)
    for causal in (False, True):
        a = _on("avx512", lambda: fastnn.scaled_dot_product_attention(q, k, v, is_causal=causal, return_lse=True))
        b = _on("avx512bf16", lambda: fastnn.scaled_dot_product_attention(q, k, v, is_causal=causal, return_lse=True))
        np.testing.assert_array_equal(b[0].view(np.uint16), a[0].view(np.uint16))
        np.testing.assert_array_equal(b[1], a[1])
        ga, gb = (_on(isa, lambda: fastnn.scaled_dot_product_attention_backward(g, q, k, v, *a, is_causal=causal))
                  for isa in ("avx512", "avx512bf16"))
        for x, y in zip(gb, ga):
            np.testing.assert_array_equal(x.view(np.uint16), y.view(np.uint16))


@needs_bf16_path
def test_bf16_attention_tiny_probabilities_count():
    # exp(-90) is a float32 subnormal the dot product would read as zero; here it carries the whole result
    # (the first key's value is 0): the kernel rounds P times 2^32 (a normal number) and scales back.
    q = np.array([[[1.0]]], np.float32).astype(BF16)
    k = np.array([[[0.0], [-90.0]]], np.float32).astype(BF16)
    v = np.array([[[0.0], [2.0**62]]], np.float32).astype(BF16)
    out, lse = _on("avx512bf16", lambda: fastnn.scaled_dot_product_attention(q, k, v, scale=1.0, return_lse=True))
    want = ref.scaled_dot_product_attention(q, k, v, scale=1.0)
    assert want[0, 0, 0] != 0
    close(out, want, BF16, 2)
    g = np.ones((1, 1, 1), np.float32).astype(BF16)
    v2 = np.array([[[0.0], [1.0]]], np.float32).astype(BF16)
    out2, lse2 = fastnn.scaled_dot_product_attention(q, k, v2, scale=1.0, return_lse=True)
    got = _on("avx512bf16", lambda: fastnn.scaled_dot_product_attention_backward(g, q, k, v2, out2, lse2, scale=1.0))
    wanted = ref.scaled_dot_product_attention_backward(g, q, k, v2, None, None, scale=1.0)
    assert wanted[0][0, 0, 0] != 0  # dQ = -7.4e-38: a normal float32
    for x, w in zip(got, wanted):
        close(x, w, BF16, 4)


@needs_bf16_path
def test_bf16_attention_backward_nan_lse_as_float32(rng):
    # A NaN lse row (a caller's, or a forward whose scores overflowed): the causal blocks the kernel would skip
    # must turn NaN as on the float32 path, bit for bit.
    q, k, v = half(rng, (1, 200, 16), BF16), half(rng, (1, 200, 16), BF16), half(rng, (1, 200, 16), BF16)
    out, lse = fastnn.scaled_dot_product_attention(q, k, v, is_causal=True, return_lse=True)
    lse[0, 0] = np.nan
    g = half(rng, out.shape, BF16)
    ga, gb = (_on(isa, lambda: fastnn.scaled_dot_product_attention_backward(g, q, k, v, out, lse, is_causal=True))
              for isa in ("avx512", "avx512bf16"))
    for x, y in zip(gb, ga):
        np.testing.assert_array_equal(x.view(np.uint16), y.view(np.uint16))


@needs_bf16_path
@pytest.mark.parametrize("case", ["inf", "nan"])
@pytest.mark.parametrize("where", ["grad_output", "output"])
def test_bf16_attention_backward_leaves_nonfinite_rows_to_float32(rng, case, where):
    # A non-finite grad_output or output row (D = dO . O not finite): the float32 kernel's exact rule, bit
    # for bit the avx512 path.
    q, k, v = half(rng, (2, 70, 20), BF16), half(rng, (2, 140, 20), BF16), half(rng, (2, 140, 12), BF16)
    out, lse = fastnn.scaled_dot_product_attention(q, k, v, return_lse=True)
    g = half(rng, out.shape, BF16)
    {"grad_output": g, "output": out}[where][1, 5, 3] = OUTSIDE[case][0]
    ga, gb = (_on(isa, lambda: fastnn.scaled_dot_product_attention_backward(g, q, k, v, out, lse))
              for isa in ("avx512", "avx512bf16"))
    for x, y in zip(gb, ga):
        np.testing.assert_array_equal(x.view(np.uint16), y.view(np.uint16))


@pytest.mark.parametrize("dtype", HALF)
def test_attention_noncontiguous_nonfinite(isa, rng, dtype):
    q = half(rng, (2, 19, 12), dtype, "step")
    k = half(rng, (2, 23, 12), dtype, "T")
    v = half(rng, (2, 23, 7), dtype, "neg")
    close(fastnn.scaled_dot_product_attention(q, k, v), ref.scaled_dot_product_attention(q, k, v), dtype, 35)
    k = with_specials(k)
    close(fastnn.scaled_dot_product_attention(q, k, v, is_causal=True),
          ref.scaled_dot_product_attention(q, k, v, is_causal=True), dtype, 35)


# ---- Adam ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("states", ["float32", "half"])
@pytest.mark.parametrize("kw", [{}, {"weight_decay": 0.1, "decoupled_weight_decay": True},
                                {"weight_decay": 0.01, "amsgrad": True}])
def test_adam_steps_against_the_oracle(isa, threads, rng, dtype, states, kw):
    kw = dict(kw)
    ams = kw.pop("amsgrad", False)
    n = 70_001  # several threads' chunks and a tail
    sdt = np.float32 if states == "float32" else dtype
    p = half(rng, (n,), dtype)
    m, v = np.zeros(n, sdt), np.zeros(n, sdt)
    vmax = np.zeros(n, sdt) if ams else None
    for step in range(1, 4):
        g = half(rng, (n,), dtype)
        rp, rm, rv = p.copy(), m.copy(), v.copy()
        rvmax = None if vmax is None else vmax.copy()
        fastnn.adam_update(p, g, m, v, step=step, lr=1e-2, max_exp_avg_sq=vmax, **kw)
        ref.adam_update(rp, g, rm, rv, step=step, lr=1e-2, max_exp_avg_sq=rvmax, **kw)
        # one step from the same inputs: each result is one rounding of a float32 computation
        close(p, rp, dtype)
        close(m, rm, np.dtype(sdt))
        close(v, rv, np.dtype(sdt))
        p, m, v, vmax = rp, rm, rv, rvmax  # continue from the oracle's state


@pytest.mark.parametrize("dtype", HALF)
def test_adam_mixed_moment_dtypes(rng, dtype):
    p, g = half(rng, (1001,), dtype), half(rng, (1001,), dtype)
    m, v = half(rng, (1001,), np.float32) * 0.1, np.abs(half(rng, (1001,), dtype))
    rp, rm, rv = p.copy(), m.copy(), v.copy()
    fastnn.adam_update(p, g, m, v, step=3, lr=1e-2)
    ref.adam_update(rp, g, rm, rv, step=3, lr=1e-2)
    close(p, rp, dtype)
    close(m, rm, np.dtype(np.float32))
    close(v, rv, dtype)


def test_adam_bf16_params_float32_states_against_torch(threads):
    """20 steps on bfloat16 parameters with float32 moments against torch.optim.Adam on a float32 copy of
    the parameters that is rounded to bfloat16 after every step: the same arithmetic (float32 moments, the
    parameter widened, updated in float32 and rounded to nearest even)."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    n = 4099
    p = torch.randn(n, generator=gen).bfloat16()
    tp = p.float().clone().requires_grad_(True)
    opt = torch.optim.Adam([tp], lr=1e-2, weight_decay=0.01)
    m, v = torch.zeros(n), torch.zeros(n)
    for step in range(1, 21):
        g = torch.randn(n, generator=gen).bfloat16()
        fastnn.adam_update(p, g, m, v, step=step, lr=1e-2, weight_decay=0.01)
        tp.grad = g.float()
        opt.step()
        with torch.no_grad():
            tp.copy_(tp.bfloat16().float())
    st = opt.state[tp]
    assert p.dtype == torch.bfloat16 and m.dtype == torch.float32
    # bfloat16 parameters: at most one ulp apart where float32 rounding order differs near a tie
    diff = (p.float() - tp.detach()).abs()
    assert (diff <= 2.0 ** -7 * tp.detach().abs()).all()
    assert (p.float() != tp.detach()).float().mean() < 0.01
    assert torch.allclose(m, st["exp_avg"], rtol=1e-5, atol=1e-7)
    assert torch.allclose(v, st["exp_avg_sq"], rtol=1e-5, atol=1e-9)


# ---- torch and JAX arrays ------------------------------------------------------------------------------

def _all_ops(x, w, q, g, lab):
    """Every op on one dtype's arrays, as (name, result) pairs of arrays (numpy, torch or JAX)."""
    out, lse = fastnn.scaled_dot_product_attention(q, q, q, return_lse=True)
    return [
        ("matmul", fastnn.matmul(x, w)), ("linear", fastnn.linear(x, w, activation="relu")),
        ("linear_backward", fastnn.linear_backward(g, x, w)[1]),
        ("relu", fastnn.relu(x)), ("relu_backward", fastnn.relu_backward(x, x)),
        ("softmax", fastnn.softmax(x)), ("log_softmax", fastnn.log_softmax(x)),
        ("softmax_backward", fastnn.softmax_backward(x, x)),
        ("cross_entropy", fastnn.cross_entropy(x, lab, reduction="none")[1]),
        ("attention", out), ("attention_backward", fastnn.scaled_dot_product_attention_backward(
            q, q, q, q, out, lse)[0]),
    ]


@pytest.mark.parametrize("lib", ["torch", "jax"])
@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_torch_and_jax_arrays_give_the_numpy_results(rng, lib, name):
    dtype = BF16 if name == "bfloat16" else F16
    x, w, q, g = (half(rng, s, dtype) for s in ((9, 12), (12, 12), (2, 5, 12), (9, 12)))
    lab = np.arange(x.shape[0]) % x.shape[1]
    want = _all_ops(x, w, q, g, lab)
    if lib == "torch":
        torch = pytest.importorskip("torch")
        tdt = getattr(torch, name)
        conv = (lambda a: torch.from_numpy(a.astype(np.float32)).to(tdt) if a.dtype == dtype else torch.from_numpy(a))
        back = (lambda t: t.float().numpy())
        is_lib = (lambda t: isinstance(t, torch.Tensor) and t.dtype == tdt)
    else:
        jnp = pytest.importorskip("jax.numpy")
        conv = (lambda a: jnp.asarray(a))
        back = (lambda t: np.asarray(t).astype(np.float32))
        is_lib = (lambda t: type(t).__module__.startswith("jax") and t.dtype == dtype)
    got = _all_ops(*(conv(a) for a in (x, w, q, g, lab)))
    for (op, r), (_, t) in zip(want, got):
        assert is_lib(t), f"{op}: got {type(t)} {getattr(t, 'dtype', '')}"
        assert np.array_equal(back(t), r.astype(np.float32), equal_nan=True), op


def test_torch_bf16_noncontiguous_and_in_place():
    torch = pytest.importorskip("torch")
    x = torch.randn(8, 6).bfloat16()
    xt = x.t()
    y = fastnn.relu(xt)
    assert y.dtype == torch.bfloat16 and torch.equal(y, torch.relu(xt))
    out = torch.empty_like(x)
    assert fastnn.relu(x, out=out) is out and torch.equal(out, torch.relu(x))
    p, g = torch.randn(10).bfloat16(), torch.randn(10).bfloat16()
    m, v = torch.zeros(10, dtype=torch.bfloat16), torch.zeros(10, dtype=torch.bfloat16)
    before = p.clone()
    fastnn.adam_update(p, g, m, v, step=1, lr=0.1)
    assert not torch.equal(p, before) and m.abs().sum() > 0


# ---- errors --------------------------------------------------------------------------------------------

def test_mixed_and_other_dtypes_are_type_errors(rng):
    x = half(rng, (3, 4), BF16)
    with pytest.raises(TypeError, match="b: dtype float32 does not match a's dtype bfloat16"):
        fastnn.matmul(x, np.ones((4, 2), np.float32))
    with pytest.raises(TypeError, match="b: dtype float16 does not match a's dtype bfloat16"):
        fastnn.matmul(x, np.ones((4, 2), np.float16))
    with pytest.raises(TypeError, match="expected a float32, float64, float16 or bfloat16 array"):
        fastnn.relu(np.ones(3, ml_dtypes.float8_e4m3fn))
    p = half(rng, (5,), BF16)
    with pytest.raises(TypeError, match="exp_avg: expected a float32 or bfloat16 array"):
        fastnn.adam_update(p, p.copy(), np.zeros(5, np.float64), np.zeros(5, np.float32), step=1)
    with pytest.raises(TypeError, match="attn_mask: expected dtype bool or bfloat16"):
        fastnn.scaled_dot_product_attention(x, x, x, attn_mask=np.zeros((3, 3), np.float32))
    with pytest.raises(TypeError, match="lse: expected a float32 array"):
        fastnn.scaled_dot_product_attention_backward(x, x, x, x, x, np.zeros(3, BF16))
