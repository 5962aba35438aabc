"""fastnn.torch.patch(): torch.nn.functional's linear, relu, softmax, log_softmax, cross_entropy and
scaled_dot_product_attention routed to fastnn for every call fastnn supports and to torch's own function
for every other call, so patched code never fails where unpatched code runs. The *_supported predicates
below are the whole routing rule; they read only types, dtypes, devices, shapes and argument values (no
tensor data), so torch.compile traces them without a graph break."""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

from . import _ops

F = torch.nn.functional
PATCHED = ("linear", "relu", "softmax", "log_softmax", "cross_entropy", "scaled_dot_product_attention")
_PLAIN = (Tensor, torch.nn.Parameter)
# The tensors torch.compile's tracing passes through a patched function that dynamo keeps as one call (it
# treats some torch.nn.functional names so): fake tensors, and the functional tensors of AOT autograd.
from torch._subclasses.fake_tensor import FakeTensor  # noqa: E402
from torch._subclasses.functional_tensor import FunctionalTensor  # noqa: E402

_TRACING = (FakeTensor, FunctionalTensor)
_saved = None  # torch's functions while patched


try:  # torch >= 2.4 takes the device type; older spellings kept for the CPU
    torch.is_autocast_enabled("cpu")
    _autocast = torch.is_autocast_enabled
except TypeError:  # pragma: no cover - depends on the torch version
    def _autocast(dev):
        return torch.is_autocast_cpu_enabled() if dev == "cpu" else torch.is_autocast_enabled()


@functools.lru_cache(maxsize=None)
def _cuda_kernels() -> bool:
    import fastnn
    return fastnn.cuda_is_available()


def _plain(t) -> bool:
    return type(t) in _PLAIN or isinstance(t, _TRACING)


def _kernel(t) -> bool:
    """Whether fastnn has a kernel for tensor t: a plain tensor (not a subclass with __torch_function__),
    float32/float64/bfloat16/float16 on the CPU or float32 on a CUDA device fastnn runs on, outside autocast."""
    if not _plain(t):
        return False
    dev = t.device.type
    if dev == "cpu":
        ok = t.dtype in _ops.CPU_DTYPES
    elif dev == "cuda":
        ok = t.dtype in _ops.CUDA_DTYPES and _cuda_kernels()
    else:
        return False
    return ok and not _autocast(dev)


def _same(first, *rest) -> bool:
    return all(_kernel(t) and t.dtype == first.dtype and t.device == first.device for t in (first,) + rest)


def linear_supported(input, weight, bias=None) -> bool:
    if not (_same(input, weight) and weight.dim() == 2 and input.dim() >= 1 and input.shape[-1] == weight.shape[1]):
        return False
    return bias is None or (_same(input, bias) and bias.dim() == 1 and bias.shape[0] == weight.shape[0])


def _softmax_supported(input, dim, dtype) -> bool:
    return (dtype is None and type(dim) is int and _kernel(input) and input.dim() >= 1
            and -input.dim() <= dim < input.dim())


def _cross_entropy_supported(input, target, weight, size_average, ignore_index, reduce, reduction,
                             label_smoothing) -> bool:
    return (weight is None and size_average is None and reduce is None and label_smoothing == 0.0
            and reduction in ("mean", "sum", "none") and type(ignore_index) is int
            and _kernel(input) and input.dim() == 2 and _plain(target) and target.dtype == torch.int64
            and target.device == input.device and target.dim() == 1 and target.shape[0] == input.shape[0])


def _sdpa_supported(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> bool:
    if dropout_p and isinstance(query, torch.Tensor) and query.is_cuda and torch.cuda.is_current_stream_capturing():
        return False  # fastnn's dropout cannot be captured in a CUDA graph (its seed is read on the host)
    if not (type(dropout_p) in (int, float) and 0 <= dropout_p < 1 and type(is_causal) is bool
            and type(enable_gqa) is bool and (scale is None or type(scale) in (int, float)) and _same(query, key, value)):
        return False
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        return False
    if query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2]:
        return False
    if enable_gqa and (query.dim() < 3 or key.dim() < 3 or value.dim() < 3 or key.shape[-3] != value.shape[-3]
                       or key.shape[-3] == 0 or query.shape[-3] % key.shape[-3] != 0):
        return False
    if attn_mask is None:
        return True
    return (not is_causal and _plain(attn_mask) and attn_mask.device == query.device
            and not attn_mask.requires_grad and (attn_mask.dtype == torch.bool or attn_mask.dtype == query.dtype))


# ---- the patched functions: torch's signatures, fastnn when supported, else torch's function ------------

def _linear(input, weight, bias=None, *args, **kwargs):
    if not args and not kwargs and linear_supported(input, weight, bias):
        return _ops.linear(input, weight, bias)
    return _saved["linear"](input, weight, bias, *args, **kwargs)


def _relu(input, inplace=False, *args, **kwargs):
    if not inplace and not args and not kwargs and _kernel(input):
        return _ops.relu(input)
    return _saved["relu"](input, inplace, *args, **kwargs)


def _softmax(input, dim=None, _stacklevel=3, dtype=None, *args, **kwargs):
    if not args and not kwargs and _softmax_supported(input, dim, dtype):
        return _ops.softmax(input, dim)
    return _saved["softmax"](input, dim, _stacklevel, dtype, *args, **kwargs)


def _log_softmax(input, dim=None, _stacklevel=3, dtype=None, *args, **kwargs):
    if not args and not kwargs and _softmax_supported(input, dim, dtype):
        return _ops.log_softmax(input, dim)
    return _saved["log_softmax"](input, dim, _stacklevel, dtype, *args, **kwargs)


def _cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                   reduction="mean", label_smoothing=0.0, *args, **kwargs):
    if not args and not kwargs and _cross_entropy_supported(input, target, weight, size_average, ignore_index,
                                                            reduce, reduction, label_smoothing):
        return _ops.cross_entropy(input, target, reduction, ignore_index)
    return _saved["cross_entropy"](input, target, weight, size_average, ignore_index, reduce, reduction,
                                   label_smoothing, *args, **kwargs)


def _scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                  enable_gqa=False, *args, **kwargs):
    if not args and not kwargs and _sdpa_supported(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                   enable_gqa):
        return _ops.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                 enable_gqa)
    if enable_gqa is not False:  # torch < 2.5 has no enable_gqa: pass it only when it is used
        kwargs["enable_gqa"] = enable_gqa
    return _saved["scaled_dot_product_attention"](query, key, value, attn_mask, dropout_p, is_causal, *args,
                                                  scale=scale, **kwargs)


_REPLACEMENTS = {"linear": _linear, "relu": _relu, "softmax": _softmax, "log_softmax": _log_softmax,
                 "cross_entropy": _cross_entropy, "scaled_dot_product_attention": _scaled_dot_product_attention}


def patch() -> None:
    """Routes torch.nn.functional.linear, relu, softmax, log_softmax, cross_entropy and
    scaled_dot_product_attention to fastnn for every call it supports (see the README's PyTorch section),
    and to torch's own function otherwise. Modules that call them (nn.Linear, nn.ReLU, nn.Softmax,
    nn.LogSoftmax, nn.CrossEntropyLoss, nn.MultiheadAttention's projections...) follow. Calling it again
    while patched does nothing; unpatch() restores torch."""
    global _saved
    if _saved is not None:
        return
    _saved = {name: getattr(F, name) for name in PATCHED}
    for name in PATCHED:
        new = _REPLACEMENTS[name]
        functools.update_wrapper(new, _saved[name], assigned=("__doc__",), updated=())
        setattr(F, name, new)


def unpatch() -> None:
    """Restores torch.nn.functional exactly as it was before patch(); does nothing when not patched."""
    global _saved
    if _saved is None:
        return
    for name, fn in _saved.items():
        setattr(F, name, fn)
    _saved = None


def is_patched() -> bool:
    return _saved is not None


@contextlib.contextmanager
def patched():
    """`with fastnn.torch.patched():` patches for the block and restores torch after it (unless it was
    already patched before the block)."""
    was = is_patched()
    patch()
    try:
        yield
    finally:
        if not was:
            unpatch()
