"""Optional cross-checks against PyTorch itself (skipped when torch is not installed): attention and
several Adam/AdamW/AMSGrad steps against torch.optim.Adam."""
import numpy as np
import pytest

import fastnn
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
    try:
        expected = torch.nn.functional.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=tmask, **kw)
    except TypeError:  # torch older than 2.5 has no enable_gqa
        pytest.skip("this torch version lacks an argument used here")
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
