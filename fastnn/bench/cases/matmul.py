"""Matrix products: matmul (square, network shapes, batched, float64, a tiny call on numpy arrays and on torch
tensors), linear, linear_backward."""
from __future__ import annotations

import math

import numpy as np

import fastnn
from fastnn import reference

from ..case import CHEAP_CHECK_FLOPS, F32, Case, _f64, _max_error, _np, _randn, _tensor, rel_error


def matmul_case(m, k, n, batch=None, dtype=F32, only="", alloc=False, torch_arrays=False) -> Case:
    """(B,) M x K @ K x N. All implementations write into a preallocated out=, or with `alloc` (the
    tiny-call rows: what a user writes, `a @ b`) all allocate their result; `torch_arrays` (with
    `alloc`) calls fastnn on torch tensors."""
    lead = (batch,) if batch else ()
    out_shape = lead + (m, n)
    work = 2.0 * (batch or 1) * m * n * k
    cheap = work > CHEAP_CHECK_FLOPS or max(m * k, k * n, m * n) >= 2**24
    t = np.random.default_rng(1).standard_normal(n)        # the cheap check's vector

    def numpy_impl(x, torch):
        if alloc:
            return lambda: np.matmul(x["a"], x["b"])
        c = np.empty(out_shape, dtype)
        return lambda: np.matmul(x["a"], x["b"], out=c)

    def fastnn_impl(x, torch):
        if alloc:
            a, b = (_tensor(torch, x["a"]), _tensor(torch, x["b"])) if torch_arrays else (x["a"], x["b"])
            return lambda: fastnn.matmul(a, b)
        c = np.empty(out_shape, dtype)
        return lambda: fastnn.matmul(x["a"], x["b"], out=c)

    def torch_impl(x, torch):
        a, b = _tensor(torch, x["a"]), _tensor(torch, x["b"])
        if alloc:
            return lambda: torch.matmul(a, b)
        c = torch.empty(out_shape, dtype=a.dtype)
        return lambda: torch.matmul(a, b, out=c)

    def expected(x):
        if not cheap:
            return reference.matmul(**_f64(x))
        return np.asarray(x["a"], np.float64) @ (np.asarray(x["b"], np.float64) @ t)

    def error(result, want, inputs):
        got = np.asarray(_np(result))
        return rel_error(got @ t if cheap and got.shape == out_shape else got, want)

    if batch:
        label = f"({batch},{m},{k})@({batch},{k},{n})"
    else:
        label = f"{m}x{k} @ {k}x{n}"
    size = np.dtype(dtype).itemsize
    if dtype != F32:
        label += f" {np.dtype(dtype).name}"
    notes = ("allocating" if alloc else "out= preallocated") + ("; checked as C@t vs A@(B@t)" if cheap else "")
    if alloc:
        return Case(
            "matmul", label + (" (tiny call, torch.Tensor)" if torch_arrays else " (tiny call)"),
            inputs=lambda rng: {"a": _randn(rng, lead + (m, k), dtype), "b": _randn(rng, lead + (k, n), dtype)},
            impls={"fastnn": fastnn_impl, "numpy": numpy_impl, "torch": torch_impl},
            expected=expected, error=error, work=1, unit="call", limit=None,
            formula="time per call", notes=notes + ("; fastnn on torch tensors" if torch_arrays else ""),
            only=only, torch_arrays=torch_arrays)
    return Case(
        "matmul", label,
        inputs=lambda rng: {"a": _randn(rng, lead + (m, k), dtype), "b": _randn(rng, lead + (k, n), dtype)},
        impls={"fastnn": fastnn_impl, "numpy": numpy_impl, "torch": torch_impl},
        expected=expected, error=error, tol=1e-4 if dtype == F32 else 1e-12,
        work=work, unit="flop", limit="peak_gflops_f32" if dtype == F32 else "peak_gflops_f64",
        formula="2*B*M*N*K", notes=notes, only=only, blas=True,
        traffic=size * (batch or 1) * (m * k + k * n + m * n))


def linear_case(batch, n_in, n_out) -> Case:
    """x @ w + b then ReLU; every implementation allocates its result (fastnn.linear has no out=)."""
    def fastnn_impl(x, torch):
        return lambda: fastnn.linear(x["x"], x["weight"], x["bias"], activation="relu")

    def numpy_impl(x, torch):
        return lambda: np.maximum(x["x"] @ x["weight"] + x["bias"], F32(0))

    def torch_impl(x, torch):
        tx, tw, tb = (_tensor(torch, x[k]) for k in ("x", "weight", "bias"))
        return lambda: torch.relu_(torch.addmm(tb, tx, tw))

    return Case(
        "linear", f"{batch}x{n_in} -> {n_out} +bias relu",
        inputs=lambda rng: {"x": _randn(rng, (batch, n_in)), "weight": _randn(rng, (n_in, n_out)),
                            "bias": _randn(rng, (n_out,))},
        impls={"fastnn": fastnn_impl, "numpy": numpy_impl, "torch": torch_impl},
        expected=lambda x: reference.linear(**_f64(x), activation="relu"),
        work=2.0 * batch * n_in * n_out, unit="flop", limit="peak_gflops_f32",
        formula="2*M*N*K", notes="allocating", blas=True,
        traffic=4.0 * (batch * n_in + n_in * n_out + n_out + batch * n_out))


def linear_backward_case(batch, n_in, n_out) -> Case:
    """(grad_x, grad_weight, grad_bias) of x @ w + b. PyTorch: autograd's backward of addmm, the
    forward run once when bound, every call `torch.autograd.grad(..., retain_graph=True)`."""
    def torch_impl(x, torch):
        tx, tw, tb = (_tensor(torch, x[k]).requires_grad_() for k in ("x", "weight", "bias"))
        y = torch.addmm(tb, tx, tw)
        g = _tensor(torch, x["grad"])
        return lambda: torch.autograd.grad(y, (tx, tw, tb), g, retain_graph=True)

    def expected(x):
        return reference.linear_backward(*(x[k].astype(np.float64) for k in ("grad", "x", "weight")))

    def error(result, want, inputs):
        return _max_error(zip(result, want)) if len(result) == 3 else math.inf

    return Case(
        "linear_backward", f"{batch}x{n_in} -> {n_out} +bias",
        inputs=lambda rng: {"grad": _randn(rng, (batch, n_out)), "x": _randn(rng, (batch, n_in)),
                            "weight": _randn(rng, (n_in, n_out)), "bias": _randn(rng, (n_out,))},
        impls={"fastnn": lambda x, torch: lambda: fastnn.linear_backward(x["grad"], x["x"], x["weight"]),
               "numpy": lambda x, torch: lambda: reference.linear_backward(x["grad"], x["x"], x["weight"]),
               "torch": torch_impl},
        expected=expected, error=error,
        work=4.0 * batch * n_in * n_out, unit="flop", limit="peak_gflops_f32",
        formula="2 products of 2*M*N*K (grad_x, grad_weight)", notes="allocating; torch: autograd.grad",
        requires="linear_backward", blas=True,
        traffic=4.0 * (2 * batch * n_out + 2 * batch * n_in + 2 * n_in * n_out + n_out))
