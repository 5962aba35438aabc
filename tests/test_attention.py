"""scaled_dot_product_attention against the oracle: 2-D/3-D/4-D, L != S, Ev != E, odd head dims, masks
(bool and float, broadcast), is_causal (top-left), fully masked rows, GQA, scale, views, errors."""
import os
import subprocess
import sys

import numpy as np
import pytest

import fastnn
from fastnn import reference as ref
from conftest import DTYPES, LAYOUTS, Unchanged, assert_close, f64, make_array, pkg_env, tolerance
from gpu_helpers import GPU_DTYPES, GPU_TOL, attn_inputs, cp, gpu, gpu_check, needs_gpu, rand

sdpa = fastnn.scaled_dot_product_attention


def oracle(q, k, v, mask=None, **kw):
    m = mask if mask is None or mask.dtype == np.bool_ else f64(mask)
    return ref.scaled_dot_product_attention(*f64(q, k, v), attn_mask=m, **kw)


def check_sdpa(rng, q_shape, k_shape, v_shape, dtype, mask=None, layout="C", **kw):
    q = make_array(rng, q_shape, dtype, layout)
    k = make_array(rng, k_shape, dtype, layout)
    v = make_array(rng, v_shape, dtype, layout)
    keep = Unchanged(q, k, v, mask)
    got = sdpa(q, k, v, attn_mask=mask, **kw)
    keep.check()
    expected = oracle(q, k, v, mask, **kw)
    assert_close(got, expected, dtype, k=q_shape[-1] + k_shape[-2])
    return got, expected


def random_bool_mask(rng, shape, p_allowed=0.7):
    return rng.random(shape) < p_allowed


def random_float_mask(rng, shape, dtype):
    m = rng.standard_normal(shape).astype(dtype)
    m[rng.random(shape) < 0.2] = -np.inf
    return m


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("l,s,e,ev", [
    (1, 1, 1, 1), (1, 7, 13, 13), (7, 1, 13, 5), (16, 16, 16, 16), (17, 15, 31, 33), (15, 17, 32, 32),
    (33, 65, 64, 64), (65, 63, 64, 17), (31, 129, 59, 59), (13, 257, 111, 111), (97, 33, 8, 128),
])
def test_sdpa_2d(rng, dtype, l, s, e, ev):
    check_sdpa(rng, (l, e), (s, e), (s, ev), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_shape,k_shape,v_shape", [
    ((3, 17, 16), (3, 33, 16), (3, 33, 16)),
    ((5, 1, 7), (5, 9, 7), (5, 9, 3)),
    ((2, 3, 33, 64), (2, 3, 65, 64), (2, 3, 65, 32)),
    ((1, 4, 97, 59), (1, 4, 31, 59), (1, 4, 31, 59)),
    ((2, 2, 5, 111), (2, 2, 13, 111), (2, 2, 13, 111)),
    # leading dimensions broadcast as in matmul
    ((2, 1, 9, 8), (3, 11, 8), (3, 11, 5)),
    ((2, 3, 9, 8), (1, 3, 11, 8), (2, 1, 11, 8)),
    ((9, 8), (4, 11, 8), (4, 11, 8)),
    ((4, 9, 8), (11, 8), (11, 6)),
])
def test_sdpa_batched(rng, dtype, q_shape, k_shape, v_shape):
    check_sdpa(rng, q_shape, k_shape, v_shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_long_keys(rng, dtype):
    # flash-attention's awkward sizes: L = 97, S = 1025, head dims 59 and 111.
    check_sdpa(rng, (1, 2, 97, 59), (1, 2, 1025, 59), (1, 2, 1025, 111), dtype)
    check_sdpa(rng, (1, 1, 97, 111), (1, 1, 1025, 111), (1, 1, 1025, 59), dtype, is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_core_every_isa(isa, rng, dtype):
    for l, s, e, ev in [(1, 1, 1, 1), (7, 13, 16, 16), (17, 33, 15, 17), (33, 65, 64, 64), (9, 300, 59, 111)]:
        check_sdpa(rng, (2, l, e), (2, s, e), (2, s, ev), dtype)
        check_sdpa(rng, (l, e), (s, e), (s, ev), dtype, is_causal=True)
        check_sdpa(rng, (l, e), (s, e), (s, ev), dtype, mask=random_bool_mask(rng, (l, s)))
        check_sdpa(rng, (l, e), (s, e), (s, ev), dtype, mask=random_float_mask(rng, (l, s), dtype))
    check_sdpa(rng, (2, 4, 9, 16), (2, 2, 17, 16), (2, 2, 17, 16), dtype, enable_gqa=True, layout="step")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sdpa_layouts(rng, dtype, layout):
    check_sdpa(rng, (2, 3, 13, 24), (2, 3, 19, 24), (2, 3, 19, 10), dtype, layout=layout)
    check_sdpa(rng, (13, 24), (19, 24), (19, 10), dtype, layout=layout, is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_mixed_layouts(rng, dtype):
    q = make_array(rng, (2, 11, 16), dtype, "F")
    k = make_array(rng, (2, 23, 16), dtype, "neg")
    v = make_array(rng, (2, 23, 9), dtype, "T")
    mask = random_bool_mask(rng, (46, 11))[::-2].T  # non-contiguous mask (11, 23)
    assert_close(sdpa(q, k, v, attn_mask=mask), oracle(q, k, v, mask), dtype, k=16 + 23)
    fmask = np.asfortranarray(random_float_mask(rng, (11, 23), dtype))
    assert_close(sdpa(q, k, v, attn_mask=fmask), oracle(q, k, v, fmask), dtype, k=16 + 23)


MASK_SHAPES = [(13, 21), (1, 21), (1, 1, 1, 21), (2, 1, 13, 21), (3, 13, 21), (2, 3, 13, 21), (13, 1), ()]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_shape", MASK_SHAPES)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_mask_broadcast(rng, dtype, mask_shape, kind):
    if kind == "bool":
        mask = np.asarray(random_bool_mask(rng, mask_shape, 0.8))
    else:
        mask = np.asarray(random_float_mask(rng, mask_shape, dtype))
    check_sdpa(rng, (2, 3, 13, 16), (2, 3, 21, 16), (2, 3, 21, 8), dtype, mask=mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_fully_masked_rows_give_zeros(rng, dtype, kind):
    l, s = 9, 17
    allowed = random_bool_mask(rng, (2, l, s))
    allowed[0, 3, :] = False
    allowed[1, 0, :] = False
    allowed[1, 8, :] = False
    if kind == "bool":
        mask = allowed
    else:
        mask = np.where(allowed, rng.standard_normal((2, l, s)), -np.inf).astype(dtype)
    got, expected = check_sdpa(rng, (2, l, 32), (2, s, 32), (2, s, 7), dtype, mask=mask)
    assert np.all(np.isfinite(got))
    for b, i in [(0, 3), (1, 0), (1, 8)]:
        assert np.all(got[b, i] == 0), f"fully masked row ({b}, {i}) should be zeros, got {got[b, i]}"
    assert np.count_nonzero(got[0, 4]) > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_all_masked(rng, dtype):
    q = make_array(rng, (3, 5, 8), dtype)
    k = make_array(rng, (3, 6, 8), dtype)
    v = make_array(rng, (3, 6, 4), dtype)
    got = sdpa(q, k, v, attn_mask=np.zeros((5, 6), bool))
    assert got.shape == (3, 5, 4) and got.dtype == np.dtype(dtype)
    assert np.all(got == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("l,s", [(1, 1), (7, 7), (5, 19), (19, 5), (33, 65), (65, 33), (97, 97), (1, 40), (40, 1)])
def test_sdpa_causal(rng, dtype, l, s):
    got, _ = check_sdpa(rng, (2, 2, l, 16), (2, 2, s, 16), (2, 2, s, 12), dtype, is_causal=True)
    # Top-left alignment: query row 0 sees only key 0.
    q = make_array(rng, (l, 16), dtype)
    k = make_array(rng, (s, 16), dtype)
    v = make_array(rng, (s, 12), dtype)
    got = sdpa(q, k, v, is_causal=True)
    assert_close(got[0], v[0].astype(np.float64), dtype)
    # ... and is_causal equals the explicit tril mask.
    explicit = sdpa(q, k, v, attn_mask=np.tril(np.ones((l, s), bool)))
    assert_close(got, explicit.astype(np.float64), dtype, k=16 + s)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 4), (6, 1), (6, 3), (2, 1)])
def test_sdpa_gqa(rng, dtype, hq, hkv):
    got, _ = check_sdpa(rng, (2, hq, 11, 16), (2, hkv, 19, 16), (2, hkv, 19, 24), dtype, enable_gqa=True)
    # Query head h uses key/value head h // (hq // hkv): compare one head against plain attention.
    q = make_array(rng, (1, hq, 5, 8), dtype)
    k = make_array(rng, (1, hkv, 7, 8), dtype)
    v = make_array(rng, (1, hkv, 7, 3), dtype)
    got = sdpa(q, k, v, enable_gqa=True)
    h = hq - 1
    single = oracle(q[0, h], k[0, h // (hq // hkv)], v[0, h // (hq // hkv)])
    assert_close(got[0, h], single, dtype, k=15)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_gqa_with_mask_and_causal(rng, dtype):
    check_sdpa(rng, (2, 4, 13, 16), (2, 2, 21, 16), (2, 2, 21, 16), dtype, enable_gqa=True,
               mask=random_bool_mask(rng, (13, 21)))
    check_sdpa(rng, (2, 4, 13, 16), (2, 2, 21, 16), (2, 2, 21, 16), dtype, enable_gqa=True,
               mask=random_float_mask(rng, (2, 4, 13, 21), dtype))
    check_sdpa(rng, (1, 6, 21, 16), (1, 2, 13, 16), (1, 2, 13, 16), dtype, enable_gqa=True, is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.0, 0.125, 1.0, 3.0, -0.5])
def test_sdpa_scale(rng, dtype, scale):
    got, _ = check_sdpa(rng, (3, 9, 32), (3, 17, 32), (3, 17, 5), dtype, scale=scale)
    if scale == 0.0:  # uniform weights: every row is the mean of v's rows
        v = make_array(rng, (17, 5), dtype)
        got = sdpa(make_array(rng, (4, 8), dtype), make_array(rng, (17, 8), dtype), v, scale=0.0)
        assert_close(got, np.broadcast_to(f64(v).mean(axis=0), (4, 5)), dtype, k=17)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_default_scale_is_inv_sqrt_e(rng, dtype):
    q = make_array(rng, (7, 36), dtype)
    k = make_array(rng, (9, 36), dtype)
    v = make_array(rng, (9, 4), dtype)
    assert_close(sdpa(q, k, v), sdpa(q, k, v, scale=1 / 6).astype(np.float64), dtype, k=45)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_large_scores(rng, dtype):
    # Sharp attention: scores of magnitude ~1e2..1e4 must not overflow; the online softmax rescales.
    q = make_array(rng, (2, 17, 16), dtype, scale=30.0)
    k = make_array(rng, (2, 300, 16), dtype, scale=30.0)
    v = make_array(rng, (2, 300, 8), dtype)
    got = sdpa(q, k, v)
    expected = oracle(q, k, v)
    assert np.all(np.isfinite(got))
    # Score rounding is amplified by exp: allow ~3x a plain same-precision NumPy implementation's error.
    naive = ref.scaled_dot_product_attention(q, k, v).astype(np.float64)
    naive_err = np.linalg.norm(naive - expected) / np.linalg.norm(expected)
    err = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert err <= max(3 * naive_err, tolerance(dtype, 316)), (err, naive_err)
    # A float mask with huge values is added to the scores before the max.
    mask = np.zeros((17, 300), dtype)
    mask[:, 7] = 1e4 if dtype == np.float32 else 1e30
    got = sdpa(q * 0, k, v, attn_mask=mask)
    assert_close(got, np.broadcast_to(f64(v)[:, 7:8, :], got.shape), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_nan(rng, dtype):
    q = make_array(rng, (2, 6, 8), dtype)
    k = make_array(rng, (2, 10, 8), dtype)
    v = make_array(rng, (2, 10, 4), dtype)
    q[0, 2, 3] = np.nan   # one query row -> that output row is NaN
    k[1, 4, 0] = np.nan   # one key in batch 1 -> every row of batch 1 is NaN
    got = sdpa(q, k, v)
    expected = oracle(q, k, v)
    assert np.isnan(expected[0, 2]).all() and np.isnan(expected[1]).all() and np.isfinite(expected[0, 3]).all()
    assert_close(got, expected, dtype, k=18)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_shape,k_shape,v_shape,out_shape", [
    ((0, 8), (5, 8), (5, 3), (0, 3)),
    ((2, 0, 8), (2, 5, 8), (2, 5, 3), (2, 0, 3)),
    ((0, 2, 4, 8), (0, 2, 5, 8), (0, 2, 5, 3), (0, 2, 4, 3)),
    ((4, 8), (5, 8), (5, 0), (4, 0)),
])
def test_sdpa_empty(dtype, q_shape, k_shape, v_shape, out_shape):
    got = sdpa(np.ones(q_shape, dtype), np.ones(k_shape, dtype), np.ones(v_shape, dtype))
    assert got.shape == out_shape and got.dtype == np.dtype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_no_keys_gives_zeros(dtype):
    # S = 0: no key to attend, like a fully masked row.
    got = sdpa(np.ones((4, 8), dtype), np.ones((0, 8), dtype), np.ones((0, 3), dtype))
    assert got.shape == (4, 3) and np.all(got == 0)


def test_sdpa_errors():
    f32 = np.float32
    q = np.ones((2, 4, 5, 8), f32)
    k = np.ones((2, 4, 6, 8), f32)
    v = np.ones((2, 4, 6, 3), f32)
    with pytest.raises(ValueError, match="is_causal|attn_mask"):
        sdpa(q, k, v, attn_mask=np.ones((5, 6), bool), is_causal=True)
    with pytest.raises(ValueError, match="dropout"):
        sdpa(q, k, v, dropout_p=1.0)  # dropout_p must be in [0, 1)
    with pytest.raises(ValueError, match="attn_mask"):
        sdpa(q, k, v, attn_mask=np.ones((5, 7), bool))
    with pytest.raises(ValueError, match="attn_mask"):
        sdpa(q, k, v, attn_mask=np.ones((3, 5, 6), f32))
    # A mask may broadcast to the scores' shape, not past it (more dims), empty or not.
    e = np.ones((0, 4, 5, 8), f32)
    for shape in [(1, 4, 5, 6), (0, 4, 5, 6), (5, 6), ()]:
        assert sdpa(e, k[:0], v[:0], attn_mask=np.ones(shape, bool)).shape == (0, 4, 5, 3)
    with pytest.raises(ValueError, match="attn_mask"):
        sdpa(q, k, v, attn_mask=np.ones((1, 2, 4, 5, 6), bool))
    with pytest.raises(ValueError, match="attn_mask"):
        e = np.ones((0, 1, 1, 0), f32)
        sdpa(e, e, e, attn_mask=np.ones((1, 0, 1, 1, 1), bool))
    with pytest.raises(ValueError):  # E of query and key differ
        sdpa(q, np.ones((2, 4, 6, 7), f32), v)
    with pytest.raises(ValueError):  # S of key and value differ
        sdpa(q, k, np.ones((2, 4, 7, 3), f32))
    with pytest.raises(ValueError):  # batch dims not broadcastable
        sdpa(q, np.ones((3, 4, 6, 8), f32), np.ones((3, 4, 6, 3), f32))
    with pytest.raises(ValueError):  # 1-D query
        sdpa(np.ones(8, f32), np.ones((6, 8), f32), np.ones((6, 3), f32))
    kv2 = np.ones((2, 2, 6, 8), f32)
    with pytest.raises(ValueError, match="enable_gqa=True"):  # head mismatch without enable_gqa: the hint
        sdpa(np.ones((2, 8, 5, 8), f32), kv2, kv2)
    with pytest.raises(ValueError):  # Hq not divisible by Hkv
        sdpa(np.ones((2, 5, 5, 8), f32), kv2, kv2, enable_gqa=True)
    with pytest.raises(ValueError):  # key and value head counts differ
        sdpa(np.ones((2, 4, 5, 8), f32), kv2, np.ones((2, 4, 6, 8), f32), enable_gqa=True)


@pytest.mark.parametrize("bad", [np.int32, np.int16, np.complex64, np.bool_, object])
def test_sdpa_bad_dtype(bad):
    good = np.ones((4, 8), np.float32)
    x = np.ones((4, 8), dtype=bad)
    for args in [(x, good, good), (good, x, good), (good, good, x)]:
        with pytest.raises(TypeError):
            sdpa(*args)


def test_sdpa_mixed_dtypes():
    a = np.ones((4, 8), np.float32)
    b = np.ones((4, 8), np.float64)
    with pytest.raises(TypeError):
        sdpa(a, b, a)
    with pytest.raises(TypeError):
        sdpa(a, a, b)
    with pytest.raises(TypeError, match="attn_mask"):
        sdpa(a, a, a, attn_mask=np.zeros((4, 4), np.float64))
    with pytest.raises(TypeError, match="attn_mask"):
        sdpa(a, a, a, attn_mask=np.zeros((4, 4), np.int32))


LONG_CHILD = r"""
import resource, sys
import numpy as np
import fastnn

L, E = 16384, 64
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 1, L, E)).astype(np.float32) for _ in range(3))

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
try:
    with open("/proc/self/clear_refs", "w") as f:   # resets the peak RSS (VmHWM) to the current RSS
        f.write("5")
except OSError:
    print("skip")
    sys.exit(0)
before = status("VmRSS")
out = fastnn.scaled_dot_product_attention(q, k, v)
print(status("VmHWM") - before)
rows = [0, 1, 4097, L - 1]
s = (q[0, 0, rows].astype(np.float64) @ k[0, 0].T.astype(np.float64)) / np.sqrt(E)
p = np.exp(s - s.max(axis=1, keepdims=True))
want = (p / p.sum(axis=1, keepdims=True)) @ v[0, 0].astype(np.float64)
print(np.linalg.norm(out[0, 0, rows] - want) / np.linalg.norm(want))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_sdpa_long_sequence_memory_stays_bounded():
    # L = S = 16384, one head of 64: the scores alone would be 1 GiB; flash-style tiling keeps the extra
    # memory (workspaces and the 4 MiB output) far below 64 MiB. Measured in a child process, whose peak
    # RSS can be reset just before the call.
    if os.environ.get("FASTNN_SANITIZED"):
        pytest.skip("not under the sanitizers (shadow memory)")
    proc = subprocess.run([sys.executable, "-c", LONG_CHILD], capture_output=True, text=True, env=pkg_env(),
                          cwd=os.path.dirname(os.path.abspath(__file__)), timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    if lines == ["skip"]:
        pytest.skip("the peak RSS cannot be reset here")
    extra, err = int(lines[0]), float(lines[1])
    assert extra < 64 << 20, f"the call raised the peak RSS by {extra / 2**20:.1f} MiB"
    assert err < 1e-5


# ---- on the GPU: cupy arrays, fast and plain kernels, float32 and float16 (skipped, with the reason, without a usable GPU) ----

@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("dims", [(1, 1, 1, 1), (97, 97, 59, 59), (64, 64, 64, 64), (65, 130, 111, 47),
                                  (33, 1025, 128, 128), (7, 5, 16, 16), (5, 300, 256, 64)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_gpu(rng, variant, dtype, dims, causal):
    L, S, E, Ev = dims
    q, k, v = attn_inputs(rng, dtype, (2, 3), L, S, E, Ev)
    out, lse = fastnn.scaled_dot_product_attention(gpu(q), gpu(k), gpu(v), is_causal=causal, return_lse=True)
    want, want_lse = ref.scaled_dot_product_attention(f64(q), f64(k), f64(v), is_causal=causal, return_lse=True)
    gpu_check(out, want, dtype)
    gpu_check(lse, want_lse, np.float32, tol=GPU_TOL[dtype])   # lse is float32 for float16 inputs too


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_masks_and_fully_masked_rows_gpu(rng, variant, dtype, kind):
    L, S, E = 70, 97, 40
    q, k, v = attn_inputs(rng, dtype, (2, 2), L, S, E, E)
    allowed = rng.random((2, 1, L, S)) > 0.3          # broadcast over heads
    allowed[0, 0, 5] = False                           # fully masked rows: zeros
    allowed[1, 0, :, 64:] = False                      # a masked key tile edge
    if kind == "bool":
        mask = allowed
    else:
        mask = np.where(allowed, rng.standard_normal(allowed.shape), -np.inf).astype(dtype)
    got = fastnn.scaled_dot_product_attention(gpu(q), gpu(k), gpu(v), attn_mask=gpu(mask))
    want = ref.scaled_dot_product_attention(f64(q), f64(k), f64(v), attn_mask=mask if kind == "bool" else f64(mask))
    gpu_check(got, want, dtype)
    assert not cp.asnumpy(got)[0, :, 5].any()


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_sdpa_gqa_broadcast_views_scale_gpu(rng, variant, dtype):
    q, k, v = attn_inputs(rng, dtype, (2, 6), 50, 77, 32, 24, hk=2)
    got = fastnn.scaled_dot_product_attention(gpu(q), gpu(k), gpu(v), enable_gqa=True, scale=0.3)
    want = ref.scaled_dot_product_attention(f64(q), f64(k), f64(v), enable_gqa=True, scale=0.3)
    gpu_check(got, want, dtype)
    # a key/value shared by every batch (broadcast) and a transposed-then-transposed query view
    q2 = rand(rng, (3, 2, 40, 24), dtype)
    k2, v2 = rand(rng, (40, 24), dtype), rand(rng, (40, 16), dtype)
    qv = gpu(np.ascontiguousarray(np.swapaxes(q2, -1, -2))).swapaxes(-1, -2)
    gpu_check(fastnn.scaled_dot_product_attention(qv, gpu(k2), gpu(v2), is_causal=True),
          ref.scaled_dot_product_attention(f64(q2), f64(k2), f64(v2), is_causal=True), dtype)


@needs_gpu
def test_sdpa_errors_gpu():
    q = gpu(np.ones((2, 4, 8), np.float32))
    with pytest.raises(TypeError, match="^key: got a numpy.ndarray"):
        fastnn.scaled_dot_product_attention(q, np.ones((2, 4, 8), np.float32), q)
    with pytest.raises(ValueError, match="dropout_p"):
        fastnn.scaled_dot_product_attention(q, q, q, dropout_p=1.0)
    with pytest.raises(ValueError, match="lse: expected shape"):
        fastnn.scaled_dot_product_attention_backward(q, q, q, q, q, q)


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"mask": "bool"}, {"mask": "float"}, {"enable_gqa": True}],
                         ids=str)
def test_sdpa_backward_matches_the_cpu_gpu(rng, dtype, kw):
    kw = dict(kw)
    q, k, v = attn_inputs(rng, dtype, (2, 4), 37, 45, 24, 16, hk=2 if kw.get("enable_gqa") else None)
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
        gpu_check(a, b, dtype, tol=GPU_TOL[dtype] * (1 if dtype == np.float32 else 20))
