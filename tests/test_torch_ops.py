"""fastnn.torch's custom ops and functions: opcheck (schema, fake and autograd registrations), float64
gradcheck, and agreement with torch's own functions on awkward shapes. Skipped where torch is absent."""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="fastnn.torch needs PyTorch (pip install 'fastnn[torch]')")
import torch.nn.functional as F  # noqa: E402
from torch.library import opcheck  # noqa: E402

import fastnn.torch as ft  # noqa: E402

ops = torch.ops.fastnn
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def rand(*shape, dtype=torch.float64, grad=False, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else hash(shape) % 1000)
    return torch.randn(shape, dtype=dtype, generator=g).requires_grad_(grad)


def live_mask(l, s, p=0.7, seed=0):
    """A bool mask with every query row keeping at least one key (torch's fast paths give NaN otherwise)."""
    m = torch.rand(l, s, generator=torch.Generator().manual_seed(seed)) < p
    m[:, 0] = True
    return m


def test_import_fastnn_does_not_import_torch(tmp_path):
    import fastnn
    code = "import sys, fastnn; assert 'torch' not in sys.modules, 'fastnn imported torch'"
    # from another directory, with the fastnn these tests import (not a source tree without its build)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(fastnn.__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)


def test_every_op_registered():
    for name in ft.CUSTOM_OPS:
        assert hasattr(ops, name), name


# ---- opcheck: schema, fake tensor, autograd registration, AOT dispatch -------------------------------------

def _opcheck_cases():
    r = lambda *s, g=True: rand(*s, grad=g)  # noqa: E731
    t = torch.tensor([0, 2, -100, 1, 1])
    q, k, v = r(2, 4, 5, 8), r(2, 2, 6, 8), r(2, 2, 6, 3)
    o, lse = ops.scaled_dot_product_attention(q, k, v, None, 0.0, True, None, True, None)
    seed = torch.tensor(12345)
    od, lsed = ops.scaled_dot_product_attention(q, k, v, None, 0.25, False, None, True, seed)
    return [
        ("linear", (r(5, 7), r(3, 7), r(3), "relu")),
        ("linear", (r(2, 5, 7), r(3, 7), None, None)),
        ("linear_backward", (r(5, 3, g=False), r(5, 7, g=False), r(3, 7, g=False))),
        ("matmul", (r(2, 1, 5, 7), r(3, 7, 4))),
        ("relu", (r(5, 7),)),
        ("relu_backward", (r(5, 7, g=False), r(5, 7, g=False))),
        ("softmax", (r(5, 7), 0)),
        ("log_softmax", (r(3, 5, 7), -1)),
        ("softmax_backward", (r(5, 7, g=False), r(5, 7, g=False), 1)),
        ("log_softmax_backward", (r(5, 7, g=False), r(5, 7, g=False), 0)),
        ("cross_entropy", (r(5, 7), t, "mean", -100)),
        ("cross_entropy", (r(5, 7), t.clamp(min=0), "sum", 2)),
        ("cross_entropy", (r(5, 7), t, "none", -100)),
        ("scaled_dot_product_attention", (q, k, v, None, 0.0, True, None, True, None)),
        ("scaled_dot_product_attention", (q, k, v, None, 0.25, False, None, True, seed)),
        ("scaled_dot_product_attention",
         (r(3, 5, 8), r(3, 6, 8), r(3, 6, 3), live_mask(5, 6), 0.0, False, 0.3, False, None)),
        ("scaled_dot_product_attention", (r(5, 8), r(6, 8), r(6, 3), r(5, 6, g=False), 0.0, False, None, False, None)),
        ("scaled_dot_product_attention_backward",
         (r(2, 4, 5, 3, g=False), q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), None, 0.0, True, None,
          True, None)),
        ("scaled_dot_product_attention_backward",
         (r(2, 4, 5, 3, g=False), q.detach(), k.detach(), v.detach(), od.detach(), lsed.detach(), None, 0.25, False,
          None, True, seed)),
    ]


@pytest.mark.parametrize("name,args", _opcheck_cases(), ids=lambda c: c if isinstance(c, str) else "")
def test_opcheck(name, args):
    opcheck(getattr(ops, name), args)


# ---- gradcheck in float64 ----------------------------------------------------------------------------------

def gradcheck(fn, *inputs, fast_mode=False):
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast_mode)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_gradcheck_linear(bias, activation):
    x, w = rand(2, 3, 7, grad=True), rand(5, 7, grad=True)
    b = rand(5, grad=True) if bias else None
    gradcheck(lambda x, w, *b: ft.linear(x, w, *b, activation=activation), x, w, *([b] if bias else []))


@pytest.mark.parametrize("sa,sb", [((5, 7), (7, 3)), ((2, 1, 5, 7), (3, 7, 4)), ((7,), (2, 7, 3)), ((4, 7), (7,)),
                                   ((7,), (7,))])
def test_gradcheck_matmul(sa, sb):
    gradcheck(ft.matmul, rand(*sa, grad=True), rand(*sb, grad=True), fast_mode=True)


def test_gradcheck_relu():
    gradcheck(ft.relu, rand(4, 9, grad=True))


@pytest.mark.parametrize("fn", [ft.softmax, ft.log_softmax])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_gradcheck_softmax(fn, dim):
    gradcheck(lambda x: fn(x, dim), rand(4, 5, 3, grad=True))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_gradcheck_cross_entropy(reduction, ignore_index):
    t = torch.tensor([0, 2, ignore_index, 1, 2, 4])
    gradcheck(lambda x: ft.cross_entropy(x, t, reduction=reduction, ignore_index=ignore_index), rand(6, 5, grad=True))


@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"mask": "bool"}, {"mask": "float"}, {"enable_gqa": True},
                                {"enable_gqa": True, "is_causal": True}, {"scale": 0.7}])
@pytest.mark.parametrize("l,s", [(5, 7), (7, 5)])
def test_gradcheck_sdpa(kw, l, s):
    kw = dict(kw)
    hkv = 1 if kw.get("enable_gqa") else 3
    mask = kw.pop("mask", None)
    if mask == "bool":
        kw["attn_mask"] = live_mask(l, s)
    elif mask == "float":
        kw["attn_mask"] = rand(3, l, s)
    gradcheck(lambda q, k, v: ft.scaled_dot_product_attention(q, k, v, **kw),
              rand(1, 3, l, 4, grad=True), rand(1, hkv, s, 4, grad=True), rand(1, hkv, s, 3, grad=True), fast_mode=True)


# ---- the same results as torch's functions -----------------------------------------------------------------

def same(got, want, dtype):
    torch.testing.assert_close(got, want, equal_nan=True, **TOL[dtype])


def check_grads(fn_fast, fn_torch, inputs, dtype):
    """Forward and the gradients of sum(out * w) for a random w, fastnn vs torch."""
    a = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    b = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    out_a, out_b = fn_fast(*a), fn_torch(*b)
    same(out_a, out_b, dtype)
    w = rand(*out_b.shape, dtype=dtype, seed=1)
    (out_a * w).sum().backward()
    (out_b * w).sum().backward()
    for xa, xb in zip(a, b):
        if xb.requires_grad:
            same(xa.grad, xb.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,n_out", [((1, 1), 1), ((13, 31), 17), ((2, 3, 65), 33), ((0, 5), 3), ((4, 0), 3),
                                         ((97,), 5)])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_linear_vs_torch(dtype, shape, n_out, activation):
    x = rand(*shape, dtype=dtype, grad=True)
    w = rand(n_out, shape[-1], dtype=dtype, grad=True)
    b = rand(n_out, dtype=dtype, grad=True)
    act = (lambda y: y) if activation is None else F.relu
    check_grads(lambda x, w, b: ft.linear(x, w, b, activation=activation),
                lambda x, w, b: act(F.linear(x, w, b)), [x, w, b], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_strided_views(dtype):
    # a transposed input and a weight that is itself a transposed view
    x = rand(13, 31, dtype=dtype).t()
    w = rand(13, 17, dtype=dtype).t()
    same(ft.linear(x, w), F.linear(x, w), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sa,sb", [((1, 1), (1, 1)), ((13, 31), (31, 17)), ((3, 1, 5, 7), (4, 7, 2)), ((31,), (31,)),
                                   ((31,), (2, 31, 3)), ((2, 5, 31), (31,)), ((0, 4), (4, 3))])
def test_matmul_vs_torch(dtype, sa, sb):
    check_grads(ft.matmul, torch.matmul, [rand(*sa, dtype=dtype, grad=True), rand(*sb, dtype=dtype, grad=True)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (31,), (7, 33), (2, 3, 1025), (0, 3)])
def test_relu_vs_torch(dtype, shape):
    x = rand(*shape, dtype=dtype, grad=True)
    check_grads(ft.relu, F.relu, [x], dtype)
    nan = torch.tensor([float("nan"), -1.0, 2.0], dtype=dtype)
    same(ft.relu(nan), F.relu(nan), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", [((1, 1), -1), ((7, 33), 1), ((7, 33), 0), ((2, 3, 1025), 1), ((5,), 0),
                                       ((3, 0), 0)])
@pytest.mark.parametrize("log", [False, True])
def test_softmax_vs_torch(dtype, shape, dim, log):
    x = rand(*shape, dtype=dtype, grad=True) * 30
    x = x.detach().requires_grad_()
    fast, ref = (ft.log_softmax, F.log_softmax) if log else (ft.softmax, F.softmax)
    check_grads(lambda x: fast(x, dim), lambda x: ref(x, dim=dim), [x], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,c", [(1, 1), (7, 5), (33, 65), (255, 3), (5, 1025), (0, 4)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 1])
def test_cross_entropy_vs_torch(dtype, n, c, reduction, ignore_index):
    x = rand(n, c, dtype=dtype, grad=True)
    t = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(n))
    t[::3] = ignore_index
    kw = dict(reduction=reduction, ignore_index=ignore_index)
    x1, x2 = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    got, want = ft.cross_entropy(x1, t, **kw), F.cross_entropy(x2, t, **kw)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, equal_nan=True, **TOL[dtype])
    if n:
        w = rand(*want.shape, dtype=dtype, seed=2)
        (got * w).sum().backward()
        (want * w).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, equal_nan=True, **TOL[dtype])


def test_cross_entropy_all_ignored_is_nan_as_torch():
    x = rand(3, 4, grad=True)
    t = torch.full((3,), -100)
    got = ft.cross_entropy(x, t)
    assert torch.isnan(got) and torch.isnan(F.cross_entropy(x, t))
    got.backward()
    assert not x.grad.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"scale": 0.3}, {"mask": "bool"}, {"mask": "float"},
                                {"enable_gqa": True}])
@pytest.mark.parametrize("l,s,e", [(13, 29, 24), (29, 13, 17), (1, 1, 1), (65, 64, 8)])
def test_sdpa_vs_torch(dtype, kw, l, s, e):
    kw = dict(kw)
    hkv = 2 if kw.get("enable_gqa") else 4
    mask = kw.pop("mask", None)
    if mask == "bool":
        kw["attn_mask"] = live_mask(l, s)
    elif mask == "float":
        kw["attn_mask"] = rand(1, 4, l, s, dtype=dtype)
    inputs = [rand(2, 4, l, e, dtype=dtype, grad=True), rand(2, hkv, s, e, dtype=dtype, grad=True),
              rand(2, hkv, s, 5, dtype=dtype, grad=True)]
    check_grads(lambda q, k, v: ft.scaled_dot_product_attention(q, k, v, **kw),
                lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kw), inputs, dtype)


def _seed_after(torch_seed):
    """The dropout seed fastnn.torch's attention draws first after torch.manual_seed(torch_seed)."""
    torch.manual_seed(torch_seed)
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


@pytest.mark.parametrize("kw", [dict(), dict(is_causal=True), dict(enable_gqa=True), dict(mask="bool")],
                         ids=["plain", "causal", "gqa", "bool-mask"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_dropout_is_the_kernels(kw, dtype):
    """dropout_p > 0 runs fastnn's kernel with a seed drawn from torch's generator: the output is the NumPy API's
    for that seed, the gradients the backward kernel's with the same rng_state, and both match the oracle."""
    import fastnn
    from fastnn import reference
    kw = dict(kw)
    hkv = 2 if kw.get("enable_gqa") else 4
    if kw.pop("mask", None):
        kw["attn_mask"] = live_mask(9, 11)
    q, k, v = rand(2, 4, 9, 8, dtype=dtype, grad=True), rand(2, hkv, 11, 8, dtype=dtype, grad=True), \
        rand(2, hkv, 11, 5, dtype=dtype, grad=True)
    g = rand(2, 4, 9, 5, dtype=dtype)
    seed = _seed_after(3)
    torch.manual_seed(3)
    out = ft.scaled_dot_product_attention(q, k, v, dropout_p=0.4, **kw)
    out.backward(g)
    npkw = {key: (val.numpy() if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    arrs = [t.detach().numpy() for t in (q, k, v)]
    o, lse, state = fastnn.scaled_dot_product_attention(*arrs, dropout_p=0.4, return_lse=True, rng=seed, **npkw)
    assert state == (seed, 0)
    torch.testing.assert_close(out.detach(), torch.from_numpy(o), rtol=0, atol=0)
    grads = fastnn.scaled_dot_product_attention_backward(g.numpy(), *arrs, o, lse, dropout_p=0.4, rng_state=state,
                                                         **npkw)
    for t, want in zip((q, k, v), grads):
        torch.testing.assert_close(t.grad, torch.from_numpy(want), rtol=0, atol=0)
    # and the float64 oracle, with the same mask
    arrs64 = [a.astype(np.float64) for a in arrs]
    o_ref = reference.scaled_dot_product_attention(*arrs64, dropout_p=0.4, rng=state, **npkw)
    torch.testing.assert_close(out.detach().double(), torch.from_numpy(o_ref), **TOL[dtype])
    dropped = np.count_nonzero(o_ref != reference.scaled_dot_product_attention(*arrs64, **npkw))
    assert dropped > o_ref.size // 2  # the mask did something


def test_sdpa_dropout_gradcheck():
    """The backward regenerates the forward's mask: with the seed fixed per call, gradcheck sees one function."""
    q, k, v = rand(1, 2, 5, 4, grad=True), rand(1, 2, 6, 4, grad=True), rand(1, 2, 6, 3, grad=True)

    def fn(q, k, v):
        torch.manual_seed(11)
        return ft.scaled_dot_product_attention(q, k, v, dropout_p=0.3, is_causal=True)

    gradcheck(fn, q, k, v)


def test_sdpa_dropout_seeded_by_torch():
    q = rand(1, 2, 16, 8)
    torch.manual_seed(5)
    a = ft.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    b = ft.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    torch.manual_seed(5)
    assert torch.equal(ft.scaled_dot_product_attention(q, q, q, dropout_p=0.5), a)  # torch.manual_seed repeats
    assert not torch.equal(a, b)                                                    # each call a fresh mask
    assert torch.equal(ft.scaled_dot_product_attention(q, q, q, dropout_p=0.0),
                       ft.scaled_dot_product_attention(q, q, q))


@pytest.mark.parametrize("p,exc", [(1.0, ValueError), (-0.1, ValueError), ("0.1", TypeError), (True, TypeError)])
def test_sdpa_bad_dropout_p(p, exc):
    q = rand(1, 2, 4, 8)
    with pytest.raises(exc, match="dropout_p"):
        ft.scaled_dot_product_attention(q, q, q, dropout_p=p)


def test_inputs_unchanged():
    x, w, b = rand(4, 6), rand(3, 6), rand(3)
    keep = [t.clone() for t in (x, w, b)]
    ft.linear(x, w, b, activation="relu")
    ft.softmax(x, 1)
    ft.cross_entropy(x, torch.tensor([0, 1, 2, 5]))
    for t, k in zip((x, w, b), keep):
        assert torch.equal(t, k)


def test_errors():
    x = rand(4, 6)
    with pytest.raises(TypeError, match="int32"):
        ft.relu(x.int())
    with pytest.raises(TypeError, match="bfloat16"):
        ft.linear(x.bfloat16(), x.double())
    with pytest.raises(TypeError, match="weight"):
        ft.linear(x, x.float())
    with pytest.raises(TypeError, match="input"):
        ft.relu(x.numpy())
    with pytest.raises(ValueError, match="activation"):
        ft.linear(x, rand(3, 6), activation="gelu")
    with pytest.raises(TypeError, match="target"):
        ft.cross_entropy(x, torch.tensor([0, 1, 2, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="out of range"):
        ft.cross_entropy(x, torch.tensor([0, 1, 2, 6]))
    with pytest.raises(ValueError, match="dim"):
        ft.softmax(x, 2)
    with pytest.raises(ValueError, match=r"weight \(out_features, in_features\), got input \(4, 6\) and weight \(3, 5\)"):
        ft.linear(x, rand(3, 5))  # torch's layout in the message, not the transposed view the kernel reads
    with pytest.raises(ValueError, match=r"bias: expected shape \(3,\)"):
        ft.linear(x, rand(3, 6), rand(4))


def test_eager_calls_match_the_op_and_modes_see_the_op():
    """Plain eager calls run the implementation without the dispatcher; under a dispatch mode (as in
    tracing) the call goes through torch.ops.fastnn."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x, w = rand(4, 6, grad=True), rand(3, 6, grad=True)
    eager = ft.linear(x, w, activation="relu")
    eager.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    log = Log()
    with log:
        via_op = ft.linear(x, w, activation="relu")
        via_op.sum().backward()
    assert "fastnn.linear.default" in log.ops and "fastnn.linear_backward.default" in log.ops
    assert torch.equal(eager, via_op) and torch.equal(x.grad, gx)
