"""fastnn's kernels as PyTorch custom ops (torch.ops.fastnn.*) and the functions that call them.

Each op is registered with torch.library.custom_op (pure Python: no code links against libtorch), with a
fake implementation (shapes and dtypes, for torch.compile and other tracing) and, for the forward ops, an
autograd formula whose backward runs fastnn's backward kernels, themselves registered as ops so that a
compiled backward graph stays whole. The public functions take torch.nn.functional's names and
arguments and check what the kernels need (TypeError / ValueError naming the argument).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

import fastnn
from fastnn._dropout import dropout_p_value


CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
CUDA_DTYPES = (torch.float32,)


# ---- custom ops ----------------------------------------------------------------------------------------

# The implementations call fastnn's functions on the tensors themselves (CPU tensors are read as numpy views,
# CUDA ones run on torch's current stream; results come back as tensors on the same device).

def _dense(t: Tensor) -> Tensor:
    """A result as the fake implementations describe it, contiguous (a kernel may leave a transposed layout,
    as relu does for a transposed input)."""
    return t if t.is_contiguous() else t.contiguous()


_IMPL = {}  # op name -> its Python implementation
_DEFS = {}  # op name -> its CustomOpDef


def _op(name: str):
    """Registers fn as the custom op torch.ops.fastnn.<name> (keeping fn for _call's direct path)."""
    def register(fn):
        _IMPL[name] = fn
        _DEFS[name] = torch.library.custom_op(f"fastnn::{name}", fn, mutates_args=())
        return _DEFS[name]
    return register


_FUNCTION = {}  # op name -> a torch.autograd.Function with the op's implementation and autograd formula


def _autograd(op, backward, setup_context) -> None:
    """Registers the op's autograd formula, and builds the same formula as an autograd.Function for _call."""
    op.register_autograd(backward, setup_context=setup_context)
    name = next(n for n, d in _DEFS.items() if d is op)
    impl = _IMPL[name]

    def forward(ctx, *args):  # the classic style: measured 3x cheaper per call than setup_context's
        out = impl(*args)
        setup_context(ctx, args, out)
        return out

    _FUNCTION[name] = type(f"{name}_function", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward)})


def _eager(args) -> int:
    """How a call may skip the dispatcher: 0 it may not (compiling or tracing, a torch function/dispatch
    mode or a functorch transform active, a tensor subclass), 1 by calling the implementation (no tensor
    needs a gradient), 2 through the op's autograd.Function."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or torch._C._get_tracing_state()
            or torch._C._is_torch_function_mode_enabled() or torch._C._functorch.peek_interpreter_stack() is not None):
        return 0
    way = 1
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, Tensor):
            if type(a) is not Tensor and type(a) is not torch.nn.Parameter:
                return 0
            if grad and a.requires_grad:
                way = 2
    return way


def _call(name: str, *args):
    """torch.ops.fastnn.<name>(*args). In plain eager calls the same implementation and autograd formula
    run without the custom-op dispatcher, which costs tens of µs a call (see the README's PyTorch section);
    torch.compile, tracing and modes always see the op."""
    way = _eager(args)
    if way == 1:
        return _IMPL[name](*args)
    if way == 2 and name in _FUNCTION:
        return _FUNCTION[name].apply(*args)
    return getattr(torch.ops.fastnn, name)(*args)

@_op("linear")
def _linear(input: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str]) -> Tensor:
    # weight is torch's (out, in); fastnn reads its transpose (in, out) in place through the strides.
    return _dense(fastnn.linear(input, weight.t(), bias, activation=activation))


@_linear.register_fake
def _(input, weight, bias, activation):
    return input.new_empty(input.shape[:-1] + (weight.shape[0],))


def _rows(t: Tensor) -> Tensor:
    """t (..., n) as a 2-D (rows, n) view (any n, including 0)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


@_op("linear_backward")
def _linear_backward(grad_output: Tensor, input: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
    """(grad_input, grad_weight) of y = input @ weight.T, weight (out, in): both products on the matmul
    kernel reading the transposes in place."""
    g2, x2 = _rows(grad_output), _rows(input)
    grad_x = fastnn.matmul(g2, weight).reshape(input.shape)   # (rows, out) @ (out, in)
    grad_w = fastnn.matmul(g2.t(), x2)                        # (out, rows) @ (rows, in)
    return _dense(grad_x), _dense(grad_w)


@_linear_backward.register_fake
def _(grad_output, input, weight):
    return input.new_empty(input.shape), weight.new_empty(weight.shape)


def _linear_setup(ctx, inputs, output):
    input, weight, bias, activation = inputs
    ctx.has_bias = bias is not None
    ctx.relu = activation is not None
    ctx.save_for_backward(input, weight, output if ctx.relu else None)


def _linear_grad(ctx, grad):
    input, weight, output = ctx.saved_tensors
    if ctx.relu:
        grad = _call("relu_backward", grad, output)  # output > 0 exactly where the pre-activation is
    grad_x, grad_w = _call("linear_backward", grad, input, weight)
    grad_b = _rows(grad).sum(0) if ctx.has_bias else None
    return grad_x, grad_w, grad_b, None


_autograd(_linear, _linear_grad, _linear_setup)


@_op("matmul")
def _matmul(input: Tensor, other: Tensor) -> Tensor:
    return _dense(fastnn.matmul(input, other))


@_matmul.register_fake
def _(input, other):
    batch = torch.broadcast_shapes(input.shape[:-2], other.shape[:-2])
    return input.new_empty(tuple(batch) + (input.shape[-2], other.shape[-1]))


def _matmul_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _matmul_grad(ctx, grad):
    a, b = ctx.saved_tensors
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = _call("matmul", grad, b.transpose(-1, -2)).sum_to_size(a.shape)
    if ctx.needs_input_grad[1]:
        grad_b = _call("matmul", a.transpose(-1, -2), grad).sum_to_size(b.shape)
    return grad_a, grad_b


_autograd(_matmul, _matmul_grad, _matmul_setup)


@_op("relu")
def _relu(input: Tensor) -> Tensor:
    return _dense(fastnn.relu(input))


@_op("relu_backward")
def _relu_backward(grad_output: Tensor, input: Tensor) -> Tensor:
    return _dense(fastnn.relu_backward(grad_output, input))


def _like_first(x, *rest):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_relu.register_fake(_like_first)
_relu_backward.register_fake(_like_first)


def _relu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _relu_grad(ctx, grad):
    (x,) = ctx.saved_tensors
    return _call("relu_backward", grad, x)


_autograd(_relu, _relu_grad, _relu_setup)


@_op("softmax")
def _softmax(input: Tensor, dim: int) -> Tensor:
    return _dense(fastnn.softmax(input, dim))


@_op("log_softmax")
def _log_softmax(input: Tensor, dim: int) -> Tensor:
    return _dense(fastnn.log_softmax(input, dim))


@_op("softmax_backward")
def _softmax_backward(grad_output: Tensor, output: Tensor, dim: int) -> Tensor:
    return _dense(fastnn.softmax_backward(grad_output, output, dim))


@_op("log_softmax_backward")
def _log_softmax_backward(grad_output: Tensor, output: Tensor, dim: int) -> Tensor:
    return _dense(fastnn.log_softmax_backward(grad_output, output, dim))


for _def in (_softmax, _log_softmax, _softmax_backward, _log_softmax_backward):
    _def.register_fake(_like_first)


def _softmax_setup(ctx, inputs, output):
    ctx.dim = inputs[1]
    ctx.save_for_backward(output)


def _softmax_grad(ctx, grad):
    (y,) = ctx.saved_tensors
    return _call("softmax_backward", grad, y, ctx.dim), None


def _log_softmax_grad(ctx, grad):
    (y,) = ctx.saved_tensors
    return _call("log_softmax_backward", grad, y, ctx.dim), None


_autograd(_softmax, _softmax_grad, _softmax_setup)
_autograd(_log_softmax, _log_softmax_grad, _softmax_setup)


@_op("cross_entropy")
def _cross_entropy(input: Tensor, target: Tensor, reduction: str, ignore_index: int) -> Tuple[Tensor, Tensor]:
    """(loss, grad): the loss as torch's cross_entropy gives it and its gradient with respect to input
    ("none": of the summed losses), from one fused pass; the backward only scales grad."""
    loss, grad = fastnn.cross_entropy(input, target, reduction=reduction, ignore_index=ignore_index)
    if not isinstance(loss, Tensor):
        loss = torch.tensor(loss, dtype=input.dtype, device=input.device)
    return loss, grad


@_cross_entropy.register_fake
def _(input, target, reduction, ignore_index):
    loss_shape = (input.shape[0],) if reduction == "none" else ()
    return input.new_empty(loss_shape), input.new_empty(input.shape)


def _cross_entropy_setup(ctx, inputs, output):
    ctx.none = inputs[2] == "none"
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _cross_entropy_grad(ctx, grad_loss, grad_grad):
    (grad,) = ctx.saved_tensors
    return grad * (grad_loss.unsqueeze(-1) if ctx.none else grad_loss), None, None, None


_autograd(_cross_entropy, _cross_entropy_grad, _cross_entropy_setup)


def _rng_state(seed: Optional[Tensor]):
    """The kernels' dropout (seed, offset) from the op's seed tensor (an int64 CPU scalar in [0, 2**63), drawn
    from torch's generator by scaled_dot_product_attention)."""
    if seed is None:
        raise ValueError("seed: dropout_p > 0 needs the seed tensor (scaled_dot_product_attention draws it)")
    return (int(seed.item()), 0)


@_op("scaled_dot_product_attention")
def _sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
          is_causal: bool, scale: Optional[float], enable_gqa: bool, seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(output, lse): the attention and each query row's log-sum-exp, which the backward needs. With
    dropout_p > 0, seed (an int64 scalar tensor) keys the kernel's Philox mask; the backward regenerates it."""
    out = fastnn.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                              return_lse=True, rng=_rng_state(seed) if dropout_p > 0 else None)
    return _dense(out[0]), _dense(out[1])  # (out, lse[, rng_state]): the seed tensor keeps the rng state


def _sdpa_batch(query, key, value, enable_gqa):
    kb, vb = tuple(key.shape[:-2]), tuple(value.shape[:-2])
    if enable_gqa:
        kb, vb = kb[:-1] + (query.shape[-3],), vb[:-1] + (query.shape[-3],)
    return tuple(torch.broadcast_shapes(query.shape[:-2], kb, vb))


@_sdpa.register_fake
def _(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed):
    batch = _sdpa_batch(query, key, value, enable_gqa)
    # lse: float32 for bfloat16 / float16 inputs (fastnn.scaled_dot_product_attention's rule)
    lse_dtype = torch.float32 if query.dtype in (torch.bfloat16, torch.float16) else query.dtype
    return (query.new_empty(batch + (query.shape[-2], value.shape[-1])),
            query.new_empty(batch + (query.shape[-2],), dtype=lse_dtype))


@_op("scaled_dot_product_attention_backward")
def _sdpa_backward(grad_output: Tensor, query: Tensor, key: Tensor, value: Tensor, output: Tensor, lse: Tensor,
                   attn_mask: Optional[Tensor], dropout_p: float, is_causal: bool, scale: Optional[float],
                   enable_gqa: bool, seed: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    grads = fastnn.scaled_dot_product_attention_backward(grad_output, query, key, value, output, lse, attn_mask,
                                                         is_causal, scale, enable_gqa, dropout_p=dropout_p,
                                                         rng_state=_rng_state(seed) if dropout_p > 0 else None)
    return tuple(_dense(g) for g in grads)


@_sdpa_backward.register_fake
def _(grad_output, query, key, value, output, lse, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _sdpa_setup(ctx, inputs, output):
    query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed = inputs
    ctx.args = (dropout_p, is_causal, scale, enable_gqa)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(query, key, value, attn_mask, seed, *output)


def _sdpa_grad(ctx, grad_out, grad_lse):
    query, key, value, attn_mask, seed, out, lse = ctx.saved_tensors
    dq, dk, dv = _call("scaled_dot_product_attention_backward", grad_out, query, key, value, out, lse,
                       attn_mask, *ctx.args, seed)
    return dq, dk, dv, None, None, None, None, None, None


_autograd(_sdpa, _sdpa_grad, _sdpa_setup)


# ---- functions with torch.nn.functional's names ----------------------------------------------------------

def _check(name: str, *tensors: Tensor) -> None:
    """TypeError unless every tensor is a float32/float64/bfloat16/float16 CPU tensor (float32 on CUDA) of one
    dtype and device."""
    first = tensors[0]
    for i, t in enumerate(tensors):
        arg = name.split(",")[i].strip()
        if not isinstance(t, Tensor):
            raise TypeError(f"{arg}: expected a torch.Tensor, got {type(t).__name__}")
        ok = CPU_DTYPES if t.device.type == "cpu" else CUDA_DTYPES if t.device.type == "cuda" else ()
        if t.dtype not in ok:
            raise TypeError(f"{arg}: fastnn has no kernel for {t.dtype} tensors on {t.device.type} "
                            f"(expected {' or '.join(str(d) for d in ok) or 'a cpu or cuda tensor'})")
        if t.dtype != first.dtype or t.device != first.device:
            raise TypeError(f"{arg}: {t.dtype} on {t.device} does not match the first argument's "
                            f"{first.dtype} on {first.device}")


def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
           activation: Optional[str] = None) -> Tensor:
    """torch.nn.functional.linear: input @ weight.T + bias, with torch's weight layout (out_features,
    in_features) read transposed in place (no copy); activation="relu" fuses the ReLU into the product.

    input (..., in), weight (out, in), bias (out,) or None -> (..., out). float32/float64/bfloat16/float16 on the CPU
    (float32 on CUDA), one dtype. Differentiable in input, weight and bias."""
    _check("input, weight", input, weight)
    if bias is not None:
        _check("input, bias", input, bias)
    if activation not in (None, "relu"):
        raise ValueError(f"activation: expected None or 'relu', got {activation!r}")
    # Shapes in torch's layout here (the kernel's own checks would name the transposed weight it reads).
    if weight.dim() != 2 or input.dim() < 1 or input.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: expected input (..., in_features) and weight (out_features, in_features), got "
                         f"input {tuple(input.shape)} and weight {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias: expected shape ({weight.shape[0]},) (weight's out_features), got {tuple(bias.shape)}")
    return _call("linear", input, weight, bias, activation)


def matmul(input: Tensor, other: Tensor) -> Tensor:
    """torch.matmul: 1-D operands promoted (the added dimension removed), batch dimensions broadcast."""
    _check("input, other", input, other)
    if input.dim() == 0 or other.dim() == 0:
        raise ValueError(f"matmul: 0-d operands are not allowed (input.dim()={input.dim()}, "
                         f"other.dim()={other.dim()})")
    a = input.unsqueeze(0) if input.dim() == 1 else input
    b = other.unsqueeze(-1) if other.dim() == 1 else other
    out = _call("matmul", a, b)
    if other.dim() == 1:
        out = out.squeeze(-1)
    if input.dim() == 1:
        out = out.squeeze(-1 if other.dim() == 1 else -2)
    return out


def relu(input: Tensor) -> Tensor:
    """torch.nn.functional.relu (not in place): max(input, 0), NaN kept."""
    _check("input", input)
    return _call("relu", input)


def _dim(dim, input: Tensor) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim: expected an int, got {type(dim).__name__}")
    n = max(input.dim(), 1)
    if not -n <= dim < n:
        raise ValueError(f"dim: {dim} is out of range for a tensor of {input.dim()} dimension(s)")
    return dim


def softmax(input: Tensor, dim: int) -> Tensor:
    """torch.nn.functional.softmax along dim (an int)."""
    _check("input", input)
    return _call("softmax", input, _dim(dim, input))


def log_softmax(input: Tensor, dim: int) -> Tensor:
    """torch.nn.functional.log_softmax along dim (an int)."""
    _check("input", input)
    return _call("log_softmax", input, _dim(dim, input))


def cross_entropy(input: Tensor, target: Tensor, reduction: str = "mean", ignore_index: int = -100) -> Tensor:
    """torch.nn.functional.cross_entropy for class indices: input (N, C) logits, target (N,) int64.

    reduction "mean" (over the rows whose target is not ignore_index; NaN when there are none), "sum" or
    "none" ((N,) losses); a row whose target is ignore_index has zero loss and gradient. The loss and its
    gradient come from one fused pass; the backward only scales the saved gradient."""
    _check("input", input)
    if not isinstance(target, Tensor) or target.dtype != torch.int64:
        what = target.dtype if isinstance(target, Tensor) else type(target).__name__
        raise TypeError(f"target: expected an int64 tensor of class indices, got {what}")
    if target.device != input.device:
        raise TypeError(f"target: on {target.device}, input on {input.device}")
    return _call("cross_entropy", input, target, reduction, ignore_index)[0]


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention, flash-style, differentiable in query, key and value.

    query (..., Hq, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev) -> (..., Hq, L, Ev); attn_mask bool
    (True = may attend) or a float tensor of the query's dtype (added; no gradient flows to it),
    broadcastable to (..., L, S); is_causal aligned top-left as torch; scale default 1/sqrt(E); enable_gqa
    as torch. A query row with no allowed key gives zeros. dropout_p in [0, 1): each attention probability
    is dropped with probability dropout_p inside the kernel and the survivors scaled by 1 / (1 - dropout_p),
    as torch; the mask's seed is one draw from torch's default CPU generator per call (so torch.manual_seed
    makes a run repeatable, on CUDA tensors too) and the backward regenerates the same mask from it. The mask
    is fastnn's Philox mask (the README's *Attention dropout*), not the one torch's kernels draw; under
    torch.compile with inductor the draw comes from inductor's generator, so compiled and eager masks differ.
    dropout_p > 0 on CUDA tensors while a CUDA graph is being captured is a RuntimeError."""
    _check("query, key, value", query, key, value)
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask: expected a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool:
            _check("query, attn_mask", query, attn_mask)
    if scale is not None:
        scale = float(scale)
    dropout_p = dropout_p_value(dropout_p)
    seed = None
    if dropout_p > 0:
        if query.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("scaled_dot_product_attention: dropout_p > 0 cannot be captured in a CUDA graph "
                               "(the kernel's seed would be fixed at capture, every replay the same mask)")
        # One 63-bit seed per call from torch's CPU generator (a tensor: torch.compile traces the draw).
        seed = torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device="cpu")
    return _call("scaled_dot_product_attention", query, key, value, attn_mask, dropout_p, bool(is_causal), scale,
                 bool(enable_gqa), seed)[0]


CUSTOM_OPS = ("linear", "linear_backward", "matmul", "relu", "relu_backward", "softmax", "log_softmax",
              "softmax_backward", "log_softmax_backward", "cross_entropy", "scaled_dot_product_attention",
              "scaled_dot_product_attention_backward")
