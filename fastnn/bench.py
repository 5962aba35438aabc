"""`python -m fastnn bench`: times every op against NumPy (and PyTorch when it imports), side by side in
one run, after checking each result against the float64 oracle in `fastnn.reference`.

The pieces are small so later work can extend them: a `Case` is one row (how to make its inputs, how to
call each implementation, the float64 oracle, the work one call does and which machine limit bounds
it); `CASES` lists the rows; `machine_limits()` measures what the machine can do; `time_call()` times
one call; `run()` ties them together for one or several thread counts, `format_report()` prints the
tables and `plot_roofline()` draws them. The pytest-benchmark suite in bench/ reuses `CASES`.
"""
from __future__ import annotations

import ctypes
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

import fastnn
from fastnn import reference

IMPLS = ("fastnn", "numpy", "torch")
F32 = np.float32


# --------------------------------------------------------------------------------------------------
# Cases

@dataclass
class Case:
    """One benchmark row.

    `inputs(rng)` makes the inputs once; `impls[name](inputs, torch)` binds one implementation to its
    own copies and output buffers and returns a zero-argument call that returns the result (for
    in-place ops: the arrays it updated). `expected(inputs)` is the oracle, computed in float64, and
    `error(result, expected, inputs)` the relative error of a result, which must stay <= `tol`.
    `work` is the flops (unit "flop"), bytes read + written (unit "byte") of one call, counted by
    `formula`, or 1 (unit "call": a tiny-array row where only the time per call matters); `limit`
    names the `machine_limits()` entry that bounds it. For the roofline plot, a flop row also gives
    `traffic` (the bytes it must at least read and write) and a byte row `est_flops` (an estimate).
    `only` is "full" for a row run only without --quick, "quick" for its shrunk --quick stand-in;
    `requires` names a fastnn attribute the row needs (skipped when fastnn lacks it); `blas` says
    that NumPy's implementation (or the oracle) runs BLAS, whose idle threads spin for a while.
    """
    op: str
    label: str
    inputs: Callable[[np.random.Generator], Dict[str, np.ndarray]]
    impls: Dict[str, Callable[[Dict[str, np.ndarray], Any], Callable[[], Any]]]
    expected: Callable[[Dict[str, np.ndarray]], Any]
    work: float
    unit: str
    limit: Optional[str]
    formula: str
    error: Callable[[Any, Any, Dict[str, np.ndarray]], float] = None
    tol: float = 1e-4
    notes: str = ""
    traffic: Optional[float] = None
    est_flops: Optional[float] = None
    only: str = ""
    requires: str = ""
    blas: bool = False

    def __post_init__(self):
        if self.error is None:
            self.error = lambda result, want, inputs: rel_error(result, want)

    @property
    def id(self) -> str:
        return f"{self.op}[{self.label}]"

    def available(self) -> bool:
        return not self.requires or hasattr(fastnn, self.requires)


def rel_error(got, want) -> float:
    """||got - want|| / ||want|| in float64 (inf on a shape mismatch or a missing result, NaN stays NaN)."""
    if hasattr(got, "detach"):  # a torch tensor
        got = got.detach().numpy()
    if got is None:
        return math.inf
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return math.inf
    scale = np.linalg.norm(want)
    diff = np.linalg.norm(got - want)
    return float(diff / scale) if scale else float(diff)


def _np(x):
    """A torch tensor as a numpy array (anything else unchanged)."""
    return x.detach().numpy() if hasattr(x, "detach") else x


def _randn(rng, shape, dtype=F32):
    return rng.standard_normal(shape, dtype=dtype)


def _f64(x):
    return {k: np.asarray(v, np.float64) if v.dtype.kind == "f" else v for k, v in x.items()}


def _tensor(torch, a):
    """A torch tensor on a private copy of `a` (so no implementation sees another's writes)."""
    return torch.from_numpy(np.array(a, copy=True))


def _elements(n):
    return f"{n // 2**20}M" if n % 2**20 == 0 else str(n)


def _max_error(pairs) -> float:
    """The largest rel_error over (got, want) pairs (inf when a result is missing)."""
    pairs = list(pairs)
    return max(rel_error(_np(g), w) for g, w in pairs) if pairs else math.inf


# Flops per element (Adam: per parameter) of the memory-bound ops, estimated for the roofline plot only:
# compares, adds and multiplies count 1, an exp ~10 (range reduction + a degree-6 polynomial + scaling).
EST_FLOPS = {"relu": 1, "relu_backward": 1, "softmax": 14, "log_softmax": 14, "softmax_backward": 4,
             "log_softmax_backward": 13, "cross_entropy": 15, "adam": 12}


# Big products (over 2^31 flops, or an operand of 16M elements) are checked the cheap way (STYLE 10):
# C @ t against A @ (B @ t) in float64 for a random vector t, O(MK + KN + MN) instead of a float64
# product as large as the one timed.
CHEAP_CHECK_FLOPS = 2.0 * 2**30


def matmul_case(m, k, n, batch=None, dtype=F32, only="", alloc=False) -> Case:
    """(B,) M x K @ K x N. All implementations write into a preallocated out=, or with `alloc` (the
    tiny-call rows: what a user writes, `a @ b`) all allocate their result."""
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
            return lambda: fastnn.matmul(x["a"], x["b"])
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
            "matmul", label + " (tiny call)",
            inputs=lambda rng: {"a": _randn(rng, lead + (m, k), dtype), "b": _randn(rng, lead + (k, n), dtype)},
            impls={"fastnn": fastnn_impl, "numpy": numpy_impl, "torch": torch_impl},
            expected=expected, error=error, work=1, unit="call", limit=None,
            formula="time per call", notes=notes, only=only)
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


def tiny_relu_case(n) -> Case:
    """The call overhead: ReLU on a handful of elements, every implementation allocating its result
    as a user would write it (`np.maximum(x, 0)`, `torch.relu(t)`)."""
    def torch_impl(x, torch):
        t = _tensor(torch, x["x"])
        return lambda: torch.relu(t)

    return Case(
        "relu", f"{n} (tiny call)",
        inputs=lambda rng: {"x": _randn(rng, (n,))},
        impls={"fastnn": lambda x, torch: lambda: fastnn.relu(x["x"]),
               "numpy": lambda x, torch: lambda: np.maximum(x["x"], F32(0)),
               "torch": torch_impl},
        expected=lambda x: reference.relu(x["x"].astype(np.float64)),
        work=1, unit="call", limit=None, formula="time per call", tol=0.0, notes="allocating")


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


def _by_heads(fn, arrays, length, **kw):
    """fn over the (batch, head) matrices of `arrays` (each (B, H, L, .)), a few heads at a time so the
    float64 oracle's L x S score matrices stay near 128 MiB each; results concatenated back."""
    lead = arrays[0].shape[:-2]
    flat = [a.reshape((-1,) + a.shape[-2:]) for a in arrays]
    step = max(1, 2**24 // (length * length))
    parts = [fn(*(a[i:i + step] for a in flat), **kw) for i in range(0, flat[0].shape[0], step)]
    if isinstance(parts[0], tuple):
        return tuple(np.concatenate(p).reshape(lead + p[0].shape[-2:]) for p in zip(*parts))
    return np.concatenate(parts).reshape(lead + parts[0].shape[-2:])


def _sdpa_pairs(length, causal):
    # Causal (top-left aligned, L == S): only the L*(L+1)/2 allowed query-key pairs count, about half.
    return length * (length + 1) / 2 if causal else length * length


def sdpa_case(batch, heads, length, dim, causal, only="") -> Case:
    shape = (batch, heads, length, dim)
    # Non-causal: q@k^T and p@v each cost 2*L*S*E per head.
    pairs = _sdpa_pairs(length, causal)

    def torch_impl(x, torch):
        import torch.nn.functional as F
        q, k, v = (_tensor(torch, x[n]) for n in ("query", "key", "value"))
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def expected(x):
        q, k, v = (x[n].astype(np.float64) for n in ("query", "key", "value"))
        return _by_heads(reference.scaled_dot_product_attention, (q, k, v), length, is_causal=causal)

    return Case(
        "sdpa", f"({batch},{heads},{length},{dim})" + (" causal" if causal else ""),
        inputs=lambda rng: {n: _randn(rng, shape) for n in ("query", "key", "value")},
        impls={"fastnn": lambda x, torch: lambda: fastnn.scaled_dot_product_attention(
                   x["query"], x["key"], x["value"], is_causal=causal),
               "numpy": lambda x, torch: lambda: reference.scaled_dot_product_attention(
                   x["query"], x["key"], x["value"], is_causal=causal),
               "torch": torch_impl},
        expected=expected,
        work=4.0 * batch * heads * pairs * dim, unit="flop", limit="peak_gflops_f32",
        formula="4*B*H*E*L*S" + (" with L*S -> L*(L+1)/2" if causal else ""), notes="allocating",
        only=only, blas=True, traffic=4.0 * 4 * batch * heads * length * dim)


def sdpa_backward_case(batch, heads, length, dim, causal, only="") -> Case:
    """The backward alone: the forward's output and log-sum-exp (fastnn's, float32) are inputs made
    once. PyTorch: autograd's backward of its scaled_dot_product_attention, the forward run once when
    the call is bound and every call `torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)`:
    what it times is the saved-tensor backward kernel (the same inputs fastnn's gets: q, k, v, out,
    lse, grad_out), nothing accumulated into .grad. NumPy: fastnn.reference's dense backward."""
    shape = (batch, heads, length, dim)
    pairs = _sdpa_pairs(length, causal)
    qkv = ("query", "key", "value")

    def inputs(rng):
        x = {n: _randn(rng, shape) for n in qkv + ("grad_output",)}
        x["output"], x["lse"] = fastnn.scaled_dot_product_attention(
            x["query"], x["key"], x["value"], is_causal=causal, return_lse=True)
        return x

    def args(x):
        return (x["grad_output"], x["query"], x["key"], x["value"], x["output"], x["lse"])

    def torch_impl(x, torch):
        import torch.nn.functional as F
        q, k, v = (_tensor(torch, x[n]).requires_grad_() for n in qkv)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        grad_out = _tensor(torch, x["grad_output"])
        return lambda: torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)

    def expected(x):
        g, q, k, v = (x[n].astype(np.float64) for n in ("grad_output",) + qkv)
        # The reference recomputes the probabilities from q and k (out and lse are not used).
        fn = lambda g, q, k, v: reference.scaled_dot_product_attention_backward(
            g, q, k, v, None, None, is_causal=causal)
        return _by_heads(fn, (g, q, k, v), length)

    return Case(
        "sdpa_backward", f"({batch},{heads},{length},{dim})" + (" causal" if causal else ""),
        inputs=inputs,
        impls={"fastnn": lambda x, torch: lambda: fastnn.scaled_dot_product_attention_backward(
                   *args(x), is_causal=causal),
               "numpy": lambda x, torch: lambda: reference.scaled_dot_product_attention_backward(
                   *args(x), is_causal=causal),
               "torch": torch_impl},
        expected=expected, error=lambda r, w, x: _max_error(zip(r, w)) if len(r) == 3 else math.inf,
        work=10.0 * batch * heads * pairs * dim, unit="flop", limit="peak_gflops_f32",
        formula="10*B*H*E*L*S (5 products: q@k^T again, dV, dP, dQ, dK)"
                + (" with L*S -> L*(L+1)/2" if causal else ""),
        notes="allocating; torch: autograd.grad with retain_graph", only=only, blas=True,
        traffic=4.0 * (8 * batch * heads * length * dim + batch * heads * length))


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


ADAM = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)


def adam_case(n, only="") -> Case:
    """One Adam step on n float32 parameters, in place; every implementation updates its own copies
    of param and state. Timing repeats step 1, which costs the same as any later step."""
    def inputs(rng):
        return {"param": _randn(rng, (n,)), "grad": _randn(rng, (n,)),
                "exp_avg": np.zeros(n, F32), "exp_avg_sq": np.zeros(n, F32)}

    def copies(x):
        return [x[k].copy() for k in ("param", "grad", "exp_avg", "exp_avg_sq")]

    def fastnn_impl(x, torch):
        p, g, m, v = copies(x)

        def call():
            fastnn.adam_update(p, g, m, v, step=1, **ADAM)
            return p, m, v
        return call

    def numpy_impl(x, torch):
        p, g, m, v = copies(x)

        def call():
            reference.adam_update(p, g, m, v, step=1, **ADAM)
            return p, m, v
        return call

    def torch_impl(x, torch):
        p = torch.nn.Parameter(_tensor(torch, x["param"]))
        p.grad = _tensor(torch, x["grad"])
        hyper = dict(lr=ADAM["lr"], betas=(ADAM["beta1"], ADAM["beta2"]), eps=ADAM["eps"])
        try:
            opt = torch.optim.Adam([p], fused=True, **hyper)
            opt.step()
        except Exception:  # fused Adam on CPU needs torch >= 2.4
            p = torch.nn.Parameter(_tensor(torch, x["param"]))
            p.grad = _tensor(torch, x["grad"])
            opt = torch.optim.Adam([p], foreach=True, **hyper)
        else:  # start again from the initial values, so the first call is a first step
            p.data.copy_(_tensor(torch, x["param"]))
            opt.state.clear()

        def call():
            opt.step()
            state = opt.state[p]
            return p.detach(), state["exp_avg"], state["exp_avg_sq"]
        return call

    def expected(x):
        p, g, m, v = (np.asarray(a, np.float64) for a in copies(x))
        reference.adam_update(p, g, m, v, step=1, **ADAM)
        return p, m, v

    def error(result, want, inputs):
        # Compare the update param - param0 rather than param: the step is ~lr, far below |param|.
        p0 = inputs["param"].astype(np.float64)
        got = [r.detach().numpy() if hasattr(r, "detach") else r for r in result]
        return max(rel_error(np.asarray(got[0], np.float64) - p0, want[0] - p0),
                   rel_error(got[1], want[1]), rel_error(got[2], want[2]))

    return Case(
        "adam", f"{n // 10**6}M params" if n % 10**6 == 0 else f"{n} params", inputs=inputs,
        impls={"fastnn": fastnn_impl, "numpy": numpy_impl, "torch": torch_impl},
        expected=expected, error=error, tol=1e-3,
        work=7.0 * 4 * n, unit="byte", limit="mem_adam_gbs",
        formula="4 arrays read + 3 written, 4 bytes each", notes="in place", only=only,
        est_flops=EST_FLOPS["adam"] * n)


# ---- one training step of the MLP 784 -> 128 relu -> 10, cross-entropy, Adam -------------------------

MLP_PARAMS = ("w1", "b1", "w2", "b2")


def _mlp_params(rng, sizes):
    """torch.nn.Linear's default initialisation, weights stored (in, out) as fastnn.linear takes them."""
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:]), 1):
        bound = 1.0 / math.sqrt(n_in)
        params[f"w{i}"] = rng.uniform(-bound, bound, (n_in, n_out)).astype(F32)
        params[f"b{i}"] = rng.uniform(-bound, bound, (n_out,)).astype(F32)
    return params


def numpy_mlp_step(params, state, x, labels, step):
    """One training step in plain NumPy, in the dtype of its arrays: forward, mean cross-entropy,
    backward, then reference.adam_update on each of params [w1, b1, w2, b2] (updated in place, with
    state [(exp_avg, exp_avg_sq), ...]). Returns the loss."""
    w1, b1, w2, b2 = params
    n = x.shape[0]
    h = x @ w1
    h += b1
    np.maximum(h, 0, out=h)
    logits = h @ w2
    logits += b2
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    rows = np.arange(n)
    loss = -float(np.mean(np.log(p[rows, labels])))
    p[rows, labels] -= 1                                 # p becomes dL/dlogits * n
    p /= n
    dw2, db2 = h.T @ p, p.sum(axis=0)
    dh = p @ w2.T
    np.multiply(dh, h > 0, out=dh)
    dw1, db1 = x.T @ dh, dh.sum(axis=0)
    for param, grad, (m, v) in zip(params, (dw1, db1, dw2, db2), state):
        reference.adam_update(param, grad, m, v, step=step, **ADAM)
    return loss


def _fastnn_linear_backward(g, x, w, x_grad=True):
    if hasattr(fastnn, "linear_backward"):
        return fastnn.linear_backward(g, x, w, x_grad=x_grad)
    return fastnn.matmul(g, w.T) if x_grad else None, fastnn.matmul(x.T, g), g.sum(axis=0)


def mlp_step_case(batch, sizes=(784, 128, 10)) -> Case:
    """One full training step (forward, cross-entropy, backward, Adam) of Dense(128) relu -> Dense(10)
    from the same initial parameters and batch; each implementation owns its model and optimizer and
    every call is one more step on the same batch. The first step of each is checked against the
    NumPy step run in float64: the update (param - param0) of every parameter."""
    n_in, hidden, n_out = sizes
    p1, p2 = n_in * hidden, hidden * n_out

    def inputs(rng):
        x = {"x": rng.random((batch, n_in), dtype=F32), "labels": rng.integers(0, n_out, batch)}
        x.update(_mlp_params(rng, sizes))
        return x

    def fastnn_impl(x, torch):
        params = [x[k].copy() for k in MLP_PARAMS]
        data, labels = x["x"], x["labels"]
        if hasattr(fastnn, "Adam"):
            opt = fastnn.Adam(params, lr=ADAM["lr"], betas=(ADAM["beta1"], ADAM["beta2"]), eps=ADAM["eps"])
            update = opt.step
        else:
            state = [(np.zeros_like(p), np.zeros_like(p)) for p in params]
            steps = [0]

            def update(grads):
                steps[0] += 1
                for p, g, (m, v) in zip(params, grads, state):
                    fastnn.adam_update(p, g, m, v, step=steps[0], **ADAM)

        def call():
            w1, b1, w2, b2 = params
            h = fastnn.linear(data, w1, b1, activation="relu")
            logits = fastnn.linear(h, w2, b2)
            loss, g = fastnn.cross_entropy(logits, labels)
            dh, dw2, db2 = _fastnn_linear_backward(g, h, w2)
            fastnn.relu_backward(dh, h, out=dh)            # h > 0 exactly where the pre-activation is
            _, dw1, db1 = _fastnn_linear_backward(dh, data, w1, x_grad=False)  # the input needs none
            update([dw1, db1, dw2, db2])
            return params
        return call

    def numpy_impl(x, torch):
        params = [x[k].copy() for k in MLP_PARAMS]
        state = [(np.zeros_like(p), np.zeros_like(p)) for p in params]
        steps = [0]

        def call():
            steps[0] += 1
            numpy_mlp_step(params, state, x["x"], x["labels"], steps[0])
            return params
        return call

    def torch_impl(x, torch):
        import torch.nn.functional as F
        nn = torch.nn
        model = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))
        with torch.no_grad():
            for layer, i in ((model[0], 1), (model[2], 2)):
                layer.weight.copy_(torch.from_numpy(x[f"w{i}"].T.copy()))   # torch stores (out, in)
                layer.bias.copy_(torch.from_numpy(x[f"b{i}"]))
        opt = torch.optim.Adam(model.parameters(), lr=ADAM["lr"], betas=(ADAM["beta1"], ADAM["beta2"]),
                               eps=ADAM["eps"])
        data, labels = _tensor(torch, x["x"]), torch.from_numpy(x["labels"].astype(np.int64))

        def call():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(data), labels).backward()
            opt.step()
            return [model[0].weight.T, model[0].bias, model[2].weight.T, model[2].bias]
        return call

    def expected(x):
        params = [x[k].astype(np.float64) for k in MLP_PARAMS]
        state = [(np.zeros_like(p), np.zeros_like(p)) for p in params]
        numpy_mlp_step(params, state, x["x"].astype(np.float64), x["labels"], 1)
        return params

    def error(result, want, inputs):
        # The first Adam step moves every weight by about lr: compare the updates, not the weights.
        p0 = [inputs[k].astype(np.float64) for k in MLP_PARAMS]
        if len(result) != len(p0):
            return math.inf
        return _max_error((np.asarray(_np(r), np.float64) - a, w - a) for r, w, a in zip(result, want, p0))

    n_params = p1 + hidden + p2 + n_out
    return Case(
        "mlp_step", f"batch {batch}, {n_in}-{hidden} relu-{n_out}, CE, Adam", inputs=inputs,
        impls={"fastnn": fastnn_impl, "numpy": numpy_impl, "torch": torch_impl},
        expected=expected, error=error, tol=1e-3,
        work=2.0 * batch * (2 * p1 + 3 * p2), unit="flop", limit="peak_gflops_f32",
        formula="matmul flops: forward 2*B*(784*128 + 128*10), weight grads the same, hidden grad "
                "2*B*128*10",
        notes="fastnn.Adam / NumPy adam / torch.optim.Adam defaults; torch: nn.Sequential + autograd",
        blas=True, traffic=4.0 * (batch * n_in + 7 * n_params))


CASES: List[Case] = [
    # matmul (M x K @ K x N); the "64x784x128" is M x K x N, so is its "4096x4096x64"
    # (4096x4096 @ 4096x64); the attention-like K = 64 reading (4096x64 @ 64x4096) is timed too.
    matmul_case(1024, 1024, 1024),
    matmul_case(2048, 2048, 2048, only="full"),
    matmul_case(4096, 4096, 4096, only="full"),
    matmul_case(256, 1024, 1024),
    matmul_case(4096, 4096, 64),
    matmul_case(4096, 64, 4096),
    matmul_case(64, 784, 128),
    matmul_case(64, 128, 10),
    matmul_case(128, 64, 128, batch=32),
    matmul_case(1024, 1024, 1024, dtype=np.float64),
    matmul_case(8, 8, 8, alloc=True),
    linear_case(64, 784, 128),
    tiny_relu_case(16),
    relu_case(2**20, inplace=False),
    relu_case(2**20, inplace=True),
    relu_case(16 * 2**20, inplace=False),
    relu_case(16 * 2**20, inplace=True),
    relu_case(64 * 2**20, inplace=False, only="full"),
    relu_case(64 * 2**20, inplace=True, only="full"),
    relu_backward_case(16 * 2**20),
    softmax_case(4096, 1024, log=False),
    softmax_case(65536, 128, log=False),
    softmax_case(256, 32768, log=False),
    softmax_case(4096, 1024, log=True),
    softmax_case(256, 32768, log=True),
    softmax_backward_case(4096, 1024),
    softmax_backward_case(4096, 1024, log=True),
    cross_entropy_case(4096, 1000),
    cross_entropy_case(256, 32768),
    # --quick times attention on a quarter of the batch: the float64 oracle and NumPy's dense version
    # of the (4, 8, 1024, 64) rows alone take ~30 s on 2 cores.
    sdpa_case(1, 8, 1024, 64, causal=False, only="quick"),
    sdpa_case(1, 8, 1024, 64, causal=True, only="quick"),
    sdpa_case(4, 8, 1024, 64, causal=False, only="full"),
    sdpa_case(4, 8, 1024, 64, causal=True, only="full"),
    sdpa_case(1, 16, 2048, 64, causal=False, only="full"),
    sdpa_case(1, 16, 2048, 64, causal=True, only="full"),
    sdpa_case(1, 8, 4096, 128, causal=False, only="full"),
    sdpa_case(1, 8, 4096, 128, causal=True, only="full"),
    sdpa_backward_case(1, 8, 1024, 64, causal=False, only="quick"),
    sdpa_backward_case(1, 8, 1024, 64, causal=True, only="quick"),
    sdpa_backward_case(4, 8, 1024, 64, causal=False, only="full"),
    sdpa_backward_case(4, 8, 1024, 64, causal=True, only="full"),
    adam_case(10**6),
    adam_case(10 * 10**6),
    adam_case(50 * 10**6, only="full"),
    linear_backward_case(64, 784, 128),
    mlp_step_case(64),
    mlp_step_case(512),
]

OPS = tuple(dict.fromkeys(c.op for c in CASES))


def select(ops=None, quick=False, available=True) -> List[Case]:
    """The cases of the named ops (all when `ops` is empty) for a full or a --quick run; with
    `available`, only those whose fastnn functions exist. An unknown op name is a ValueError."""
    unknown = sorted(set(ops or ()) - set(OPS))
    if unknown:
        raise ValueError(f"unknown op {', '.join(unknown)}; expected one of: {', '.join(OPS)}")
    skip = "full" if quick else "quick"
    return [c for c in CASES if (not ops or c.op in ops) and c.only != skip
            and (c.available() or not available)]


# --------------------------------------------------------------------------------------------------
# Other libraries: PyTorch and NumPy's BLAS

def import_torch():
    """torch, or None when it does not import (any error: a broken install must not stop the bench)."""
    try:
        import torch
        return torch
    except Exception:
        return None


def _openblas_functions():
    """ctypes functions of the OpenBLAS that NumPy loaded, those found of "set_num_threads",
    "get_num_threads" and "get_corename". Some builds decorate the names: NumPy's wheels ship
    scipy-openblas, whose symbols are scipy_openblas_*64_."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return {}
    found = {}
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("set_num_threads", "get_num_threads", "get_corename"):
            for symbol in (f"openblas_{name}", f"scipy_openblas_{name}64_", f"openblas_{name}64_",
                           f"scipy_openblas_{name}"):
                fn = getattr(lib, symbol, None)
                if fn is not None:
                    found[name] = fn
                    break
        if found:
            break
    if "get_corename" in found:
        found["get_corename"].restype = ctypes.c_char_p
    return found


def blas_info(threads=None) -> dict:
    """NumPy's BLAS: library, kernel (core) name and thread count, after setting the thread count when
    `threads` is given (through threadpoolctl when installed, else OpenBLAS's own functions)."""
    info = None
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
        if threads:
            threadpool_limits(threads, user_api="blas")   # stays in force: not used as a context
        pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        if pools:
            info = {"library": pools[0].get("internal_api"), "core": pools[0].get("architecture"),
                    "threads": pools[0].get("num_threads")}
    except Exception:
        pass
    if info is None:
        fns = _openblas_functions()
        if threads and "set_num_threads" in fns:
            fns["set_num_threads"](ctypes.c_int(threads))
        info = {"library": "openblas" if fns else "unknown", "core": None, "threads": None}
        if "get_corename" in fns:
            info["core"] = fns["get_corename"]().decode(errors="replace").strip()
        if "get_num_threads" in fns:
            info["threads"] = int(fns["get_num_threads"]())
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ}
    if env:
        info["env"] = env
    return info


# --------------------------------------------------------------------------------------------------
# Timing

# Idle worker threads spin before they sleep: OpenBLAS's for 2^28 cycles (~0.1 s), libgomp's (fastnn's
# and PyTorch's OpenMP) for a few ms. On a 2-core machine the spinning threads of the library timed
# last steal the cores from the next one (a 2-thread fastnn matmul ran 2-20x slower right after a NumPy
# matmul), so every timing starts after the workers of the multi-threaded work before it fell asleep.
SETTLE_SECONDS = 0.2          # after BLAS on several threads
SETTLE_OPENMP_SECONDS = 0.03  # after OpenMP on several threads
_quiet_at = 0.0               # perf_counter() time by which every worker thread is asleep


def note_threads(threads, blas=False):
    """Record that work on `threads` threads (BLAS when `blas`) has just finished."""
    global _quiet_at
    if threads and threads > 1:
        pause = SETTLE_SECONDS if blas else SETTLE_OPENMP_SECONDS
        _quiet_at = max(_quiet_at, time.perf_counter() + pause)


def settle(seconds=None):
    """Wait until the worker threads of the previous implementation (and of the check) are asleep:
    `seconds`, or until the time that note_threads() recorded."""
    wait = seconds if seconds is not None else _quiet_at - time.perf_counter()
    if wait > 0:
        time.sleep(wait)


@dataclass
class Timing:
    median: float                                     # seconds per call
    best: float
    calls: int


def time_call(fn, budget=0.5, min_samples=5, max_samples=1000, first=None, warmup=0.0) -> Timing:
    """Median seconds per call of fn(), already warmed up by the caller.

    Samples are taken until `budget` seconds have passed and at least `min_samples` were taken. Calls
    shorter than ~100 us are grouped so one sample spans about 100 us, well above timer overhead.
    `first`: the seconds the caller's warm-up call took; above 1 ms it spares a call to size the groups.
    `warmup`: seconds of untimed calls first (when a call is shorter). On virtual machines the first
    touches of memory the host has reclaimed cost up to ten times more for a while (a 32 MiB fresh output
    took 31 ms instead of 3 for about a second); every implementation gets the same warm-up, so each is
    timed in its steady state.
    """
    if first is not None and first < warmup:
        end = time.perf_counter() + warmup
        while time.perf_counter() < end:
            fn()
    start = time.perf_counter()
    if first is None or first < 1e-3:
        fn()
        first = time.perf_counter() - start
    group = max(1, int(1e-4 / max(first, 1e-9)))
    samples = []
    while len(samples) < max_samples:
        t0 = time.perf_counter()
        for _ in range(group):
            fn()
        samples.append((time.perf_counter() - t0) / group)
        if len(samples) >= min_samples and time.perf_counter() - start >= budget:
            break
    return Timing(statistics.median(samples), min(samples), len(samples) * group)


# --------------------------------------------------------------------------------------------------
# Machine limits

def machine_limits(threads=None, quick=False) -> dict:
    """What this machine can do, measured by the compiled probes on the ISA path in use: peak_gflops_f32
    and peak_gflops_f64 (independent register FMA chains on every thread), mem_copy_gbs, mem_rw_gbs
    (in place) and mem_adam_gbs (4 reads / 3 writes), on arrays far beyond the last-level cache;
    plus threads and source (how each figure was obtained)."""
    threads = threads or fastnn.get_num_threads()
    return dict(fastnn._C.machine_limits(threads, quick))


LIMIT_NAMES = {"peak_gflops_f32": "peak", "peak_gflops_f64": "peak64", "mem_copy_gbs": "copy",
               "mem_rw_gbs": "rw", "mem_adam_gbs": "adam"}


# --------------------------------------------------------------------------------------------------
# Running

@dataclass
class Row:
    case: Case
    threads: int = 1
    times: Dict[str, Optional[Timing]] = field(default_factory=dict)
    errors: Dict[str, float] = field(default_factory=dict)   # relative error of each result checked
    failures: Dict[str, str] = field(default_factory=dict)   # implementation -> what went wrong
    ok: bool = False                                         # fastnn ran and matched the oracle
    rate: Optional[float] = None                             # GFLOP/s or GB/s of fastnn
    percent_limit: Optional[float] = None

    def speedup(self, other) -> Optional[float]:
        mine, theirs = self.times.get("fastnn"), self.times.get(other)
        return theirs.median / mine.median if mine and theirs else None

    def intensity(self) -> Tuple[Optional[float], Optional[float]]:
        """(flops, bytes) of one call for the roofline: counted, or estimated (est_flops, traffic)."""
        c = self.case
        if c.unit == "flop":
            return c.work, c.traffic
        if c.unit == "byte":
            return c.est_flops, c.work
        return None, None

    def to_dict(self) -> dict:
        c = self.case
        flops, nbytes = self.intensity()
        t = self.times.get("fastnn")
        return {
            "op": c.op, "case": c.label, "threads": self.threads, "work": c.work, "unit": c.unit,
            "formula": c.formula, "limit": c.limit, "notes": c.notes, "ok": self.ok, "tol": c.tol,
            "rel_error": self.errors, "failures": self.failures,
            "seconds": {k: t.median for k, t in self.times.items() if t},
            "best_seconds": {k: t.best for k, t in self.times.items() if t},
            "calls": {k: t.calls for k, t in self.times.items() if t},
            "rate": self.rate, "rate_unit": {"flop": "GFLOP/s", "byte": "GB/s"}.get(c.unit),
            "percent_limit": self.percent_limit,
            "speedup_vs_numpy": self.speedup("numpy"), "speedup_vs_torch": self.speedup("torch"),
            # roofline: flop / byte, and fastnn's GFLOP/s (estimated flops for the byte rows)
            "flops_estimated": c.unit == "byte",
            "intensity": flops / nbytes if flops and nbytes else None,
            "gflops": flops / t.median / 1e9 if flops and t else None,
        }


def use_threads(threads, torch=None) -> dict:
    """Run fastnn, NumPy's BLAS and PyTorch on `threads` threads; returns blas_info()."""
    fastnn.set_num_threads(threads)
    if torch is not None:
        torch.set_num_threads(threads)
    return blas_info(threads)


def run_case(case: Case, torch=None, quick=False, limits=None, seed=0, inputs=None, want=None,
             threads=None) -> Row:
    """Check fastnn (and the others) against the oracle, then time each implementation side by side,
    on the thread count already set (`threads` records it). `inputs` and `want` (the oracle's result)
    may be given, to share them between thread counts."""
    threads = threads or fastnn.get_num_threads()
    row = Row(case, threads)
    if inputs is None:
        inputs = case.inputs(np.random.default_rng(seed))
    if want is None:
        want = case.expected(inputs)
    budget, min_samples = (0.05, 2) if quick else (0.4, 5)
    for name in IMPLS:
        if name == "torch" and torch is None:
            continue
        settle()
        try:
            fn = case.impls[name](inputs, torch)
            start = time.perf_counter()
            result = fn()                                 # first call: checked, and it warms up
            first = time.perf_counter() - start
        except Exception as exc:
            row.failures[name] = f"{type(exc).__name__}: {exc}"
            note_threads(threads, blas=case.blas)
            continue
        err = case.error(result, want, inputs)
        row.errors[name] = err
        if name == "fastnn":
            row.ok = err <= case.tol
            if not row.ok:
                row.failures[name] = f"relative error {err:.3g} > {case.tol:g}"
        elif not err <= max(case.tol, 1e-4) * 10:
            # The baseline does not compute the same thing: report it, still time it.
            row.failures[name] = f"relative error {err:.3g} against the oracle"
        del result
        note_threads(threads, blas=case.blas and name == "numpy")
        settle()
        row.times[name] = time_call(fn, budget=budget, first=first, warmup=0.0 if quick else 0.3,
                                    min_samples=_samples_for(first, quick, min_samples))
        note_threads(threads, blas=case.blas and name == "numpy")
        del fn
    mine = row.times.get("fastnn")
    if mine and case.unit in ("flop", "byte"):
        row.rate = case.work / mine.median / 1e9
        limit = (limits or {}).get(case.limit)
        if limit:
            row.percent_limit = 100.0 * row.rate / limit
    return row


def _samples_for(first, quick, min_samples) -> int:
    """Fewer samples for slow calls (the first call's seconds), so that a full run fits in minutes: 3
    above 0.25 s, 1 above 1 s (NumPy's dense attention, 4096^3 products on one thread); --quick: 1
    above 0.1 s."""
    if quick:
        return 1 if first > 0.1 else min_samples
    return 1 if first > 1.0 else 3 if first > 0.25 else min_samples


def default_threads() -> List[int]:
    """1 and fastnn's thread count (just 1 when that is 1)."""
    n = fastnn.get_num_threads()
    return [1, n] if n > 1 else [1]


def parse_threads(text) -> List[int]:
    """"1,2" -> [1, 2] (duplicates dropped, order kept); ValueError unless every entry is an int >= 1."""
    counts = []
    for part in str(text).split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise ValueError(f"--threads: expected thread counts >= 1 separated by commas, got {text!r}")
        if int(part) not in counts:
            counts.append(int(part))
    return counts


def run(ops=None, quick=False, threads=None, json_path=None, torch="auto", out=sys.stdout,
        progress=sys.stderr, plot_path=None) -> dict:
    """Run the bench on each thread count of `threads` (an int or a list; default_threads() when None):
    measure each count's limits, then for every selected case make the inputs and the oracle once and
    check + time every implementation on each count. Prints the tables to `out` and the progress to
    `progress`, writes `json_path` and the roofline `plot_path` when given. Returns everything as a dict."""
    cases = select(ops, quick)
    skipped = [c for c in select(ops, quick, available=False) if not c.available()]
    if torch == "auto":
        torch = import_torch()
    if threads is None:
        counts = default_threads()
    elif isinstance(threads, int):
        counts = [threads]
    else:
        counts = list(dict.fromkeys(threads))
    for c in skipped:
        print(f"skipping {c.op} {c.label}: fastnn.{c.requires} does not exist", file=progress)
    previous_threads = fastnn.get_num_threads()
    runs = {n: {"threads": n, "rows": []} for n in counts}
    try:
        for n in counts:
            runs[n]["blas"] = use_threads(n, torch)
            print(f"measuring machine limits ({_plural(n, 'thread')}) ...", file=progress, flush=True)
            runs[n]["limits"] = machine_limits(n, quick)
            note_threads(n)
        for i, case in enumerate(cases, 1):
            print(f"[{i}/{len(cases)}] {case.op} {case.label} ...", end="", file=progress, flush=True)
            start = time.perf_counter()
            inputs = case.inputs(np.random.default_rng(0))
            want = case.expected(inputs)
            print(f" (inputs + oracle {time.perf_counter() - start:.1f} s)", end="", file=progress)
            note_threads(fastnn.get_num_threads(), blas=case.blas)   # the oracle ran BLAS
            for n in counts:
                use_threads(n, torch)
                row = run_case(case, torch, quick, runs[n]["limits"], inputs=inputs, want=want, threads=n)
                runs[n]["rows"].append(row)
                prefix = f" {n}t: " if len(counts) > 1 else " "
                print(prefix + _progress_summary(row), end=";", file=progress, flush=True)
            print(f" {time.perf_counter() - start:.1f} s", file=progress, flush=True)
            del inputs, want
    finally:
        use_threads(previous_threads, torch)
    blas = runs[counts[0]]["blas"]
    results = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": quick,
        "threads": counts,
        "machine": {"platform": platform.platform(), "processor": _cpu_name(),
                    "cpus": os.cpu_count()},
        "fastnn": _jsonable(fastnn.info()),
        "numpy": np.__version__,
        "blas": blas,
        "torch": getattr(torch, "__version__", None),
        "skipped": [f"{c.op} {c.label}: fastnn.{c.requires} does not exist" for c in skipped],
        "runs": [{"threads": n, "blas": runs[n]["blas"], "limits": runs[n]["limits"],
                  "rows": [r.to_dict() for r in runs[n]["rows"]]} for n in counts],
    }
    results["scaling"] = scaling(results)
    print(format_report(results), file=out, flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"wrote {json_path}", file=progress)
    if plot_path:
        plot_roofline(results, plot_path)
        print(f"wrote {plot_path}", file=progress)
    return results


def scaling(results: dict) -> List[dict]:
    """Per row: time on the fewest threads / time on each other count, for every implementation
    (empty when one count ran)."""
    runs = results["runs"]
    if len(runs) < 2:
        return []
    base = min(runs, key=lambda r: r["threads"])
    others = [r for r in runs if r is not base]
    rows = []
    for i, b in enumerate(base["rows"]):
        entry = {"op": b["op"], "case": b["case"], "base_threads": base["threads"], "speedup": {}}
        for r in others:
            o = r["rows"][i]
            entry["speedup"][r["threads"]] = {
                name: b["seconds"][name] / o["seconds"][name]
                for name in IMPLS if name in b["seconds"] and name in o["seconds"]}
        rows.append(entry)
    return rows


def _progress_summary(row: Row) -> str:
    parts = []
    for name in IMPLS:
        t = row.times.get(name)
        if t:
            parts.append(f"{name} {format_seconds(t.median)}")
        elif name in row.failures:
            parts.append(f"{name} FAILED")
    if row.failures:
        parts.append("; ".join(f"{k}: {v}" for k, v in row.failures.items()))
    return ", ".join(parts)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


# --------------------------------------------------------------------------------------------------
# Report

def format_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _ratio(x: Optional[float]) -> str:
    return f"{x:.2f}x" if x is not None else "—"


def _markdown(lines: List[list]) -> str:
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(lines[0]))]
    fmt = lambda row: "| " + " | ".join(str(v).ljust(w) for v, w in zip(row, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(lines[0]), rule] + [fmt(row) for row in lines[1:]])


def format_table(rows: List[dict], with_torch: bool) -> str:
    """The rows of one thread count (as dicts) as a Markdown table."""
    head = ["op", "case", "fastnn", "rate", "% limit", "numpy", "vs numpy"]
    if with_torch:
        head += ["torch", "vs torch"]
    head.append("check")
    lines = [head]
    for r in rows:
        sec = r["seconds"]
        limit = (f"{r['percent_limit']:.0f}% {LIMIT_NAMES.get(r['limit'], r['limit'])}"
                 if r["percent_limit"] is not None else "—")
        line = [r["op"], r["case"],
                format_seconds(sec["fastnn"]) if "fastnn" in sec else "—",
                f"{r['rate']:.1f} {r['rate_unit']}" if r["rate"] is not None else "—",
                limit,
                format_seconds(sec["numpy"]) if "numpy" in sec else "—",
                _ratio(r["speedup_vs_numpy"])]
        if with_torch:
            line += [format_seconds(sec["torch"]) if "torch" in sec else "n/a",
                     _ratio(r["speedup_vs_torch"])]
        err = r["rel_error"].get("fastnn")
        line.append(("ok" if r["ok"] else "FAIL") + (f" ({err:.0e})" if err else ""))
        lines.append(line)
    return _markdown(lines)


def format_scaling(results: dict) -> str:
    """The scaling table: time on the fewest threads / time on each other count."""
    entries = results["scaling"]
    counts = [r["threads"] for r in results["runs"] if r["threads"] != entries[0]["base_threads"]]
    names = [n for n in IMPLS if n != "torch" or results["torch"]]
    base = entries[0]["base_threads"]
    head = ["op", "case"] + [f"{name} {base}->{n}t" for n in counts for name in names]
    lines = [head]
    for e in entries:
        line = [e["op"], e["case"]]
        for n in counts:
            line += [_ratio(e["speedup"][n].get(name)) for name in names]
        lines.append(line)
    return _markdown(lines)


def _plural(n, word) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _limits_line(lim: dict) -> str:
    return (f"limits ({_plural(lim['threads'], 'thread')}): FMA peak {lim['peak_gflops_f32']:.0f} GFLOP/s "
            f"float32, {lim['peak_gflops_f64']:.0f} float64; memory: copy {lim['mem_copy_gbs']:.1f} GB/s, "
            f"in place {lim['mem_rw_gbs']:.1f} GB/s, Adam 4r/3w {lim['mem_adam_gbs']:.1f} GB/s")


def format_report(results: dict) -> str:
    """Header (versions), per thread count its limits and table, the scaling table, and how the
    figures are counted."""
    info, blas = results["fastnn"], results["blas"]
    isa = info.get("cpu_isa", "?")
    supported = info.get("cpu_isa_supported")
    if isinstance(supported, (list, tuple)):
        supported = ", ".join(map(str, supported))
    torch = results["torch"]
    counts = ", ".join(map(str, results["threads"]))
    lines = [
        f"fastnn {info.get('version', '?')}: ISA {isa} (supported: {supported}), "
        f"OpenMP {info.get('openmp', '?')}; threads: {counts}" + (" (quick run)" if results["quick"] else ""),
        f"NumPy {results['numpy']} ({blas.get('library')} {blas.get('core') or ''}); "
        f"PyTorch {torch if torch else 'not importable'}; CPU: {results['machine']['processor']}",
    ]
    env = blas.get("env")
    if env:
        lines.append(f"note: {', '.join(f'{k}={v}' for k, v in env.items())} is set: NumPy's OpenBLAS "
                     "may not run its best kernel; unset both for this command to compare against it")
    for note in results.get("skipped", []):
        lines.append(f"skipped: {note}")
    for run in results["runs"]:
        n = run["threads"]
        lines += ["", f"### {_plural(n, 'thread')} for fastnn, PyTorch and NumPy's BLAS (it reports "
                      f"{run['blas'].get('threads')})", _limits_line(run["limits"]), "",
                  format_table(run["rows"], with_torch=bool(torch))]
    if results.get("scaling"):
        lines += ["", "### Scaling: time on the fewest threads / time on more (> 1: faster with more)", "",
                  format_scaling(results)]
    lines.append("")
    lines.append("Times are medians per call. GFLOP/s: matmul and linear 2*B*M*N*K; sdpa 4*B*H*L*S*E, its "
                 "backward 10*B*H*L*S*E (causal: L*S -> L*(L+1)/2); linear_backward 4*M*N*K; mlp_step "
                 "its matmul flops. GB/s: bytes read + written once. \"tiny call\" rows: only the time per "
                 "call (call overhead) counts. % limit: of the FMA peak (float32, or float64 for "
                 "peak64), or of the copy / in-place / Adam-pattern bandwidth, all measured by the native "
                 "probes at start for each thread count (memory on 256 MiB; arrays of 64 MiB, twice a "
                 "32 MiB L3, partly stay in cache and can pass 100%). vs numpy / vs torch: their time / "
                 "fastnn's (> 1: fastnn faster). check: fastnn's relative error against the float64 oracle "
                 "(mlp_step: of each parameter's first Adam update).")
    for run in results["runs"]:
        for r in run["rows"]:
            for name, why in r["failures"].items():
                lines.append(f"{r['op']} {r['case']} ({_plural(run['threads'], 'thread')}): {name}: {why}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Roofline plot

def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except Exception:
        return False


PLOT_CAPTION = (
    "Filled markers: counted flops (matmul 2MNK, sdpa 4BHLSE, backward 10BHLSE, ...) over the bytes every "
    "input must be read and every output written once. Hollow markers: memory-bound rows, which have no "
    "flop count: placed at an ESTIMATED flop count (per element: relu 1, softmax/log_softmax 14 and "
    "cross_entropy 15 with an exp as 10, softmax_backward 4, log_softmax_backward 13; Adam 12 per parameter), "
    "so their height below the bandwidth roof is the fraction of bandwidth reached. Tiny-call rows are not "
    "drawn. Roofs: the native probes' FMA peak and copy / in-place bandwidth for that thread count.")


def plot_roofline(results: dict, path: str) -> None:
    """A log-log roofline chart (flop/byte vs GFLOP/s) of fastnn's rows, one panel per thread count."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(7 * len(runs) + 2.5, 7.5), squeeze=False, sharey=True)
    ops = list(dict.fromkeys(r["op"] for run in runs for r in run["rows"]))
    colors = {op: plt.get_cmap("tab20")(i % 20) for i, op in enumerate(ops)}
    markers = "osD^v<>pPXh*"
    drawn = [r for run in runs for r in run["rows"] if r["intensity"] and r["gflops"]]
    xmin = min([r["intensity"] for r in drawn] + [0.05]) / 2
    xmax = max([r["intensity"] for r in drawn] + [100]) * 2
    handles = {}
    for ax, run in zip(axes[0], runs):
        lim = run["limits"]
        x = np.logspace(math.log10(xmin), math.log10(xmax), 200)
        peak = lim["peak_gflops_f32"]
        for bw, style, name in ((lim["mem_copy_gbs"], "-", "copy"), (lim["mem_rw_gbs"], "--", "in place")):
            ax.plot(x, np.minimum(peak, bw * x), style, color="black", lw=1.2,
                    label=f"{peak:.0f} GFLOP/s f32 peak, {name} {bw:.0f} GB/s")
        if any(r["limit"] == "peak_gflops_f64" for r in run["rows"]):
            ax.axhline(lim["peak_gflops_f64"], ls=":", color="grey", lw=1,
                       label=f"{lim['peak_gflops_f64']:.0f} GFLOP/s f64 peak")
        for r in run["rows"]:
            if not (r["intensity"] and r["gflops"]):
                continue
            op = r["op"]
            h = ax.scatter(r["intensity"], r["gflops"], marker=markers[ops.index(op) % len(markers)], s=40,
                           zorder=3, facecolors="none" if r["flops_estimated"] else colors[op],
                           edgecolors=colors[op])
            handles.setdefault(op, h)
            ax.annotate(r["case"].replace(" @ ", "@"), (r["intensity"], r["gflops"]), fontsize=5.5,
                        xytext=(4, 2), textcoords="offset points", color="dimgray")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(xmin, xmax)
        ax.grid(True, which="both", lw=0.3, alpha=0.5)
        ax.set_xlabel("arithmetic intensity (flop / byte)")
        ax.set_title(f"{_plural(run['threads'], 'thread')}" + (" (quick run)" if results["quick"] else ""))
        ax.legend(fontsize=7, loc="upper left", title="roofs", title_fontsize=7)
    axes[0][0].set_ylabel("GFLOP/s (fastnn)")
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=8,
               title="op (hollow: estimated flops)", title_fontsize=8)
    width, height = fig.get_size_inches()
    caption = textwrap.wrap(PLOT_CAPTION, int(width * 15))        # ~15 characters an inch at 7 pt
    fig.text(0.01, 0.01, "\n".join(caption), fontsize=7, va="bottom")
    fig.suptitle(f"fastnn roofline: {results['machine']['processor']}, ISA {results['fastnn'].get('cpu_isa')}, "
                 f"{results['date'][:10]}")
    bottom = (len(caption) * 7 * 1.25 / 72 + 0.1) / height
    fig.tight_layout(rect=(0, bottom, 1 - 2.3 / width, 1))
    fig.savefig(path, dpi=150)
    plt.close(fig)
