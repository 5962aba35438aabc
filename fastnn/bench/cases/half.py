"""bfloat16 rows (numpy arrays of ml_dtypes.bfloat16; PyTorch's bfloat16 CPU kernels beside them), next to the
float32 rows of the same ops and sizes: matmul, relu, softmax, attention and Adam (bfloat16 parameters and
gradients, float32 moments). The label names the path that ran: the matmul and the attention (forward and
backward) on the avx512bf16 path are the AVX512-BF16 dot product on bfloat16 panels (float32 sums), measured against that
instruction's peak; everything else, and those two on the other paths, widen bfloat16 to float32 (every sum
in float32). NumPy has no bfloat16
arithmetic of its own: its column is what a NumPy user writes, the float32 computation on widened copies,
rounded back. Skipped without ml_dtypes."""
from __future__ import annotations

import numpy as np

import fastnn
from fastnn import reference

from ..case import F32, Case, _max_error, _np
from .attention import _by_heads, _sdpa_pairs, sdpa_backward_case
from .train import ADAM, torch_adam_step

PATH = "bf16 widened to f32"


def _dot_path():
    """The path of the bf16 matmul and attention: the dot product on avx512bf16."""
    return "AVX512-BF16 dot product" if fastnn.cpu_isa() == "avx512bf16" else PATH


def _bf16():
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


def _randn_bf16(rng, shape):
    return rng.standard_normal(shape, dtype=F32).astype(_bf16())


def _torch_bf16(torch, a):
    """A torch bfloat16 tensor holding a's (bfloat16) values."""
    return torch.from_numpy(np.asarray(a, F32)).bfloat16()


def _f64(x):
    return {k: np.asarray(v, np.float64) for k, v in x.items()}


# Results rounded to bfloat16 (relative error up to 2^-8 each) after float32 sums: a check at 1e-2.
TOL = 1e-2


def matmul_bf16_case(m, k, n) -> Case:
    def fastnn_impl(x, torch):
        c = np.empty((m, n), _bf16())
        return lambda: fastnn.matmul(x["a"], x["b"], out=c)

    def torch_impl(x, torch):
        a, b = _torch_bf16(torch, x["a"]), _torch_bf16(torch, x["b"])
        c = torch.empty((m, n), dtype=torch.bfloat16)
        return lambda: torch.matmul(a, b, out=c)

    def numpy_impl(x, torch):
        return lambda: np.matmul(x["a"].astype(F32), x["b"].astype(F32)).astype(_bf16())

    return Case(
        "matmul", f"{m}x{k} @ {k}x{n} bfloat16 ({_dot_path()})",
        inputs=lambda rng: {"a": _randn_bf16(rng, (m, k)), "b": _randn_bf16(rng, (k, n))},
        impls={"fastnn": fastnn_impl, "numpy": numpy_impl, "torch": torch_impl},
        expected=lambda x: reference.matmul(**_f64(x)),
        work=2.0 * m * n * k, unit="flop", limit="peak_gflops_bf16", formula="2*M*N*K", tol=TOL,
        notes="out= preallocated", traffic=2.0 * (m * k + k * n + m * n), blas=True)


def relu_bf16_case(n) -> Case:
    def fastnn_impl(x, torch):
        dst = np.empty_like(x["x"])
        return lambda: fastnn.relu(x["x"], out=dst)

    def torch_impl(x, torch):
        src = _torch_bf16(torch, x["x"])
        dst = torch.empty_like(src)
        return lambda: torch.clamp_min(src, 0.0, out=dst)

    def numpy_impl(x, torch):
        dst = np.empty_like(x["x"])
        return lambda: np.maximum(x["x"], _bf16().type(0), out=dst)  # ml_dtypes' own bfloat16 loop

    return Case(
        "relu", f"{n // 2**20}M out=y bfloat16",
        inputs=lambda rng: {"x": _randn_bf16(rng, (n,))},
        impls={"fastnn": fastnn_impl, "numpy": numpy_impl, "torch": torch_impl},
        expected=lambda x: reference.relu(x["x"].astype(np.float64)),
        work=2.0 * 2 * n, unit="byte", limit="mem_copy_gbs", formula="2*n read + 2*n written", tol=0.0)


def softmax_bf16_case(rows, cols) -> Case:
    def fastnn_impl(x, torch):
        dst = np.empty_like(x["x"])
        return lambda: fastnn.softmax(x["x"], out=dst)

    def torch_impl(x, torch):
        t = _torch_bf16(torch, x["x"])
        dst = torch.empty_like(t)
        return lambda: torch.softmax(t, -1, out=dst)

    def numpy_impl(x, torch):
        def call():
            f = x["x"].astype(F32)
            e = np.exp(f - f.max(-1, keepdims=True))
            return (e / e.sum(-1, keepdims=True)).astype(_bf16())
        return call

    return Case(
        "softmax", f"{rows}x{cols} bfloat16",
        inputs=lambda rng: {"x": _randn_bf16(rng, (rows, cols))},
        impls={"fastnn": fastnn_impl, "numpy": numpy_impl, "torch": torch_impl},
        expected=lambda x: reference.softmax(x["x"].astype(np.float64)),
        work=2.0 * 2 * rows * cols, unit="byte", limit="mem_copy_gbs", formula="2*n read + 2*n written", tol=TOL)


def sdpa_bf16_case(batch, heads, length, dim, causal) -> Case:
    shape = (batch, heads, length, dim)

    def torch_impl(x, torch):
        import torch.nn.functional as F
        q, k, v = (_torch_bf16(torch, x[n]) for n in ("query", "key", "value"))
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def expected(x):
        q, k, v = (x[n].astype(np.float64) for n in ("query", "key", "value"))
        return _by_heads(reference.scaled_dot_product_attention, (q, k, v), length, is_causal=causal)

    return Case(
        "sdpa", f"({batch},{heads},{length},{dim})" + (" causal" if causal else "") + f" bfloat16 ({_dot_path()})",
        inputs=lambda rng: {n: _randn_bf16(rng, shape) for n in ("query", "key", "value")},
        impls={"fastnn": lambda x, torch: lambda: fastnn.scaled_dot_product_attention(
                   x["query"], x["key"], x["value"], is_causal=causal),
               "numpy": lambda x, torch: lambda: reference.scaled_dot_product_attention(
                   *(x[n].astype(F32) for n in ("query", "key", "value")), is_causal=causal).astype(_bf16()),
               "torch": torch_impl},
        expected=expected, tol=TOL,
        work=4.0 * batch * heads * _sdpa_pairs(length, causal) * dim, unit="flop", limit="peak_gflops_bf16",
        formula="4*B*H*E*L*S" + (" with L*S -> L*(L+1)/2" if causal else ""), notes="allocating",
        blas=True, traffic=4.0 * 2 * batch * heads * length * dim)


def adam_bf16_case(n) -> Case:
    """One Adam step on n bfloat16 parameters and gradients with float32 moments (mixed precision), in place.
    PyTorch: torch.optim.Adam's bfloat16 parameters keep bfloat16 moments (its own rule): it moves
    2 + 2 + 2 + 2 * (2 + 2) bytes per element against fastnn's 2 + 2 + 2 + 2 * (4 + 4)."""
    def inputs(rng):
        return {"param": _randn_bf16(rng, (n,)), "grad": _randn_bf16(rng, (n,)),
                "exp_avg": np.zeros(n, F32), "exp_avg_sq": np.zeros(n, F32)}

    def fastnn_impl(x, torch):
        p, g, m, v = (x[k].copy() for k in ("param", "grad", "exp_avg", "exp_avg_sq"))

        def call():
            fastnn.adam_update(p, g, m, v, step=1, **ADAM)
            return p, m, v
        return call

    def numpy_impl(x, torch):
        p, g, m, v = (x[k].copy() for k in ("param", "grad", "exp_avg", "exp_avg_sq"))

        def call():
            p32 = p.astype(F32)
            reference.adam_update(p32, g.astype(F32), m, v, step=1, **ADAM)
            p[...] = p32.astype(_bf16())
            return p, m, v
        return call

    def torch_impl(x, torch):
        return torch_adam_step(torch, lambda: _torch_bf16(torch, x["param"]), lambda: _torch_bf16(torch, x["grad"]))

    def expected(x):
        p, m, v = (np.asarray(x[k], np.float64) for k in ("param", "exp_avg", "exp_avg_sq"))
        reference.adam_update(p, np.asarray(x["grad"], np.float64), m, v, step=1, **ADAM)
        return p, m, v

    def error(result, want, inputs):
        return _max_error(zip((np.asarray(_np(r), np.float64) for r in result), want))

    return Case(
        "adam", f"{n / 1e6:g}M bfloat16 params, float32 moments",
        inputs=inputs, impls={"fastnn": fastnn_impl, "numpy": numpy_impl, "torch": torch_impl},
        expected=expected, error=error, tol=TOL,
        work=float(n) * (2 + 2 + 2 + 2 * (4 + 4)), unit="byte", limit="mem_rw_gbs",
        formula="param 2+2, grad 2, moments 2*(4+4) bytes per element")


CASES = [
    matmul_bf16_case(1024, 1024, 1024),
    relu_bf16_case(16 * 2**20),
    softmax_bf16_case(4096, 1024),
    sdpa_bf16_case(1, 8, 1024, 64, causal=False),
    sdpa_backward_case(1, 8, 1024, 64, causal=False, bf16_path=_dot_path()),
    adam_bf16_case(10 * 10**6),
]


def available() -> bool:
    import importlib.util
    return importlib.util.find_spec("ml_dtypes") is not None

