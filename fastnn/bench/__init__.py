"""`fastnn bench` (`python -m fastnn bench`): times every op against NumPy (and PyTorch when it imports), side by side in
one run, after checking each result against the float64 oracle in `fastnn.reference`.

The pieces are small so later work can extend them: a `Case` is one row (how to make its inputs, how to
call each implementation, the float64 oracle, the work one call does and which machine limit bounds
it); `CASES` lists the rows; `machine_limits()` measures what the machine can do; `time_call()` times
one call (`CudaEvents` on a GPU, for bench/gpu_bench.py); `run()` ties them together for one or several thread counts, `format_report()` prints the
tables and `plot_roofline()` draws them. The pytest-benchmark suite in bench/ reuses `CASES`.
"""
from __future__ import annotations

from . import extra, isa

from .case import F32, IMPLS, Case, rel_error
from .cases import CASES, OPS, select
from .cases.train import numpy_mlp_step
from .limits import LIMIT_NAMES, machine_limits
from .peers import blas_info, import_torch
from .plot import PLOT_CAPTION, have_matplotlib, plot_roofline
from .report import format_report, format_scaling, format_seconds, format_table
from .runner import Row, default_threads, parse_threads, run, run_case, scaling, use_threads
from .timing import SETTLE_OPENMP_SECONDS, SETTLE_SECONDS, CudaEvents, Timing, note_threads, settle, time_call

__all__ = [
    "extra", "isa",
    "F32", "IMPLS", "Case", "rel_error", "CASES", "OPS", "select", "numpy_mlp_step", "LIMIT_NAMES", "machine_limits", "blas_info",
    "import_torch", "PLOT_CAPTION", "have_matplotlib", "plot_roofline", "format_report", "format_scaling",
    "format_seconds", "format_table", "Row", "default_threads", "parse_threads", "run", "run_case", "scaling",
    "use_threads", "SETTLE_OPENMP_SECONDS", "SETTLE_SECONDS", "CudaEvents", "Timing", "note_threads", "settle", "time_call",
]
