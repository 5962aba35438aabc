"""fastnn.torch.patch(): supported calls of torch.nn.functional go to fastnn, every other call to torch's
own function (same results, same errors), and unpatch() leaves torch exactly as it was. Skipped where
torch is absent."""
import pytest

torch = pytest.importorskip("torch", reason="fastnn.torch needs PyTorch (pip install 'fastnn[torch]')")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastnn.torch as ft  # noqa: E402
from fastnn.torch import _ops  # noqa: E402

NAMES = ("linear", "relu", "softmax", "log_softmax", "cross_entropy", "scaled_dot_product_attention")


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls that reach fastnn's functions."""
    seen = []
    for name in NAMES:
        real = getattr(_ops, name)
        monkeypatch.setattr(_ops, name, lambda *a, _n=name, _f=real, **k: seen.append(_n) or _f(*a, **k))
    yield seen
    ft.unpatch()


def snapshot():
    return dict(vars(F)), dict(vars(torch)), dict(vars(nn.Linear))


def test_patch_unpatch_restores_exactly():
    before = snapshot()
    originals = {n: getattr(F, n) for n in NAMES}
    ft.patch()
    assert ft.is_patched() and all(getattr(F, n) is not originals[n] for n in NAMES)
    ft.patch()  # twice: no effect
    ft.unpatch()
    assert not ft.is_patched()
    ft.unpatch()  # twice: no effect
    after = snapshot()
    for b, a in zip(before, after):
        assert b.keys() == a.keys() and all(b[k] is a[k] for k in b)
    with ft.patched():
        assert F.linear is not originals["linear"]
        with ft.patched():
            pass
        assert ft.is_patched()  # the inner block leaves the outer patch alone
    assert all(getattr(F, n) is originals[n] for n in NAMES)


def test_supported_calls_go_to_fastnn(calls):
    torch.manual_seed(0)
    x = torch.randn(6, 8, dtype=torch.float64)
    t = torch.randint(0, 5, (6,))
    lin, loss_fn = nn.Linear(8, 5).double(), nn.CrossEntropyLoss(ignore_index=2, reduction="sum")
    q = torch.randn(2, 3, 6, 4, dtype=torch.float64)
    eager = [loss_fn(lin(x), t), F.relu(x), nn.Softmax(dim=1)(x), F.log_softmax(x, -1),
             F.scaled_dot_product_attention(q, q, q, is_causal=True), F.cross_entropy(x, t, reduction="none")]
    with ft.patched():
        got = [loss_fn(lin(x), t), F.relu(x), nn.Softmax(dim=1)(x), F.log_softmax(x, -1),
               F.scaled_dot_product_attention(q, q, q, is_causal=True), F.cross_entropy(x, t, reduction="none")]
    assert sorted(calls) == sorted(["linear", "cross_entropy", "relu", "softmax", "log_softmax",
                                    "scaled_dot_product_attention", "cross_entropy"])
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_attention_dropout_goes_to_fastnn(calls):
    """F.scaled_dot_product_attention(..., dropout_p > 0) under the patch: fastnn's kernel (its mask, seeded
    from torch's generator), the same values as fastnn.torch's function after the same torch.manual_seed."""
    q = torch.randn(2, 3, 6, 4, dtype=torch.float64)
    torch.manual_seed(1)
    want = ft.scaled_dot_product_attention(q, q, q, dropout_p=0.2)
    calls.clear()
    with ft.patched():
        torch.manual_seed(1)
        got = F.scaled_dot_product_attention(q, q, q, dropout_p=0.2)
    assert calls == ["scaled_dot_product_attention"]
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_calls_go_to_fastnn(calls, dtype):
    """bfloat16 / float16 CPU calls run fastnn's kernels (float32 arithmetic, results rounded to the dtype):
    torch's results to within an ulp or two of the dtype, and gradients through autograd."""
    torch.manual_seed(0)
    x = torch.randn(6, 8).to(dtype)
    t = torch.randint(0, 5, (6,))
    lin = nn.Linear(8, 5).to(dtype)
    q = torch.randn(2, 3, 6, 4).to(dtype)

    def run():
        xg = x.clone().requires_grad_(True)
        outs = [F.linear(xg, lin.weight, lin.bias), F.relu(x), F.softmax(x, 1), F.log_softmax(x, -1),
                F.scaled_dot_product_attention(q, q, q, is_causal=True)]
        loss = F.cross_entropy(outs[0].float(), t)
        loss.backward()
        return outs + [xg.grad]

    eager = run()
    with ft.patched():
        got = run()
    assert sorted(calls) == sorted(["linear", "relu", "softmax", "log_softmax", "scaled_dot_product_attention",
                                    "cross_entropy"])
    eps = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10  # one ulp at 1
    for a, b in zip(got, eager):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a, b, rtol=2 * eps, atol=2 * eps)


def _fallback_cases():
    x = torch.randn(4, 6)
    w, b = torch.randn(3, 6), torch.randn(3)
    t = torch.tensor([0, 1, 2, 1])
    q = torch.randn(1, 2, 4, 6)
    cw, probs = torch.rand(6), torch.softmax(torch.randn(4, 6), 1)
    x3, t3 = torch.randn(2, 6, 5), torch.randint(0, 6, (2, 5))
    x1, mask = torch.randn(6), torch.randn(4, 4, requires_grad=True)
    return [
        ("integer relu", lambda: F.relu(torch.arange(-3, 3))),
        ("relu in place", lambda: F.relu(x.clone(), inplace=True)),
        ("softmax dtype=", lambda: F.softmax(x, dim=1, dtype=torch.float64)),
        ("softmax 0-d", lambda: F.softmax(torch.tensor(1.0), dim=0)),
        ("label_smoothing", lambda: F.cross_entropy(x, t, label_smoothing=0.1)),
        ("class weights", lambda: F.cross_entropy(x, t, weight=cw)),
        ("probability targets", lambda: F.cross_entropy(x, probs)),
        ("K-dim cross_entropy", lambda: F.cross_entropy(x3, t3)),
        ("1-D cross_entropy", lambda: F.cross_entropy(x1, torch.tensor(2))),
        ("mask with grad", lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=mask)),
        ("meta device", lambda: F.linear(x.to("meta"), w.to("meta")).shape),
        ("autocast", lambda: _autocast(lambda: F.linear(x, w, b))),
    ]


def _autocast(fn):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return fn()


@pytest.mark.parametrize("name,fn", _fallback_cases(), ids=[c[0] for c in _fallback_cases()])
def test_unsupported_calls_fall_back(calls, name, fn):
    want = fn()
    with ft.patched():
        got = fn()
    assert calls == [], f"{name} should have run torch's function"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, equal_nan=True)
    else:
        assert got == want


def test_same_errors_as_torch():
    x, w = torch.randn(4, 6), torch.randn(3, 5)
    for fn in (lambda: F.linear(x, w), lambda: F.linear(x, torch.randn(3, 6), unknown=1),
               lambda: F.linear(x.double(), torch.randn(3, 6, dtype=torch.float64), torch.randn(3)),
               lambda: F.relu(x, True, 3), lambda: F.softmax(x, 5)):
        with pytest.raises(Exception) as unpatched:
            fn()
        with ft.patched(), pytest.raises(type(unpatched.value)):
            fn()


def test_patched_model_trains_like_torch():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4)).double()
    ours = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4)).double()
    ours.load_state_dict(ref.state_dict())
    x, t = torch.randn(64, 10, dtype=torch.float64), torch.randint(0, 4, (64,))
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt_ours = ft.AdamW(ours.parameters(), lr=1e-2)
    for _ in range(5):
        for model, opt, patch in ((ref, opt_ref, False), (ours, opt_ours, True)):
            with ft.patched() if patch else torch.enable_grad():
                opt.zero_grad()
                F.cross_entropy(model(x), t).backward()
                opt.step()
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_multihead_attention_follows(calls):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double().eval()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    want = mha(x, x, x, need_weights=False)[0]
    with ft.patched():
        got = mha(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
