"""Row reductions: softmax, log_softmax, their backward passes and cross_entropy."""
from __future__ import annotations

import numpy as np

import fastnn
from fastnn import reference

from ..case import EST_FLOPS, F32, Case, _randn, _tensor, rel_error


def softmax_case(rows, cols, log) -> Case:
    """softmax or log_softmax over the last axis; every implementation allocates its result."""
    name = "log_softmax" if log else "softmax"
    fast_fn = fastnn.log_softmax if log else fastnn.softmax
    ref_fn = reference.log_softmax if log else reference.softmax

    def torch_impl(x, torch):
        t = _tensor(torch, x["x"])
        fn = torch.log_softmax if log else torch.softmax
        return lambda: fn(t, -1)

    return Case(
        name, f"({rows},{cols})",
        inputs=lambda rng: {"x": _randn(rng, (rows, cols)) * F32(4)},
        impls={"fastnn": lambda x, torch: lambda: fast_fn(x["x"], -1),
               "numpy": lambda x, torch: lambda: ref_fn(x["x"], -1),
               "torch": torch_impl},
        expected=lambda x: ref_fn(x["x"].astype(np.float64), -1),
        work=2.0 * 4 * rows * cols, unit="byte", limit="mem_copy_gbs",
        formula="4*n read + 4*n written", notes="allocating", est_flops=EST_FLOPS[name] * rows * cols)


def softmax_backward_case(rows, cols, log=False) -> Case:
    """softmax_backward (y * (g - sum(g*y)), y the softmax) or log_softmax_backward (g - exp(y) * sum(g),
    y the log-probabilities); every implementation allocates its result."""
    name = "log_softmax_backward" if log else "softmax_backward"
    fwd = reference.log_softmax if log else reference.softmax

    def inputs(rng):
        return {"grad": _randn(rng, (rows, cols)),
                "output": fwd(_randn(rng, (rows, cols)) * F32(4), -1).astype(F32)}

    def numpy_fn(g, y):
        if log:
            return g - np.exp(y) * np.sum(g, axis=-1, keepdims=True)
        return reference.softmax_backward(g, y, -1)

    def torch_impl(x, torch):
        g, y = _tensor(torch, x["grad"]), _tensor(torch, x["output"])
        fn = torch._log_softmax_backward_data if log else torch._softmax_backward_data
        return lambda: fn(g, y, -1, y.dtype)

    fast_fn = fastnn.log_softmax_backward if log else fastnn.softmax_backward
    return Case(
        name, f"({rows},{cols})", inputs=inputs,
        impls={"fastnn": lambda x, torch: lambda: fast_fn(x["grad"], x["output"], -1),
               "numpy": lambda x, torch: lambda: numpy_fn(x["grad"], x["output"]),
               "torch": torch_impl},
        expected=lambda x: numpy_fn(x["grad"].astype(np.float64), x["output"].astype(np.float64)),
        work=3.0 * 4 * rows * cols, unit="byte", limit="mem_copy_gbs",
        formula="8*n read + 4*n written", notes="allocating", est_flops=EST_FLOPS[name] * rows * cols)


def cross_entropy_case(rows, cols) -> Case:
    """Loss and gradient together: for PyTorch that is forward + backward."""
    def torch_impl(x, torch):
        import torch.nn.functional as F
        logits = _tensor(torch, x["logits"]).requires_grad_()
        labels = torch.from_numpy(x["labels"].astype(np.int64))

        def call():
            logits.grad = None
            loss = F.cross_entropy(logits, labels)
            loss.backward()
            return loss.item(), logits.grad
        return call

    def error(result, want, inputs):
        (loss, grad), (want_loss, want_grad) = result, want
        return max(abs(float(loss) - want_loss) / max(abs(want_loss), 1e-30), rel_error(grad, want_grad))

    return Case(
        "cross_entropy", f"({rows},{cols})",
        inputs=lambda rng: {"logits": _randn(rng, (rows, cols)) * F32(4),
                            "labels": rng.integers(0, cols, rows, dtype=np.int64)},
        impls={"fastnn": lambda x, torch: lambda: fastnn.cross_entropy(x["logits"], x["labels"]),
               "numpy": lambda x, torch: lambda: reference.cross_entropy(x["logits"], x["labels"]),
               "torch": torch_impl},
        expected=lambda x: reference.cross_entropy(x["logits"].astype(np.float64), x["labels"]),
        error=error, work=2.0 * 4 * rows * cols + 8 * rows, unit="byte", limit="mem_copy_gbs",
        formula="4*N*C logits read + 4*N*C grad written + 8*N labels", notes="allocating",
        est_flops=EST_FLOPS["cross_entropy"] * rows * cols)
