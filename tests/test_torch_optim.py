"""fastnn.torch.Adam / AdamW against torch.optim.Adam / AdamW: 20 steps with a scheduler, state_dict both
ways, param groups, AMSGrad, maximize, non-contiguous parameters; and fastnn.torch.Linear against nn.Linear.
Skipped where torch is absent."""
import copy

import pytest

torch = pytest.importorskip("torch", reason="fastnn.torch needs PyTorch (pip install 'fastnn[torch]')")

import fastnn.torch as ft  # noqa: E402

OPTS = {"Adam": (ft.Adam, torch.optim.Adam), "AdamW": (ft.AdamW, torch.optim.AdamW)}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-13, atol=1e-15)}
SHAPES = [(1,), (7, 13), (3, 5, 2), (10_007,), (0,), (33, 65)]


def make_params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, dtype=dtype, generator=g).requires_grad_() for s in SHAPES]


def clone(params):
    return [p.detach().clone().requires_grad_() for p in params]


def set_grads(params_lists, step, dtype):
    g = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(p.shape, dtype=dtype, generator=g) for p in params_lists[0]]
    for params in params_lists:
        for p, gr in zip(params, grads):
            p.grad = gr.clone()


def groups(params, kw):
    # two groups, the second with its own lr and weight decay
    return [{"params": params[:3]}, {"params": params[3:], "lr": kw.get("lr", 1e-3) * 3, "weight_decay": 0.05}]


def check_same(a, b, dtype):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TOL[dtype])


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw", [{}, {"amsgrad": True}, {"maximize": True, "weight_decay": 0.1},
                                {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.01}])
def test_parity_with_scheduler_and_state_dict(name, dtype, kw):
    ours_cls, torch_cls = OPTS[name]
    p_ours, p_torch = make_params(dtype), make_params(dtype)
    o_ours, o_torch = ours_cls(groups(p_ours, kw), **kw), torch_cls(groups(p_torch, kw), **kw)
    s_ours = torch.optim.lr_scheduler.StepLR(o_ours, step_size=3, gamma=0.7)
    s_torch = torch.optim.lr_scheduler.StepLR(o_torch, step_size=3, gamma=0.7)
    for step in range(20):
        set_grads([p_ours, p_torch], step, dtype)
        o_ours.step()
        o_torch.step()
        s_ours.step()
        s_torch.step()
        check_same(p_ours, p_torch, dtype)
    sd = o_ours.state_dict()
    assert set(sd["state"][1]) == ({"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if kw.get("amsgrad") else set()))
    assert torch.is_tensor(sd["state"][1]["step"]) and sd["state"][1]["step"].item() == 20

    # ours -> torch and torch -> ours, then both continue: 5 more steps each way against the originals
    p_a, p_b = clone(p_ours), clone(p_torch)
    t_from_ours = torch_cls(groups(p_a, kw), **kw)
    t_from_ours.load_state_dict(copy.deepcopy(o_ours.state_dict()))  # as saved and loaded: no shared tensors
    o_from_torch = ours_cls(groups(p_b, kw), **kw)
    o_from_torch.load_state_dict(copy.deepcopy(o_torch.state_dict()))
    for step in range(20, 25):
        set_grads([p_ours, p_torch, p_a, p_b], step, dtype)
        for o in (o_ours, o_torch, t_from_ours, o_from_torch):
            o.step()
        check_same(p_a, p_torch, dtype)
        check_same(p_b, p_ours, dtype)
        check_same(p_ours, p_torch, dtype)


def test_one_kernel_call_per_group(monkeypatch):
    from fastnn.torch import _optim
    calls = []
    real = _optim._C.adam_multi
    monkeypatch.setattr(_optim._C, "adam_multi", lambda *a: calls.append(len(a[0])) or real(*a))
    params = make_params(torch.float32)
    opt = ft.AdamW(groups(params, {}))
    set_grads([params], 0, torch.float32)
    opt.step()
    assert calls == [3, 3]


def test_non_contiguous_param_and_missing_grad():
    base = torch.randn(6, 4, dtype=torch.float64)
    p_ours = base.clone().t().requires_grad_()    # a transposed (non-contiguous) parameter
    p_torch = base.clone().t().requires_grad_()
    q_ours, q_torch = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)  # never gets a grad
    o_ours, o_torch = ft.Adam([p_ours, q_ours], lr=0.1), torch.optim.Adam([p_torch, q_torch], lr=0.1)
    for step in range(3):
        set_grads([[p_ours], [p_torch]], step, torch.float64)
        o_ours.step()
        o_torch.step()
    torch.testing.assert_close(p_ours, p_torch, **TOL[torch.float64])
    assert q_ours not in o_ours.state


def test_closure_and_errors():
    p = torch.zeros(3, requires_grad=True)
    opt = ft.Adam([p])

    def closure():
        opt.zero_grad()
        loss = (p - 1).pow(2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 3.0
    with pytest.raises(ValueError, match="learning rate"):
        ft.Adam([p], lr=-1)
    with pytest.raises(ValueError, match="beta"):
        ft.AdamW([p], betas=(1.0, 0.9))
    b = torch.zeros(3, dtype=torch.int32)
    b.grad = torch.ones(3, dtype=torch.int32)
    with pytest.raises(TypeError, match="int32"):
        ft.Adam([b]).step()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_half_parameters_against_torch(dtype, amsgrad):
    """Half-precision parameters with moments of their dtype (torch's rule), 10 steps: fastnn steps in
    float32 and rounds each array once, torch rounds after each operation, so they agree to a few ulps
    of the dtype."""
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(257, generator=gen).to(dtype)
    p, q = init.clone().requires_grad_(True), init.clone().requires_grad_(True)
    ours = ft.AdamW([p], lr=1e-2, weight_decay=0.01, amsgrad=amsgrad)
    ref = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.01, amsgrad=amsgrad)
    for _ in range(10):
        g = torch.randn(257, generator=gen).to(dtype)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert ours.state[p]["exp_avg"].dtype == dtype
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    torch.testing.assert_close(p.detach().float(), q.detach().float(), rtol=4 * ulp, atol=4 * ulp * 1e-2)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_linear_module(bias, activation):
    torch.manual_seed(0)
    ours = ft.Linear(7, 5, bias=bias, activation=activation).double()
    ref = torch.nn.Linear(7, 5, bias=bias).double()
    assert set(ours.state_dict()) == set(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    want = ref(x) if activation is None else torch.relu(ref(x))
    torch.testing.assert_close(ours(x), want, rtol=1e-13, atol=1e-13)
    # a dtype fastnn has no kernel for runs torch's function
    ours_bf = ft.Linear(7, 5, bias=bias, activation=activation).bfloat16()
    assert ours_bf(x.bfloat16()).dtype == torch.bfloat16
    assert "activation='relu'" in repr(ft.Linear(2, 3, activation="relu"))
