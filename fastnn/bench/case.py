"""One benchmark row (`Case`) and the helpers its builders share: inputs, private copies, error measures."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import numpy as np

import fastnn


IMPLS = ("fastnn", "numpy", "torch")
F32 = np.float32


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
    that NumPy's implementation (or the oracle) runs BLAS, whose idle threads spin for a while;
    `torch_arrays` that fastnn is called on torch CPU tensors (a tiny-call row beside its numpy twin:
    the difference is what adopting the tensors and wrapping the result costs; skipped without torch).
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
    torch_arrays: bool = False

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
        got = _np(got)
    if got is None:
        return math.inf
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return math.inf
    scale = np.linalg.norm(want)
    diff = np.linalg.norm(got - want)
    return float(diff / scale) if scale else float(diff)


def _np(x):
    """A torch tensor as a numpy array (anything else unchanged); bfloat16 ones as float32 (numpy has none)."""
    if not hasattr(x, "detach"):
        return x
    x = x.detach()
    return (x.float() if str(x.dtype) == "torch.bfloat16" else x).numpy()


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
