"""Scaled dot-product attention, forward and backward."""
from __future__ import annotations

import math

import numpy as np

import fastnn
from fastnn import reference

from ..case import Case, _max_error, _np, _randn, _tensor


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


def sdpa_backward_case(batch, heads, length, dim, causal, only="", bf16_path=None) -> Case:
    """The backward alone: the forward's output and log-sum-exp (fastnn's, float32) are inputs made
    once. bf16_path: bfloat16 operands (ml_dtypes; PyTorch's bfloat16 kernels; NumPy on float32 copies),
    the label naming that path. PyTorch: autograd's backward of its scaled_dot_product_attention, the forward run once when
    the call is bound and every call `torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)`:
    what it times is the saved-tensor backward kernel (the same inputs fastnn's gets: q, k, v, out,
    lse, grad_out), nothing accumulated into .grad. NumPy: fastnn.reference's dense backward."""
    shape = (batch, heads, length, dim)
    pairs = _sdpa_pairs(length, causal)
    qkv = ("query", "key", "value")

    if bf16_path:
        import ml_dtypes
        bf16 = np.dtype(ml_dtypes.bfloat16)

    def inputs(rng):
        x = {n: _randn(rng, shape) for n in qkv + ("grad_output",)}
        if bf16_path:
            x = {n: a.astype(bf16) for n, a in x.items()}
        x["output"], x["lse"] = fastnn.scaled_dot_product_attention(
            x["query"], x["key"], x["value"], is_causal=causal, return_lse=True)
        return x

    def args(x):
        return (x["grad_output"], x["query"], x["key"], x["value"], x["output"], x["lse"])

    def numpy_args(x):  # NumPy has no bfloat16 arithmetic: float32 copies
        return tuple(a.astype(np.float32) for a in args(x)) if bf16_path else args(x)

    def tensor(torch, a):
        return _tensor(torch, a.astype(np.float32)).bfloat16() if bf16_path else _tensor(torch, a)

    def torch_impl(x, torch):
        import torch.nn.functional as F
        q, k, v = (tensor(torch, x[n]).requires_grad_() for n in qkv)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        grad_out = tensor(torch, x["grad_output"])
        return lambda: torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)

    def expected(x):
        g, q, k, v = (x[n].astype(np.float64) for n in ("grad_output",) + qkv)
        # The reference recomputes the probabilities from q and k (out and lse are not used).
        fn = lambda g, q, k, v: reference.scaled_dot_product_attention_backward(
            g, q, k, v, None, None, is_causal=causal)
        return _by_heads(fn, (g, q, k, v), length)

    return Case(
        "sdpa_backward", f"({batch},{heads},{length},{dim})" + (" causal" if causal else "")
        + (f" bfloat16 ({bf16_path})" if bf16_path else ""),
        inputs=inputs,
        impls={"fastnn": lambda x, torch: lambda: fastnn.scaled_dot_product_attention_backward(
                   *args(x), is_causal=causal),
               "numpy": lambda x, torch: lambda: reference.scaled_dot_product_attention_backward(
                   *numpy_args(x), is_causal=causal),
               "torch": torch_impl},
        expected=expected, **({"tol": 1e-2} if bf16_path else {}),
        error=lambda r, w, x: _max_error((np.asarray(_np(a), np.float64), b) for a, b in zip(r, w)) if len(r) == 3 else math.inf,
        work=10.0 * batch * heads * pairs * dim, unit="flop", limit="peak_gflops_bf16" if bf16_path else "peak_gflops_f32",
        formula="10*B*H*E*L*S (5 products: q@k^T again, dV, dP, dQ, dK)"
                + (" with L*S -> L*(L+1)/2" if causal else ""),
        notes="allocating; torch: autograd.grad with retain_graph", only=only, blas=True,
        traffic=(2.0 if bf16_path else 4.0) * 8 * batch * heads * length * dim + 4.0 * batch * heads * length)
