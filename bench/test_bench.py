"""pytest-benchmark suite: the cases of `python -m fastnn bench` (fastnn.bench.CASES), one benchmark
group per op, fastnn beside NumPy and PyTorch (skipped when torch does not import). Every
implementation's first result is checked against the float64 oracle before it is timed.

Not part of the test run (pyproject's testpaths is tests/); run it explicitly:
    python -m pytest bench/ --benchmark-only
The full run's cases by default; FASTNN_BENCH_QUICK=1 takes the --quick set instead (no 4096^3
product, no 64M/50M arrays, attention at (1, 8, 1024, 64)). All on fastnn's thread count.
"""
import os
import re

import numpy as np
import pytest

import fastnn
from fastnn import bench

torch = bench.import_torch()

# Same thread count for everyone, as in `python -m fastnn bench`.
THREADS = fastnn.get_num_threads()
bench.use_threads(THREADS, torch)
QUICK = os.environ.get("FASTNN_BENCH_QUICK", "") not in ("", "0")


def _params():
    for case in bench.select(quick=QUICK, available=False):
        label = re.sub(r"[^\w.]+", "_", case.label).strip("_")
        for impl in bench.IMPLS:
            marks = [pytest.mark.benchmark(group=case.op)]
            if (impl == "torch" or case.torch_arrays) and torch is None:
                marks.append(pytest.mark.skip(reason="PyTorch is not importable"))
            if not case.available():
                marks.append(pytest.mark.skip(reason=f"fastnn.{case.requires} does not exist"))
            yield pytest.param(case, impl, id=f"{case.op}-{label}-{impl}", marks=marks)


# Inputs and the float64 oracle of the case being run. The three implementations of a case are
# consecutive parameters, so keeping only the latest case computes each oracle once and holds the
# large inputs of one case at a time.
_current = {}


def _inputs_and_oracle(case):
    if _current.get("case") is not case:
        _current.clear()
        inputs = case.inputs(np.random.default_rng(0))
        _current.update(case=case, inputs=inputs, expected=case.expected(inputs))
    return _current["inputs"], _current["expected"]


@pytest.mark.parametrize("case, impl", list(_params()))
def test_bench(benchmark, case, impl):
    inputs, expected = _inputs_and_oracle(case)
    call = case.impls[impl](inputs, torch)
    err = case.error(call(), expected, inputs)
    assert err <= case.tol, f"{impl} {case.id}: relative error {err:.3g} > {case.tol:g}"
    benchmark.extra_info.update(case=case.label, work=case.work, unit=case.unit,
                                formula=case.formula, threads=THREADS, rel_error=err)
    # Let the worker threads of the previous test (and of the check) fall asleep.
    bench.settle(bench.SETTLE_SECONDS)
    benchmark(call)
