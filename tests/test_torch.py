"""Cross-checks against PyTorch itself (skipped when torch is not installed): attention and several
Adam/AdamW/AMSGrad steps against torch.optim.Adam; the oracles' NaN and inf behaviour against PyTorch's
default (non-fused) ops."""
import numpy as np
import pytest

import fastnn
from fastnn import reference as ref
from conftest import assert_close, make_array

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", [
    {}, {"is_causal": True}, {"scale": 0.3}, {"mask": "bool"}, {"mask": "float"}, {"enable_gqa": True},
])
@pytest.mark.parametrize("l,s", [(13, 29), (29, 13), (97, 97)])
def test_sdpa_vs_torch(rng, dtype, kw, l, s):
    kw = dict(kw)
    hkv = 2 if kw.get("enable_gqa") else 4
    q = make_array(rng, (2, 4, l, 24), dtype)
    k = make_array(rng, (2, hkv, s, 24), dtype)
    v = make_array(rng, (2, hkv, s, 16), dtype)
    mask = kw.pop("mask", None)
    if mask == "bool":
        mask = rng.random((l, s)) < 0.8
        mask[:, 0] = True  # torch's fused paths give NaN for fully masked rows; keep every row alive
    elif mask == "float":
        mask = rng.standard_normal((1, 4, l, s)).astype(dtype)
    got = fastnn.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
    t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a)).double()
    tmask = None if mask is None else (torch.from_numpy(mask) if mask.dtype == np.bool_ else t(mask))
    expected = torch.nn.functional.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=tmask, **kw)
    assert_close(got, expected.numpy(), dtype, k=24 + s)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weight_decay,decoupled,maximize,amsgrad", [
    (0.0, False, False, False), (0.1, False, False, False), (0.1, True, False, False),
    (0.0, False, True, False), (0.05, False, False, True), (0.05, True, True, True),
])
def test_adam_vs_torch(rng, dtype, weight_decay, decoupled, maximize, amsgrad):
    shape = (37, 23)
    param = rng.standard_normal(shape).astype(dtype)
    tparam = torch.nn.Parameter(torch.from_numpy(param.astype(np.float64)))
    kw = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay, amsgrad=amsgrad,
              maximize=maximize, foreach=False)
    if decoupled:
        opt = torch.optim.AdamW([tparam], **kw)
    else:
        opt = torch.optim.Adam([tparam], **kw)
    m, v = np.zeros_like(param), np.zeros_like(param)
    vmax = np.zeros_like(param) if amsgrad else None
    for step in range(1, 6):
        grad = rng.standard_normal(shape).astype(dtype)
        fastnn.adam_update(param, grad, m, v, step=step, lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8,
                           weight_decay=weight_decay, decoupled_weight_decay=decoupled, maximize=maximize,
                           max_exp_avg_sq=vmax)
        tparam.grad = torch.from_numpy(grad.astype(np.float64))
        opt.step()
        state = opt.state[tparam]
        assert_close(param, tparam.detach().numpy(), dtype, k=step)
        assert_close(m, state["exp_avg"].numpy(), dtype, k=step)
        assert_close(v, state["exp_avg_sq"].numpy(), dtype, k=step)
        if amsgrad:
            assert_close(vmax, state["max_exp_avg_sq"].numpy(), dtype, k=step)


# ---- the oracles' NaN / inf conventions are PyTorch's -------------------------------------------------

NONFINITE = [np.nan, np.inf, -np.inf]


def _row_with(value, n=7, at=2):
    x = np.linspace(-1.5, 2.0, n)
    x[at] = value
    return x


def _same(ours, theirs):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert np.array_equal(np.isnan(ours), np.isnan(theirs)), (ours, theirs)
    assert np.array_equal(np.isposinf(ours), np.isposinf(theirs)) and np.array_equal(np.isneginf(ours),
                                                                                       np.isneginf(theirs))
    fin = np.isfinite(theirs)
    np.testing.assert_allclose(ours[fin], theirs[fin], rtol=1e-12, atol=1e-14)  # O(1) values


@pytest.mark.parametrize("value", NONFINITE)
def test_oracle_nonfinite_forward_ops_match_torch(value):
    x = _row_with(value).reshape(1, -1)
    tx = torch.from_numpy(x)
    with np.errstate(invalid="ignore"):
        _same(ref.relu(x), torch.relu(tx))
        _same(ref.softmax(x), torch.softmax(tx, -1))
        _same(ref.log_softmax(x), torch.log_softmax(tx, -1))
        labels = np.array([4])
        loss, grad = ref.cross_entropy(x, labels)
        tl = tx.clone().requires_grad_()
        tloss = torch.nn.functional.cross_entropy(tl, torch.from_numpy(labels))
        tloss.backward()
        _same(loss, tloss.item())
        _same(grad, tl.grad)
        w = np.linspace(-1, 1, 7 * 3).reshape(7, 3)
        _same(ref.matmul(x, w), tx @ torch.from_numpy(w))
        _same(ref.linear(x, w, np.ones(3), activation="relu"), torch.relu(tx @ torch.from_numpy(w) + 1))


@pytest.mark.parametrize("value", NONFINITE)
def test_oracle_nonfinite_backward_ops_match_torch(value):
    x = _row_with(value).reshape(1, -1)
    g = np.linspace(0.5, -1.0, 7).reshape(1, -1)
    for fwd, oracle in [(torch.softmax, lambda g, y: ref.softmax_backward(g, y)),
                        (torch.log_softmax, lambda g, y: g - np.exp(y) * g.sum(-1, keepdims=True))]:
        tx = torch.from_numpy(x.copy()).requires_grad_()
        ty = fwd(tx, -1)
        ty.backward(torch.from_numpy(g))
        with np.errstate(invalid="ignore"):
            _same(oracle(g, ty.detach().numpy()), tx.grad)
    # relu: torch passes the gradient where x is not <= 0; the oracle (and the kernels) where x > 0. They
    # agree for every x but NaN, where fastnn follows jax.nn.relu (gradient 0) by a documented choice.
    xr = _row_with(value)
    tx = torch.from_numpy(xr.copy()).requires_grad_()
    torch.relu(tx).backward(torch.from_numpy(g[0]))
    want = tx.grad.numpy()
    if np.isnan(value):
        want = np.where(np.isnan(xr), 0.0, want)
    _same(ref.relu_backward(g[0], xr), want)
    # linear_backward against autograd of x @ w + b.
    w = np.linspace(-1, 1, 7 * 3).reshape(7, 3)
    go = np.linspace(1, 2, 3).reshape(1, 3)
    go[0, 1] = value
    tx, tw, tb = (torch.from_numpy(a.copy()).requires_grad_() for a in (x, w, np.ones(3)))
    (tx @ tw + tb).backward(torch.from_numpy(go))
    with np.errstate(invalid="ignore"):
        gx, gw, gb = ref.linear_backward(go, x, w)
    _same(gx, tx.grad), _same(gw, tw.grad), _same(gb, tb.grad)


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("where", ["query", "key", "value", "grad_output"])
@pytest.mark.parametrize("mask", [None, "causal", "bool"])
def test_oracle_nonfinite_attention_matches_torch(value, where, mask):
    # PyTorch's math path (the default for float64 on the CPU when fused kernels do not apply is a fused
    # flash kernel; the math path is forced here), the oracle and the kernel: same NaN/inf pattern, forward and
    # backward. With a mask the value sits at key 3, which rows 0-2 may not attend: PyTorch adds -inf to a
    # masked score (NaN for a NaN or +inf score) and multiplies the zero probability by the value.
    rng = np.random.default_rng(5)
    arrs = {n: rng.standard_normal((1, 2, 5, 4)) for n in ("query", "key", "value", "grad_output")}
    arrs[where][(0, 1, 3 if mask and where in ("key", "value") else 2, 3)] = value
    q, k, v, do = (arrs[n] for n in ("query", "key", "value", "grad_output"))
    kw = {"causal": dict(is_causal=True), "bool": dict(attn_mask=np.tril(np.ones((5, 5), bool), 1))}.get(mask, {})
    tkw = {n: torch.from_numpy(m) if isinstance(m, np.ndarray) else m for n, m in kw.items()}
    tq, tk, tv = (torch.from_numpy(a.copy()).requires_grad_() for a in (q, k, v))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.MATH]):
        to = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, **tkw)
    to.backward(torch.from_numpy(do))
    with np.errstate(invalid="ignore", over="ignore"):
        out = ref.scaled_dot_product_attention(q, k, v, **kw)
        grads = ref.scaled_dot_product_attention_backward(do, q, k, v, None, None, **kw)
    _same(out, to.detach())
    for ours, t in zip(grads, (tq, tk, tv)):
        _same(ours, t.grad)
    out, lse = fastnn.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    _same(out, to.detach())
    for ours, t in zip(fastnn.scaled_dot_product_attention_backward(do, q, k, v, out, lse, **kw), (tq, tk, tv)):
        _same(ours, t.grad)


@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("where,amsgrad,decoupled,maximize", [
    (where, *opts) for opts in [(True, False, False), (True, True, True), (False, True, False), (False, False, True)]
    for where in ["grad", "param", "exp_avg_sq"] + (["max_exp_avg_sq"] if opts[0] else [])])
def test_oracle_nonfinite_adam_matches_torch(value, where, amsgrad, decoupled, maximize):
    n = 6
    param = np.linspace(-1, 1, n)
    tparam = torch.nn.Parameter(torch.from_numpy(param.copy()))
    kw = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, amsgrad=amsgrad, maximize=maximize,
              foreach=False, fused=False)
    opt = (torch.optim.AdamW if decoupled else torch.optim.Adam)([tparam], **kw)
    m, v = np.zeros(n), np.zeros(n)
    vmax = np.zeros(n) if amsgrad else None
    for step in (1, 2, 3):
        grad = np.linspace(0.3, -0.2, n) * step
        if step == 2 and where == "grad":
            grad[2] = value
        if step == 2 and where == "param":
            param[2] = value
            with torch.no_grad():
                tparam[2] = value
        if step == 2 and where in ("exp_avg_sq", "max_exp_avg_sq"):
            state = opt.state[tparam]
            (v if where == "exp_avg_sq" else vmax)[2] = value
            state[where][2] = value
        with np.errstate(invalid="ignore", over="ignore"):
            ref.adam_update(param, grad, m, v, step=step, lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8,
                            weight_decay=0.1, decoupled_weight_decay=decoupled, maximize=maximize,
                            max_exp_avg_sq=vmax)
        tparam.grad = torch.from_numpy(grad.copy())
        opt.step()
        state = opt.state[tparam]
        _same(param, tparam.detach())
        _same(m, state["exp_avg"]), _same(v, state["exp_avg_sq"])
        if amsgrad:
            _same(vmax, state["max_exp_avg_sq"])
