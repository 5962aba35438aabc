"""The one bridge between torch tensors and the arrays fastnn's ops take, zero-copy both ways.

CPU tensors become numpy views (tensor.detach().numpy()) and numpy results become tensors sharing their
memory (torch.from_numpy); CUDA tensors become cupy views (through __cuda_array_interface__) and the
kernels run on torch's current stream. Every custom op in fastnn.torch calls fastnn through `run`, so
this file is the single place to change when fastnn's functions take and return tensors themselves.
"""
from __future__ import annotations

import numpy as np
import torch


def _numpy(t):
    t = t.detach() if t.requires_grad else t
    if t.dtype is torch.bfloat16:  # numpy has no bfloat16 of its own: the bits, viewed as ml_dtypes' one
        from fastnn._backend import bf16_dtype
        return t.view(torch.int16).numpy().view(bf16_dtype())
    return t.numpy()


def _cpu(a):
    if isinstance(a, torch.Tensor):
        return _numpy(a)
    if type(a) is list and a and isinstance(a[0], torch.Tensor):  # the optimizer's lists of tensors
        return [_numpy(x) for x in a]
    return a


def _cuda(a):
    if isinstance(a, torch.Tensor):
        import cupy  # CUDA tensors only: cupy is needed for fastnn's GPU kernels anyway
        return cupy.asarray(a.detach())
    if type(a) is list:
        return [_cuda(x) for x in a]
    return a


def _tensor(a, device):
    if type(a) is np.ndarray:
        a = a if a.flags.writeable else a.copy()
        if a.dtype.kind == "V" and a.dtype.name == "bfloat16":
            t = torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(a)
    elif hasattr(a, "__cuda_array_interface__"):
        t = torch.as_tensor(a, device=device)
    else:
        return a
    # Fake (tracing) tensors are contiguous; so are the results, whatever layout a kernel left.
    return t if t.is_contiguous() else t.contiguous()


def run(fn, *args, **kwargs):
    """fn(*args, **kwargs) with every tensor argument (or list of tensors) passed as fastnn's array type and
    every array in the result (an array or a tuple of them and other values) returned as a tensor on the
    device of the first argument (a tensor or a list of tensors)."""
    first = args[0][0] if type(args[0]) is list else args[0]
    if first.device.type == "cpu":
        device = None
        out = fn(*[_cpu(a) for a in args], **{k: _cpu(v) for k, v in kwargs.items()})
    else:
        import cupy
        device = first.device
        with cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream):
            out = fn(*[_cuda(a) for a in args], **{k: _cuda(v) for k, v in kwargs.items()})
    if type(out) is tuple:
        return tuple(_tensor(o, device) for o in out)
    return _tensor(out, device)
