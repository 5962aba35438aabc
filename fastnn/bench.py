"""`python -m fastnn bench`: times every op against NumPy (and PyTorch when it imports), side by side in
one run, after checking each result against the float64 oracle in `fastnn.reference`.

The pieces are small so later work can extend them: a `Case` is one row (how to make its inputs, how to
call each implementation, the float64 oracle, the work one call does and which machine limit bounds
it); `CASES` lists the rows; `machine_limits()` measures what the machine can do; `time_call()` times
one call; `run()` ties them together and `format_table()` prints the result. The pytest-benchmark suite
in bench/ reuses `CASES`.
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
from typing import Any, Callable, Dict, List, Optional

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

    `inputs(rng)` makes the float32 inputs once; `impls[name](inputs, torch)` binds one implementation
    to its own copies and output buffers and returns a zero-argument call that returns the result (for
    in-place ops: the arrays it updated). `expected(inputs)` is the oracle, computed in float64, and
    `error(result, expected, inputs)` the relative error of a result, which must stay <= `tol`.
    `work` is the flops (unit "flop") or bytes read + written (unit "byte") of one call, counted by
    `formula`; `limit` names the `machine_limits()` entry that bounds it.
    """
    op: str
    label: str
    inputs: Callable[[np.random.Generator], Dict[str, np.ndarray]]
    impls: Dict[str, Callable[[Dict[str, np.ndarray], Any], Callable[[], Any]]]
    expected: Callable[[Dict[str, np.ndarray]], Any]
    work: float
    unit: str
    limit: str
    formula: str
    error: Callable[[Any, Any, Dict[str, np.ndarray]], float] = None
    tol: float = 1e-4
    notes: str = ""

    def __post_init__(self):
        if self.error is None:
            self.error = lambda result, want, inputs: rel_error(result, want)

    @property
    def id(self) -> str:
        return f"{self.op}[{self.label}]"


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


def _randn(rng, shape):
    return rng.standard_normal(shape, dtype=F32)


def _f64(x):
    return {k: np.asarray(v, np.float64) if v.dtype.kind == "f" else v for k, v in x.items()}


def _tensor(torch, a):
    """A torch tensor on a private copy of `a` (so no implementation sees another's writes)."""
    return torch.from_numpy(np.array(a, copy=True))


def _elements(n):
    return f"{n // 2**20}M" if n % 2**20 == 0 else str(n)


def matmul_case(m, k, n, batch=None) -> Case:
    """(B,) M x K @ K x N, all implementations writing into a preallocated out=."""
    lead = (batch,) if batch else ()
    out_shape = lead + (m, n)

    def numpy_impl(x, torch):
        c = np.empty(out_shape, F32)
        return lambda: np.matmul(x["a"], x["b"], out=c)

    def fastnn_impl(x, torch):
        c = np.empty(out_shape, F32)
        return lambda: fastnn.matmul(x["a"], x["b"], out=c)

    def torch_impl(x, torch):
        a, b, c = _tensor(torch, x["a"]), _tensor(torch, x["b"]), torch.empty(out_shape)
        return lambda: torch.matmul(a, b, out=c)

    label = f"({batch},{m},{k})@({batch},{k},{n})" if batch else f"{m}x{k} @ {k}x{n}"
    return Case(
        "matmul", label,
        inputs=lambda rng: {"a": _randn(rng, lead + (m, k)), "b": _randn(rng, lead + (k, n))},
        impls={"fastnn": fastnn_impl, "numpy": numpy_impl, "torch": torch_impl},
        expected=lambda x: reference.matmul(**_f64(x)),
        work=2.0 * (batch or 1) * m * n * k, unit="flop", limit="peak_gflops_f32",
        formula="2*B*M*N*K", notes="out= preallocated")


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
        formula="2*M*N*K", notes="allocating")


def relu_case(n, inplace) -> Case:
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
        formula="4*n read + 4*n written", tol=0.0)


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
        formula="8*n read + 4*n written", tol=0.0)


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
        formula="4*n read + 4*n written", notes="allocating")


def softmax_backward_case(rows, cols) -> Case:
    def inputs(rng):
        return {"grad": _randn(rng, (rows, cols)),
                "output": reference.softmax(_randn(rng, (rows, cols)) * F32(4), -1).astype(F32)}

    def torch_impl(x, torch):
        g, y = _tensor(torch, x["grad"]), _tensor(torch, x["output"])
        return lambda: torch._softmax_backward_data(g, y, -1, y.dtype)

    return Case(
        "softmax_backward", f"({rows},{cols})", inputs=inputs,
        impls={"fastnn": lambda x, torch: lambda: fastnn.softmax_backward(x["grad"], x["output"], -1),
               "numpy": lambda x, torch: lambda: reference.softmax_backward(x["grad"], x["output"], -1),
               "torch": torch_impl},
        expected=lambda x: reference.softmax_backward(
            x["grad"].astype(np.float64), x["output"].astype(np.float64), -1),
        work=3.0 * 4 * rows * cols, unit="byte", limit="mem_copy_gbs",
        formula="8*n read + 4*n written", notes="allocating")


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
        formula="4*N*C logits read + 4*N*C grad written + 8*N labels", notes="allocating")


def sdpa_case(batch, heads, length, dim, causal) -> Case:
    shape = (batch, heads, length, dim)
    # Non-causal: q@k^T and p@v each cost 2*L*S*E per head. Causal (top-left aligned, L == S): only
    # the L*(L+1)/2 allowed query-key pairs count, about half.
    pairs = length * (length + 1) / 2 if causal else length * length

    def torch_impl(x, torch):
        import torch.nn.functional as F
        q, k, v = (_tensor(torch, x[n]) for n in ("query", "key", "value"))
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return Case(
        "sdpa", f"({batch},{heads},{length},{dim})" + (" causal" if causal else ""),
        inputs=lambda rng: {n: _randn(rng, shape) for n in ("query", "key", "value")},
        impls={"fastnn": lambda x, torch: lambda: fastnn.scaled_dot_product_attention(
                   x["query"], x["key"], x["value"], is_causal=causal),
               "numpy": lambda x, torch: lambda: reference.scaled_dot_product_attention(
                   x["query"], x["key"], x["value"], is_causal=causal),
               "torch": torch_impl},
        expected=lambda x: reference.scaled_dot_product_attention(**_f64(x), is_causal=causal),
        work=4.0 * batch * heads * pairs * dim, unit="flop", limit="peak_gflops_f32",
        formula="4*B*H*E*L*S" + (" with L*S -> L*(L+1)/2" if causal else ""), notes="allocating")


ADAM = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)


def adam_case(n) -> Case:
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
        formula="4 arrays read + 3 written, 4 bytes each", notes="in place")


CASES: List[Case] = [
    matmul_case(1024, 1024, 1024),
    matmul_case(64, 784, 128),
    matmul_case(64, 128, 10),
    matmul_case(128, 64, 128, batch=32),
    linear_case(64, 784, 128),
    relu_case(16 * 2**20, inplace=False),
    relu_case(16 * 2**20, inplace=True),
    relu_backward_case(16 * 2**20),
    softmax_case(4096, 1024, log=False),
    softmax_case(4096, 1024, log=True),
    softmax_backward_case(4096, 1024),
    cross_entropy_case(4096, 1000),
    sdpa_case(4, 8, 1024, 64, causal=False),
    sdpa_case(4, 8, 1024, 64, causal=True),
    adam_case(10 * 10**6),
]

OPS = tuple(dict.fromkeys(c.op for c in CASES))


def select(ops=None) -> List[Case]:
    """The cases of the named ops (all when `ops` is empty); an unknown name is a ValueError."""
    if not ops:
        return list(CASES)
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise ValueError(f"unknown op {', '.join(unknown)}; expected one of: {', '.join(OPS)}")
    return [c for c in CASES if c.op in ops]


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

# Idle worker threads spin before they sleep: OpenBLAS's for 2^28 cycles (~0.1 s), libgomp's for a few
# ms. On a 2-core machine the spinning threads of the library timed last steal the cores from the
# next one (a 2-thread fastnn matmul ran 2-20x slower right after a NumPy matmul), so every timing
# starts after this pause.
SETTLE_SECONDS = 0.2


def settle():
    """Wait until the worker threads of the previous implementation (and of the check) are asleep."""
    time.sleep(SETTLE_SECONDS)


@dataclass
class Timing:
    median: float                                     # seconds per call
    best: float
    calls: int


def time_call(fn, budget=0.5, min_samples=5, max_samples=1000, first=None) -> Timing:
    """Median seconds per call of fn(), already warmed up by the caller.

    Samples are taken until `budget` seconds have passed and at least `min_samples` were taken. Calls
    shorter than ~100 us are grouped so one sample spans about 100 us, well above timer overhead.
    `first`: the seconds the caller's warm-up call took; above 1 ms it spares a call to size the groups.
    """
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


LIMIT_NAMES = {"peak_gflops_f32": "peak", "peak_gflops_f64": "peak", "mem_copy_gbs": "copy",
               "mem_rw_gbs": "rw", "mem_adam_gbs": "adam"}


# --------------------------------------------------------------------------------------------------
# Running

@dataclass
class Row:
    case: Case
    times: Dict[str, Optional[Timing]] = field(default_factory=dict)
    errors: Dict[str, float] = field(default_factory=dict)   # relative error of each result checked
    failures: Dict[str, str] = field(default_factory=dict)   # implementation -> what went wrong
    ok: bool = False                                         # fastnn ran and matched the oracle
    rate: Optional[float] = None                             # GFLOP/s or GB/s of fastnn
    percent_limit: Optional[float] = None

    def speedup(self, other) -> Optional[float]:
        mine, theirs = self.times.get("fastnn"), self.times.get(other)
        return theirs.median / mine.median if mine and theirs else None

    def to_dict(self) -> dict:
        c = self.case
        return {
            "op": c.op, "case": c.label, "work": c.work, "unit": c.unit, "formula": c.formula,
            "limit": c.limit, "notes": c.notes, "ok": self.ok, "tol": c.tol,
            "rel_error": self.errors, "failures": self.failures,
            "seconds": {k: t.median for k, t in self.times.items() if t},
            "best_seconds": {k: t.best for k, t in self.times.items() if t},
            "calls": {k: t.calls for k, t in self.times.items() if t},
            "rate": self.rate, "rate_unit": "GFLOP/s" if c.unit == "flop" else "GB/s",
            "percent_limit": self.percent_limit,
            "speedup_vs_numpy": self.speedup("numpy"), "speedup_vs_torch": self.speedup("torch"),
        }


def run_case(case: Case, torch=None, quick=False, limits=None, seed=0) -> Row:
    """Check fastnn (and the others) against the oracle, then time each implementation side by side."""
    row = Row(case)
    inputs = case.inputs(np.random.default_rng(seed))
    want = case.expected(inputs)
    budget, min_samples = (0.05, 2) if quick else (0.4, 5)
    for name in IMPLS:
        if name == "torch" and torch is None:
            continue
        try:
            fn = case.impls[name](inputs, torch)
            start = time.perf_counter()
            result = fn()                                 # first call: checked, and it warms up
            first = time.perf_counter() - start
        except Exception as exc:
            row.failures[name] = f"{type(exc).__name__}: {exc}"
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
        settle()
        row.times[name] = time_call(fn, budget=budget, min_samples=min_samples, first=first)
        del fn
    mine = row.times.get("fastnn")
    if mine:
        row.rate = case.work / mine.median / 1e9
        limit = (limits or {}).get(case.limit)
        if limit:
            row.percent_limit = 100.0 * row.rate / limit
    return row


def run(ops=None, quick=False, threads=None, json_path=None, torch="auto", out=sys.stdout,
        progress=sys.stderr) -> dict:
    """Run the bench: measure the limits, run every selected case, print the table to `out` and the
    progress to `progress`, write `json_path` when given. Returns everything as a dict."""
    cases = select(ops)
    if torch == "auto":
        torch = import_torch()
    previous_threads = fastnn.get_num_threads()
    if threads:
        fastnn.set_num_threads(threads)
    threads = fastnn.get_num_threads()
    try:
        blas = blas_info(threads)                         # NumPy's BLAS runs as many threads as fastnn
        if torch is not None:
            torch.set_num_threads(threads)
        print(f"measuring machine limits ({_plural(threads, 'thread')}) ...", file=progress, flush=True)
        limits = machine_limits(threads, quick)
        rows = []
        for i, case in enumerate(cases, 1):
            print(f"[{i}/{len(cases)}] {case.op} {case.label} ...", end="", file=progress, flush=True)
            row = run_case(case, torch, quick, limits)
            rows.append(row)
            print(" " + _progress_summary(row), file=progress, flush=True)
    finally:
        fastnn.set_num_threads(previous_threads)
    results = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": quick,
        "threads": threads,
        "machine": {"platform": platform.platform(), "processor": _cpu_name(),
                    "cpus": os.cpu_count()},
        "fastnn": _jsonable(fastnn.info()),
        "numpy": np.__version__,
        "blas": blas,
        "torch": getattr(torch, "__version__", None),
        "limits": limits,
        "rows": [r.to_dict() for r in rows],
    }
    print(format_report(results), file=out, flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"wrote {json_path}", file=progress)
    return results


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


def format_table(rows: List[dict], with_torch: bool) -> str:
    """The rows of `run()` (as dicts) as a Markdown table."""
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
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    fmt = lambda row: "| " + " | ".join(str(v).ljust(w) for v, w in zip(row, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(lines[0]), rule] + [fmt(row) for row in lines[1:]])


def _plural(n, word) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def format_report(results: dict) -> str:
    """Header (versions, threads, limits), the table, and how the figures are counted."""
    info, blas, lim = results["fastnn"], results["blas"], results["limits"]
    isa = info.get("cpu_isa", "?")
    supported = info.get("cpu_isa_supported")
    if isinstance(supported, (list, tuple)):
        supported = ", ".join(map(str, supported))
    torch = results["torch"]
    lines = [
        f"fastnn {info.get('version', '?')}: ISA {isa} (supported: {supported}), "
        f"OpenMP {info.get('openmp', '?')}, {_plural(results['threads'], 'thread')}"
        + (" (quick run)" if results["quick"] else ""),
        f"NumPy {results['numpy']} ({blas.get('library')} {blas.get('core') or ''}, "
        f"{_plural(blas.get('threads'), 'thread')}); PyTorch {torch if torch else 'not importable'}",
        f"CPU: {results['machine']['processor']}; limits ({_plural(lim['threads'], 'thread')}): "
        f"FMA peak {lim['peak_gflops_f32']:.0f} GFLOP/s float32, memory: copy {lim['mem_copy_gbs']:.1f} GB/s, "
        f"in place {lim['mem_rw_gbs']:.1f} GB/s, Adam 4r/3w {lim['mem_adam_gbs']:.1f} GB/s",
    ]
    env = blas.get("env")
    if env:
        lines.append(f"note: {', '.join(f'{k}={v}' for k, v in env.items())} is set: NumPy's OpenBLAS "
                     "may not run its best kernel; unset both for this command to compare against it")
    lines += ["", format_table(results["rows"], with_torch=bool(torch)), ""]
    lines.append("Times are medians per call. GFLOP/s: matmul and linear 2*B*M*N*K; sdpa 4*B*H*L*S*E "
                 "(causal: L*S -> L*(L+1)/2). GB/s: bytes read + written once. % limit: of the "
                 "float32 FMA peak, or of the copy / in-place / Adam-pattern bandwidth, all measured by the "
                 "native probes at start (memory on 256 MiB; arrays of 64 MiB, twice a 32 MiB L3, partly "
                 "stay in cache and can pass 100%). vs numpy / vs torch: their time / "
                 "fastnn's (> 1: fastnn faster). check: fastnn's relative error against the "
                 "float64 oracle.")
    failed = [r for r in results["rows"] if r["failures"]]
    for r in failed:
        for name, why in r["failures"].items():
            lines.append(f"{r['op']} {r['case']}: {name}: {why}")
    return "\n".join(lines)
