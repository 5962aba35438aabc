"""torch.compile(fullgraph=True) of models built from fastnn.torch's ops, called directly or through
fastnn.torch.patch(): one graph (no break), fastnn's ops in it, the eager results and gradients.
The models are tiny: compilation time dominates. Skipped where torch is absent."""
import contextlib

import pytest

torch = pytest.importorskip("torch", reason="fastnn.torch needs PyTorch (pip install 'fastnn[torch]')")
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fastnn.torch as ft  # noqa: E402


class Direct(nn.Module):
    """fastnn.torch's functions and Linear."""

    def __init__(self):
        super().__init__()
        self.l1 = ft.Linear(8, 16, activation="relu")
        self.l2 = ft.Linear(16, 4)

    def forward(self, x, t):
        h = self.l1(x)
        q = h.view(2, 2, -1, 4)
        a = ft.scaled_dot_product_attention(q, q, q, is_causal=True).reshape(h.shape)
        z = ft.relu(ft.matmul(a, self.l1.weight))
        return ft.cross_entropy(self.l2(ft.log_softmax(a, -1) + ft.softmax(a, 0)) + z[:, :4], t, ignore_index=1)


class Plain(nn.Module):
    """Plain PyTorch code: fastnn only through the patch."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(8, 16)
        self.l2 = nn.Linear(16, 4)

    def forward(self, x, t):
        h = F.relu(self.l1(x))
        q = h.view(2, 2, -1, 4)
        a = F.scaled_dot_product_attention(q, q, q, is_causal=True).reshape(h.shape)
        return nn.CrossEntropyLoss()(self.l2(F.log_softmax(a, dim=-1) + F.softmax(a, dim=0)), t)


def recording():
    """aot_eager that records the forward and backward graphs AOT autograd produces (fastnn's ops appear
    there as torch.ops.fastnn.*, whatever Python function dynamo traced them through)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=record, bw_compiler=record), graphs


def run(model, compiled, x, t):
    loss = compiled(x, t)
    model.zero_grad()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def check(model_cls, backend_name, patch):
    """backend_name None: aot_eager, recording the graphs."""
    torch.manual_seed(0)
    model = model_cls().double()
    x, t = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, 4, (6,))
    torch._dynamo.reset()
    backend, graphs = recording() if backend_name is None else (backend_name, None)
    with ft.patched() if patch else contextlib.nullcontext():
        eager_loss, eager_grads = run(model, model, x, t)
        compiled_loss, compiled_grads = run(model, torch.compile(model, backend=backend, fullgraph=True), x, t)
    if graphs is not None:
        assert len(graphs) == 2, "expected one forward and one backward graph"
        fw, bw = graphs
        for op in ("linear", "relu", "scaled_dot_product_attention", "cross_entropy", "log_softmax", "softmax"):
            assert f"torch.ops.fastnn.{op}.default" in fw, f"fastnn.{op} is not in the compiled forward graph"
        for op in ("linear_backward", "scaled_dot_product_attention_backward", "log_softmax_backward"):
            assert f"torch.ops.fastnn.{op}.default" in bw, f"fastnn.{op} is not in the compiled backward graph"
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-12, atol=1e-12)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_compile_direct_aot_eager():
    check(Direct, None, patch=False)


def test_compile_patched_aot_eager():
    check(Plain, None, patch=True)
    assert not ft.is_patched()


def _no_cxx_reason():
    """Why inductor cannot compile here (it builds C++ for the CPU), or None."""
    import subprocess
    try:
        from torch._inductor import cpp_builder  # private: where torch 2.x keeps the compiler choice
        cxx = cpp_builder.get_cpp_compiler()
        subprocess.run([cxx, "--version"], check=True, capture_output=True, timeout=60)
    except Exception as e:  # InvalidCxxCompiler, a missing or failing executable
        return f"inductor needs a working C++ compiler ({type(e).__name__}: {e})"
    return None


def test_compile_patched_inductor():
    """The default backend (inductor) once, on the patched plain model; skipped where no C++ compiler works
    (the wheel's test run hides the compilers)."""
    reason = _no_cxx_reason()
    if reason:
        pytest.skip(reason)
    check(Plain, "inductor", patch=True)


def test_compile_attention_dropout():
    """Attention with dropout compiles into one graph: the seed is drawn by a traced torch.randint (no .item()
    break) and passed to the op as a tensor; under aot_eager the draw and the results are eager's."""
    torch.manual_seed(0)
    q = torch.randn(2, 2, 6, 4, dtype=torch.float64, requires_grad=True)

    def f(q):
        return ft.scaled_dot_product_attention(q, q, q, dropout_p=0.3).square().sum()

    torch._dynamo.reset()
    backend, graphs = recording()
    compiled = torch.compile(f, backend=backend, fullgraph=True)
    results = []
    for fn in (f, compiled):
        torch.manual_seed(7)
        loss = fn(q)
        (grad,) = torch.autograd.grad(loss, q)
        results.append((loss.detach(), grad))
    assert "torch.ops.fastnn.scaled_dot_product_attention.default" in graphs[0]
    assert "torch.ops.fastnn.scaled_dot_product_attention_backward.default" in graphs[1]
    torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=1e-12)
