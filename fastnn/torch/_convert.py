"""The one bridge between torch tensors and the arrays fastnn's ops take, zero-copy both ways.

CPU tensors become numpy views (tensor.detach().numpy()) and numpy results become tensors sharing their
memory (torch.from_numpy); CUDA tensors become cupy views (through __cuda_array_interface__) and the
kernels run on torch's current stream. Every custom op in fastnn.torch calls fastnn through `run`, so
this file is the single place to change when fastnn's functions take and return tensors themselves.
"""
from __future__ import annotations

import numpy as np
import torch


def _cpu(a):
    if isinstance(a, torch.Tensor):
        return a.detach().numpy() if a.requires_grad else a.numpy()
    if type(a) is list and a and isinstance(a[0], torch.Tensor):  # the optimizer's lists of tensors
        return [x.detach().numpy() if x.requires_grad else x.numpy() for x in a]
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
        t = torch.from_numpy(a if a.flags.writeable else a.copy())
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
