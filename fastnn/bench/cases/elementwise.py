"""Element-wise ops: relu (out of place, in place, a tiny call on numpy arrays and on torch tensors) and
relu_backward."""
from __future__ import annotations

import numpy as np

import fastnn
from fastnn import reference

from ..case import EST_FLOPS, F32, Case, _elements, _randn, _tensor


def relu_case(n, inplace, only="") -> Case:
    """ReLU over n elements into a preallocated out= (fresh 64 MiB pages would cost more than the kernel),
    or in place (out=x). ReLU is idempotent, so repeating it in place keeps timing the same work."""
    def fastnn_impl(x, torch):
        src = x["x"].copy()
        dst = src if inplace else np.empty_like(src)
        return lambda: fastnn.relu(src, out=dst)

    def numpy_impl(x, torch):
        src = x["x"].copy()
        dst = src if inplace else np.empty_like(src)
        return lambda: np.maximum(src, F32(0), out=dst)

    def torch_impl(x, torch):
        src = _tensor(torch, x["x"])
        if inplace:
            return lambda: torch.relu_(src)
        dst = torch.empty_like(src)
        return lambda: torch.clamp_min(src, 0.0, out=dst)  # torch.relu has no out=

    return Case(
        "relu", f"{_elements(n)} " + ("in place out=x" if inplace else "out=y"),
        inputs=lambda rng: {"x": _randn(rng, (n,))},
        impls={"fastnn": fastnn_impl, "numpy": numpy_impl, "torch": torch_impl},
        expected=lambda x: reference.relu(x["x"].astype(np.float64)),
        work=2.0 * 4 * n, unit="byte", limit="mem_rw_gbs" if inplace else "mem_copy_gbs",
        formula="4*n read + 4*n written", tol=0.0, only=only, est_flops=EST_FLOPS["relu"] * n)


def tiny_relu_case(n, torch_arrays=False) -> Case:
    """The call overhead: ReLU on a handful of elements, every implementation allocating its result
    as a user would write it (`np.maximum(x, 0)`, `torch.relu(t)`); with `torch_arrays`, fastnn is
    called on the torch tensor (`fastnn.relu(t)`, a tensor back) instead of the numpy array."""
    def fastnn_impl(x, torch):
        a = _tensor(torch, x["x"]) if torch_arrays else x["x"]
        return lambda: fastnn.relu(a)

    def torch_impl(x, torch):
        t = _tensor(torch, x["x"])
        return lambda: torch.relu(t)

    return Case(
        "relu", f"{n} (tiny call{', torch.Tensor' if torch_arrays else ''})",
        inputs=lambda rng: {"x": _randn(rng, (n,))},
        impls={"fastnn": fastnn_impl,
               "numpy": lambda x, torch: lambda: np.maximum(x["x"], F32(0)),
               "torch": torch_impl},
        expected=lambda x: reference.relu(x["x"].astype(np.float64)),
        work=1, unit="call", limit=None, formula="time per call", tol=0.0,
        notes="allocating" + ("; fastnn on torch tensors" if torch_arrays else ""), torch_arrays=torch_arrays)


def relu_backward_case(n) -> Case:
    def fastnn_impl(x, torch):
        out = np.empty_like(x["x"])
        return lambda: fastnn.relu_backward(x["grad"], x["x"], out=out)

    def numpy_impl(x, torch):
        out = np.empty_like(x["x"])
        return lambda: np.multiply(x["grad"], x["x"] > 0, out=out)

    def torch_impl(x, torch):
        g, t, out = _tensor(torch, x["grad"]), _tensor(torch, x["x"]), torch.empty(n)
        op = torch.ops.aten.threshold_backward
        try:  # the out= overload, so torch writes into a preallocated buffer like the others
            op.grad_input(g, t, 0.0, grad_input=out)
            return lambda: op.grad_input(g, t, 0.0, grad_input=out)
        except Exception:
            return lambda: op(g, t, 0.0)

    return Case(
        "relu_backward", f"{_elements(n)} out=",
        inputs=lambda rng: {"grad": _randn(rng, (n,)), "x": _randn(rng, (n,))},
        impls={"fastnn": fastnn_impl, "numpy": numpy_impl, "torch": torch_impl},
        expected=lambda x: reference.relu_backward(x["grad"].astype(np.float64), x["x"]),
        work=3.0 * 4 * n, unit="byte", limit="mem_copy_gbs",
        formula="8*n read + 4*n written", tol=0.0, est_flops=EST_FLOPS["relu_backward"] * n)
