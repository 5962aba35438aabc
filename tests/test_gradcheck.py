"""Finite-difference checks, in float64, of every backward: relu, softmax, log_softmax, cross_entropy,
linear and scaled dot-product attention (bool and float masks, causal, GQA, broadcast batch), and the same
gradients against torch.autograd when torch is importable.

Each check takes a scalar loss f = sum(w * op(inputs)) with a random weight w, so the backward receives
grad_output = w, and compares the analytic gradient with central differences (f(x+h) - f(x-h)) / 2h on
every element. Their error is O(h^2) truncation plus O(eps/h) rounding: ~1e-10 relative with h = 1e-5,
so a bound of 1e-7 catches any wrong term while never failing on rounding. The linear checks run on
every ISA path this CPU supports (the attention ones, ~500 calls each, on the default path only)."""
import numpy as np
import pytest

import fastnn
from conftest import assert_close

FD_STEP = 1e-5
FD_RTOL = 1e-7

HAS_SDPA_BACKWARD = hasattr(fastnn, "scaled_dot_product_attention_backward")
needs_sdpa_backward = pytest.mark.skipif(
    not HAS_SDPA_BACKWARD, reason="this fastnn has no scaled_dot_product_attention_backward yet")


def numerical_grad(f, x, h=FD_STEP):
    """Central differences of the scalar f() with respect to every element of x (perturbed in place)."""
    assert x.flags.c_contiguous, "numerical_grad perturbs x through a flat view"
    grad = np.zeros(x.shape)
    flat, gflat = x.reshape(-1), grad.reshape(-1)   # views: x must be contiguous
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * h)
    return grad


def assert_grad(analytic, f, x, name):
    num = numerical_grad(f, x)
    assert analytic.shape == x.shape, f"{name}: gradient shape {analytic.shape} != {x.shape}"
    assert analytic.dtype == np.float64
    err = np.linalg.norm(analytic - num) / max(np.linalg.norm(num), 1e-300)
    assert err <= FD_RTOL, f"{name}: relative error {err:.2e} against finite differences > {FD_RTOL:.0e}"


# ---- element-wise and softmax family --------------------------------------------------------------

def test_relu_backward(rng):
    x = rng.standard_normal((6, 7))
    x[np.abs(x) < 1e-3] = 0.5      # keep clear of the kink at 0, where finite differences straddle it
    w = rng.standard_normal(x.shape)
    assert_grad(fastnn.relu_backward(w, x), lambda: np.sum(w * fastnn.relu(x)), x, "x")


@pytest.mark.parametrize("shape,axis", [((5, 9), -1), ((4, 3, 6), 1), ((7, 3), 0), ((1, 1), -1)])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_backward(rng, shape, axis, log):
    x = 3 * rng.standard_normal(shape)
    w = rng.standard_normal(shape)
    fwd, bwd = (fastnn.log_softmax, fastnn.log_softmax_backward) if log else (fastnn.softmax, fastnn.softmax_backward)
    y = fwd(x, axis)
    assert_grad(bwd(w, y, axis), lambda: np.sum(w * fwd(x, axis)), x, "x")


@pytest.mark.parametrize("n,c", [(1, 2), (8, 10), (5, 3)])
def test_cross_entropy_grad(rng, n, c):
    logits = 2 * rng.standard_normal((n, c))
    labels = rng.integers(0, c, n)
    _, grad = fastnn.cross_entropy(logits, labels)
    assert_grad(grad, lambda: fastnn.cross_entropy(logits, labels)[0], logits, "logits")


# ---- linear ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("xshape,n_out", [((5, 4), 3), ((2, 3, 6), 5), ((7,), 2)])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_linear_backward(isa, rng, xshape, n_out, activation):
    x = rng.standard_normal(xshape)
    w = rng.standard_normal((xshape[-1], n_out))
    b = rng.standard_normal(n_out)
    g = rng.standard_normal(xshape[:-1] + (n_out,))
    y = fastnn.linear(x, w, b, activation=activation)
    if activation == "relu":
        assert np.min(np.abs(x @ w + b)) > 1e-3   # no pre-activation near the kink (seeded, so stable)
    gy = fastnn.relu_backward(g, y) if activation == "relu" else g
    gx, gw, gb = fastnn.linear_backward(gy, x, w)

    def f():
        return np.sum(g * fastnn.linear(x, w, b, activation=activation))

    assert_grad(gx, f, x, "x")
    assert_grad(gw, f, w, "weight")
    assert_grad(gb, f, b, "bias")


# ---- attention ------------------------------------------------------------------------------------

def _sdpa_case(rng, name):
    """(query, key, value, kwargs) for a named case; small sizes with L != S."""
    N, H, L, S, E, Ev = 2, 2, 5, 6, 4, 3
    q = rng.standard_normal((N, H, L, E))
    k = rng.standard_normal((N, H, S, E))
    v = rng.standard_normal((N, H, S, Ev))
    kw = {}
    if name == "bool_mask":
        mask = rng.random((L, S)) < 0.6
        mask[1] = False                   # a query row with no allowed key: zero output, zero gradient
        mask[2] = True
        kw["attn_mask"] = mask
    elif name == "float_mask":
        mask = rng.standard_normal((H, L, S))
        mask[:, 0, 2:] = -np.inf          # additive -inf entries
        kw["attn_mask"] = mask
    elif name == "causal":
        kw["is_causal"] = True
    elif name == "causal_long_query":     # L > S: top-left aligned, rows past S see every key
        q = rng.standard_normal((N, H, S + 3, E))
        kw["is_causal"] = True
    elif name == "gqa":
        q = rng.standard_normal((N, 4, L, E))
        kw["enable_gqa"] = True
    elif name == "gqa_causal_scale":
        q = rng.standard_normal((N, 4, L, E))
        k, v = np.ascontiguousarray(k[:, :1]), np.ascontiguousarray(v[:, :1])
        kw.update(enable_gqa=True, is_causal=True, scale=0.7)
    elif name == "broadcast":             # key/value shared across the batch and heads
        k, v = np.ascontiguousarray(k[0, 0]), np.ascontiguousarray(v[0, 0])
    return q, k, v, kw


SDPA_CASES = ["plain", "bool_mask", "float_mask", "causal", "causal_long_query", "gqa", "gqa_causal_scale",
              "broadcast"]


@needs_sdpa_backward
@pytest.mark.parametrize("case", SDPA_CASES)
def test_sdpa_backward(rng, case):
    q, k, v, kw = _sdpa_case(rng, case)
    out, lse = fastnn.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    w = rng.standard_normal(out.shape)
    gq, gk, gv = fastnn.scaled_dot_product_attention_backward(w, q, k, v, out, lse, **kw)

    def f():
        return np.sum(w * fastnn.scaled_dot_product_attention(q, k, v, **kw))

    assert_grad(gq, f, q, "query")
    assert_grad(gk, f, k, "key")
    assert_grad(gv, f, v, "value")
    if case == "bool_mask":
        assert not np.any(gq[:, :, 1]), "a fully masked query row must get a zero gradient"


@pytest.mark.parametrize("case", SDPA_CASES)
def test_reference_sdpa_backward(rng, case):
    # The NumPy oracle passes the same check (it is what the kernel's float32 tests compare against).
    from fastnn import reference as ref
    q, k, v, kw = _sdpa_case(rng, case)
    out, lse = ref.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    w = rng.standard_normal(out.shape)
    gq, gk, gv = ref.scaled_dot_product_attention_backward(w, q, k, v, out, lse, **kw)

    def f():
        return np.sum(w * ref.scaled_dot_product_attention(q, k, v, **kw))

    for g, x, name in ((gq, q, "query"), (gk, k, "key"), (gv, v, "value")):
        assert_grad(g, f, x, name)


# ---- torch.autograd -------------------------------------------------------------------------------

def _torch_grads(torch, fn, arrays, w):
    ts = [torch.tensor(a, requires_grad=True) for a in arrays]
    (fn(*ts) * torch.tensor(w)).sum().backward()
    return [t.grad.numpy() for t in ts]


@pytest.mark.parametrize("op", ["relu", "softmax", "log_softmax", "cross_entropy", "linear"])
def test_backward_matches_torch_autograd(rng, op):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = rng.standard_normal((6, 5))
    if op == "relu":
        w = rng.standard_normal(x.shape)
        got, want = [fastnn.relu_backward(w, x)], _torch_grads(torch, F.relu, [x], w)
    elif op in ("softmax", "log_softmax"):
        w = rng.standard_normal(x.shape)
        fwd, bwd = getattr(fastnn, op), getattr(fastnn, op + "_backward")
        got = [bwd(w, fwd(x, 0), 0)]
        want = _torch_grads(torch, lambda t: getattr(F, op)(t, dim=0), [x], w)
    elif op == "cross_entropy":
        labels = rng.integers(0, 5, 6)
        got = [fastnn.cross_entropy(x, labels)[1]]
        t = torch.tensor(x, requires_grad=True)
        F.cross_entropy(t, torch.tensor(labels)).backward()
        want = [t.grad.numpy()]
    else:
        wt, b = rng.standard_normal((5, 3)), rng.standard_normal(3)
        g = rng.standard_normal((6, 3))
        got = list(fastnn.linear_backward(g, x, wt))
        want = _torch_grads(torch, lambda a, m, c: a @ m + c, [x, wt, b], g)
    for a, b_ in zip(got, want):
        assert_close(a, b_, np.float64, k=8)


@needs_sdpa_backward
@pytest.mark.parametrize("case", SDPA_CASES)
def test_sdpa_backward_matches_torch_autograd(rng, case):
    torch = pytest.importorskip("torch")
    q, k, v, kw = _sdpa_case(rng, case)
    out, lse = fastnn.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    w = rng.standard_normal(out.shape)
    got = fastnn.scaled_dot_product_attention_backward(w, q, k, v, out, lse, **kw)
    tkw = dict(kw)
    if "attn_mask" in tkw:
        tkw["attn_mask"] = torch.tensor(tkw["attn_mask"])
    want = _torch_grads(torch, lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(a, b, c, **tkw),
                        [q, k, v], w)
    for a, b_ in zip(got, want):
        assert_close(a, np.nan_to_num(b_), np.float64, k=k.shape[-2])
