"""The one bridge between torch tensors and the arrays fastnn's ops take, zero-copy both ways.

CPU tensors become numpy views (tensor.detach().numpy()) and numpy results become tensors sharing their
memory (torch.from_numpy); CUDA tensors become cupy views (through __cuda_array_interface__) and the
kernels run on torch's current stream. Every custom op in fastnn.torch calls fastnn through `run`, so
this file is the single place to change when fastnn's functions take and return tensors themselves.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch


def _array(t):
    if isinstance(t, list):
        return [_array(x) for x in t]
    if not isinstance(t, torch.Tensor):
        return t
    t = t.detach()
    if t.device.type == "cpu":
        return t.numpy()
    import cupy  # CUDA tensors only: cupy is needed for fastnn's GPU kernels anyway
    return cupy.asarray(t)


def _tensor(a, device):
    if isinstance(a, np.ndarray):
        t = torch.from_numpy(a if a.flags.writeable else a.copy())
    elif hasattr(a, "__cuda_array_interface__"):
        t = torch.as_tensor(a, device=device)
    else:
        return a
    # Fake (tracing) tensors are contiguous; so are the results, whatever layout a kernel left.
    return t if t.is_contiguous() else t.contiguous()


def _stream(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    import cupy
    return cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)


def run(fn, *args, **kwargs):
    """fn(*args, **kwargs) with every tensor argument (or list of tensors) passed as fastnn's array type and every array in the
    result (an array or a tuple of them and other values) returned as a tensor on the arguments' device."""
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
    with _stream(device):
        out = fn(*(_array(a) for a in args), **{k: _array(v) for k, v in kwargs.items()})
    if isinstance(out, tuple):
        return tuple(_tensor(o, device) for o in out)
    return _tensor(out, device)
