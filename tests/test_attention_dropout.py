"""Dropout inside scaled_dot_product_attention: the Philox bits (known answers), kernel = oracle element for
element with the same seed, independence of ISA path and thread count, the kept fraction, the backward
against finite differences and torch.autograd for a fixed mask, the rng / rng_state arguments, p = 0."""
import math

import numpy as np
import pytest

import fastnn
from fastnn import reference as ref
from fastnn._dropout import Dropout, forward_dropout, keep_mask, philox4x32_10
from conftest import DTYPES, Unchanged, assert_close, f64, make_array
from gpu_helpers import GPU_DTYPES, GPU_TOL, attn_inputs, cp, gpu, gpu_check, needs_gpu, rand
from test_gradcheck import _sdpa_case, _torch_grads, assert_grad

sdpa = fastnn.scaled_dot_product_attention
sdpa_backward = fastnn.scaled_dot_product_attention_backward


# Random123's published known-answer vectors for Philox-4x32-10: (counter, key, output).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,want", PHILOX_KAT)
def test_philox_known_answers(counter, key, want):
    got = philox4x32_10(np, [np.uint64(c) for c in counter], key)
    assert tuple(int(x) for x in got) == want


def test_philox_broadcasts_over_arrays():
    # The vectorised form gives each element what the scalar form gives it.
    c0 = np.arange(5, dtype=np.uint64)[:, None]
    c1 = np.array([0, 7, 2**32 - 1], dtype=np.uint64)[None, :]
    words = philox4x32_10(np, [np.broadcast_to(c, (5, 3)) for c in (c0, c1, np.uint64(3), np.uint64(9))], (11, 12))
    for a in range(5):
        for b in range(3):
            one = philox4x32_10(np, [np.uint64(a), c1[0, b], np.uint64(3), np.uint64(9)], (11, 12))
            assert [int(w[a, b]) for w in words] == [int(x) for x in one]


def _mask_from_kernel(dtype, nb, L, S, p, seed, isa_threads=None):
    """The kernel's keep mask, read off its output: query 0 gives equal probabilities 1/S, and value = I
    makes output (b, i, j) = keep * 1 / ((1 - p) S)."""
    q = np.zeros((nb, L, 4), dtype)
    k = np.ones((nb, S, 4), dtype)
    v = np.broadcast_to(np.eye(S, dtype=dtype), (nb, S, S))
    out = sdpa(q, k, v, dropout_p=p, rng=seed)
    scaled = out * ((1 - p) * S)
    assert np.all((np.abs(scaled) < 1e-3) | (np.abs(scaled - 1) < 1e-3))
    return scaled > 0.5


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction_within_binomial_bounds(p):
    nb, L, S = 3, 67, 129
    keep = _mask_from_kernel(np.float64, nb, L, S, p, 99)
    n = keep.size
    kept = int(keep.sum())
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) <= 5 * sigma, f"kept {kept} of {n}, expected {n * (1 - p):.0f} +- {5 * sigma:.0f}"
    # Each row and each column is its own binomial too: none may be far off (catches a stuck lane or word).
    for axis, m in ((2, S), (1, L)):
        frac = keep.mean(axis=axis)
        assert np.all(np.abs(frac - (1 - p)) <= 6 * math.sqrt(p * (1 - p) / m))
    # And it is the documented mask.
    want = keep_mask(np, forward_dropout(p, 99), range(nb), range(L), S)
    assert np.array_equal(keep, want)


# Shapes: 2-D, L and S odd and past the tiles (64 queries, 128 keys), S % 4 != 0 (a partial Philox group),
# broadcast batch, GQA, masks, causal with L != S.
CASES = {
    "2d": dict(q=(13, 8), k=(21, 8), v=(21, 5)),
    "tiles": dict(q=(2, 3, 131, 17), k=(2, 3, 257, 17), v=(2, 3, 257, 9)),
    "causal": dict(q=(2, 2, 97, 16), k=(2, 2, 70, 16), v=(2, 2, 70, 16), is_causal=True),
    "causal_square": dict(q=(1, 2, 150, 32), k=(1, 2, 150, 32), v=(1, 2, 150, 32), is_causal=True),
    "broadcast": dict(q=(3, 2, 9, 8), k=(1, 10, 8), v=(1, 10, 3)),
    "gqa": dict(q=(2, 4, 11, 8), k=(2, 2, 19, 8), v=(2, 2, 19, 8), enable_gqa=True),
    "bool_mask": dict(q=(2, 2, 33, 8), k=(2, 2, 35, 8), v=(2, 2, 35, 6), mask="bool"),
    "float_mask": dict(q=(2, 2, 33, 8), k=(2, 2, 35, 8), v=(2, 2, 35, 6), mask="float"),
}


def _case(rng, name, dtype):
    c = dict(CASES[name])
    q, k, v = (make_array(rng, c.pop(n), dtype) for n in ("q", "k", "v"))
    kind = c.pop("mask", None)
    if kind == "bool":
        c["attn_mask"] = rng.random((q.shape[-2], k.shape[-2])) < 0.7
        c["attn_mask"][3] = False   # a row with no allowed key
    elif kind == "float":
        c["attn_mask"] = rng.standard_normal((q.shape[-3], q.shape[-2], k.shape[-2])).astype(dtype)
    return q, k, v, c


def _oracle_kw(kw):
    m = kw.get("attn_mask")
    return dict(kw, attn_mask=m if m is None or m.dtype == np.bool_ else f64(m))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("p", [0.2, 0.75])
def test_forward_matches_oracle(rng, dtype, case, p):
    q, k, v, kw = _case(rng, case, dtype)
    keep = Unchanged(q, k, v, kw.get("attn_mask"))
    out, lse, state = sdpa(q, k, v, dropout_p=p, rng=12345, return_lse=True, **kw)
    keep.check()
    assert state == (12345, 0)
    want, want_lse, _ = ref.scaled_dot_product_attention(*f64(q, k, v), dropout_p=p, rng=state, return_lse=True,
                                                         **_oracle_kw(kw))
    if dtype == np.float64:
        # Element for element: a single differing mask bit would be an O(1) error.
        assert np.allclose(out, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    else:
        assert_close(out, want, dtype, k=q.shape[-1] + k.shape[-2])
    assert_close(lse, want_lse, dtype, k=q.shape[-1] + k.shape[-2])


@pytest.mark.parametrize("case", ["tiles", "causal_square", "gqa"])
def test_same_bits_on_every_isa_and_thread_count(isa, rng, restore_threads, case):
    for dtype in DTYPES:
        q, k, v, kw = _case(rng, case, dtype)
        results = []
        for threads in (1, 2):
            fastnn.set_num_threads(threads)
            out, lse, st = sdpa(q, k, v, dropout_p=0.4, rng=7, return_lse=True, **kw)
            g = np.ones_like(out)
            results.append((out, *sdpa_backward(g, q, k, v, out, lse, dropout_p=0.4, rng_state=st, **kw)))
        for a, b in zip(*results):
            assert np.array_equal(a, b), "the result depends on the thread count"
        want = ref.scaled_dot_product_attention(*f64(q, k, v), dropout_p=0.4, rng=7, **_oracle_kw(kw))
        assert_close(results[0][0], want, dtype, k=q.shape[-1] + k.shape[-2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["tiles", "causal", "gqa", "bool_mask", "broadcast"])
def test_backward_matches_oracle(rng, dtype, case):
    q, k, v, kw = _case(rng, case, dtype)
    out, lse, st = sdpa(q, k, v, dropout_p=0.3, rng=2024, return_lse=True, **kw)
    g = make_array(rng, out.shape, dtype)
    got = sdpa_backward(g, q, k, v, out, lse, dropout_p=0.3, rng_state=st, **kw)
    want = ref.scaled_dot_product_attention_backward(*f64(g, q, k, v, out, lse), dropout_p=0.3, rng_state=st,
                                                     **_oracle_kw(kw))
    for a, b in zip(got, want):
        if dtype == np.float64:
            assert np.allclose(a, b, rtol=1e-11, atol=1e-11 * max(np.abs(b).max(), 1e-300))
        else:
            assert_close(a, b, dtype, k=q.shape[-1] + k.shape[-2] + q.shape[-2])


@pytest.mark.parametrize("case", ["plain", "bool_mask", "causal", "causal_long_query", "gqa", "broadcast"])
@pytest.mark.parametrize("impl", ["fastnn", "reference"])
def test_backward_finite_differences(rng, case, impl):
    # With the rng_state fixed the forward is a deterministic function of q, k, v.
    mod = fastnn if impl == "fastnn" else ref
    q, k, v, kw = _sdpa_case(rng, case)
    out, lse, st = mod.scaled_dot_product_attention(q, k, v, dropout_p=0.4, rng=5, return_lse=True, **kw)
    w = rng.standard_normal(out.shape)
    grads = mod.scaled_dot_product_attention_backward(w, q, k, v, out, lse, dropout_p=0.4, rng_state=st, **kw)

    def f():
        return np.sum(w * mod.scaled_dot_product_attention(q, k, v, dropout_p=0.4, rng=st, **kw))

    for g, x, name in zip(grads, (q, k, v), ("query", "key", "value")):
        assert_grad(g, f, x, name)


@pytest.mark.parametrize("case", ["plain", "causal", "bool_mask", "float_mask", "broadcast"])
def test_backward_matches_torch_autograd_for_a_fixed_mask(rng, case):
    torch = pytest.importorskip("torch")
    q, k, v, kw = _sdpa_case(rng, case)
    p = 0.3
    out, lse, st = sdpa(q, k, v, dropout_p=p, rng=77, return_lse=True, **kw)
    w = rng.standard_normal(out.shape)
    got = sdpa_backward(w, q, k, v, out, lse, dropout_p=p, rng_state=st, **kw)
    L, S = q.shape[-2], k.shape[-2]
    nb = math.prod(out.shape[:-2])
    z = keep_mask(np, Dropout(math.floor(p * 2**32), 1 / (1 - p), *st), range(nb), range(L), S)
    z = torch.tensor(z.reshape(out.shape[:-2] + (L, S)) / (1 - p))
    tkw = {n: torch.tensor(a) if isinstance(a, np.ndarray) else a for n, a in kw.items()}

    def attention(a, b, c):
        # torch's own dropout draws its mask from torch's generator: here torch's softmax gives the
        # probabilities (dropout 0, value = I) and the fixed mask multiplies them.
        eye = torch.eye(S, dtype=torch.float64).expand(out.shape[:-2] + (S, S))
        probs = torch.nn.functional.scaled_dot_product_attention(a, b, eye, **tkw)
        return (probs * z) @ c

    want = _torch_grads(torch, attention, [q, k, v], w)
    for a, b in zip(got, want):
        assert_close(a, b, np.float64, k=S)
    assert_close(out, attention(*(torch.tensor(x) for x in (q, k, v))).detach().numpy(), np.float64, k=S)


def test_p_zero_is_the_plain_path(rng):
    q, k, v = (make_array(rng, (2, 3, 70, 16), np.float32) for _ in range(3))
    plain, plain_lse = sdpa(q, k, v, is_causal=True, return_lse=True)
    res = sdpa(q, k, v, dropout_p=0.0, is_causal=True, return_lse=True, rng=3)
    assert len(res) == 2
    assert np.array_equal(res[0], plain) and np.array_equal(res[1], plain_lse)
    g = make_array(rng, plain.shape, np.float32)
    a = sdpa_backward(g, q, k, v, plain, plain_lse, is_causal=True)
    b = sdpa_backward(g, q, k, v, plain, plain_lse, is_causal=True, dropout_p=0.0, rng_state=(1, 2))
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


def test_rng_forms(rng):
    q, k, v = (make_array(rng, (2, 9, 8), np.float64) for _ in range(3))
    # A Generator: one 64-bit seed drawn; the same generator state gives the same mask.
    g1, g2 = np.random.default_rng(4), np.random.default_rng(4)
    o1, _, s1 = sdpa(q, k, v, dropout_p=0.5, rng=g1, return_lse=True)
    o2, _, s2 = sdpa(q, k, v, dropout_p=0.5, rng=g2, return_lse=True)
    assert s1 == s2 == (int(np.random.default_rng(4).integers(0, 2**64, dtype=np.uint64)), 0)
    assert np.array_equal(o1, o2)
    # The next draw differs.
    o3, _, s3 = sdpa(q, k, v, dropout_p=0.5, rng=g1, return_lse=True)
    assert s3 != s1 and not np.array_equal(o3, o1)
    # A (seed, offset) pair replays a state; another offset or seed is another mask.
    assert np.array_equal(sdpa(q, k, v, dropout_p=0.5, rng=s1), o1)
    assert not np.array_equal(sdpa(q, k, v, dropout_p=0.5, rng=(s1[0], 1)), o1)
    assert not np.array_equal(sdpa(q, k, v, dropout_p=0.5, rng=s1[0] ^ 1), o1)
    # Seeds use all 64 bits (the high word is Philox's second key word).
    assert not np.array_equal(sdpa(q, k, v, dropout_p=0.5, rng=5), sdpa(q, k, v, dropout_p=0.5, rng=5 + 2**32))
    # None: fresh entropy, and the returned state replays it.
    o4, _, s4 = sdpa(q, k, v, dropout_p=0.5, return_lse=True)
    assert np.array_equal(sdpa(q, k, v, dropout_p=0.5, rng=s4), o4)


def test_dropout_errors():
    q = np.ones((2, 5, 8), np.float32)
    for p in (-0.1, 1.0, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="dropout_p"):
            sdpa(q, q, q, dropout_p=p)
    for p in ("0.1", None, True):
        with pytest.raises(TypeError, match="dropout_p"):
            sdpa(q, q, q, dropout_p=p)
    for bad in (1.5, "seed", object(), True):
        with pytest.raises(TypeError, match="rng"):
            sdpa(q, q, q, dropout_p=0.1, rng=bad)
    for bad in (-1, 2**64, (0, 2**32), (-1, 0)):
        with pytest.raises(ValueError, match="rng"):
            sdpa(q, q, q, dropout_p=0.1, rng=bad)
    with pytest.raises(TypeError, match="rng"):
        sdpa(q, q, q, dropout_p=0.1, rng=(1, 2, 3))
    out, lse, st = sdpa(q, q, q, dropout_p=0.1, rng=1, return_lse=True)
    with pytest.raises(ValueError, match="rng_state"):
        sdpa_backward(out, q, q, q, out, lse, dropout_p=0.1)
    with pytest.raises(TypeError, match="rng_state"):
        sdpa_backward(out, q, q, q, out, lse, dropout_p=0.1, rng_state=5)
    with pytest.raises(ValueError, match="dropout_p"):
        sdpa_backward(out, q, q, q, out, lse, dropout_p=1.0, rng_state=st)


def test_dropout_on_empty_and_degenerate_shapes():
    f = np.float32
    assert sdpa(np.ones((0, 4, 8), f), np.ones((0, 5, 8), f), np.ones((0, 5, 3), f), dropout_p=0.5, rng=1).shape == (0, 4, 3)
    out = sdpa(np.ones((4, 8), f), np.ones((0, 8), f), np.ones((0, 3), f), dropout_p=0.5, rng=1)
    assert out.shape == (4, 3) and not out.any()
    # A fully masked row stays zero under dropout; its gradient too.
    q = np.ones((3, 8), np.float64)
    mask = np.ones((3, 6), bool)
    mask[1] = False
    out, lse, st = sdpa(q, q[:1].repeat(6, 0), np.ones((6, 2)), attn_mask=mask, dropout_p=0.5, rng=3, return_lse=True)
    assert not out[1].any()


# ---- on the GPU: cupy arrays, fast and plain kernels, float32 and float16 (skipped, with the reason, without a usable GPU) ----

@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_dropout_mask_is_the_cpus_bit_for_bit_gpu(variant, dtype, causal):
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
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("dims", [(97, 130, 64, 64), (65, 63, 59, 33), (1, 5, 16, 16)], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_dropout_gpu(rng, variant, dtype, dims, causal):
    L, S, E, Ev = dims
    q, k, v = attn_inputs(rng, dtype, (2, 3), L, S, E, Ev)
    out, lse, st = fastnn.scaled_dot_product_attention(gpu(q), gpu(k), gpu(v), is_causal=causal, dropout_p=0.25,
                                                       rng=np.random.default_rng(1), return_lse=True)
    want, want_lse, _ = ref.scaled_dot_product_attention(f64(q), f64(k), f64(v), is_causal=causal, dropout_p=0.25,
                                                         rng=st, return_lse=True)
    gpu_check(out, want, dtype)
    gpu_check(lse, want_lse, dtype)


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"enable_gqa": True}], ids=str)
def test_sdpa_dropout_backward_matches_the_cpu_gpu(rng, dtype, kw):
    q, k, v = attn_inputs(rng, dtype, (2, 4), 37, 45, 24, 16, hk=2 if kw.get("enable_gqa") else None)
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
        gpu_check(a, b, dtype, tol=GPU_TOL[dtype] * (1 if dtype == np.float32 else 20))
