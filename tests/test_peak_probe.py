"""The benchmark's FMA-peak probe against the matmul kernel, on every ISA path this machine has: no
kernel can beat the machine's peak, so a matmul measured above the probe's figure means the probe is
wrong (as it was on AVX2, where its accumulators spilled to the stack and it measured latency)."""
import time

import numpy as np
import pytest

import fastnn


def _matmul_gflops(isa, dtype, n=384, reps=5):
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32).astype(dtype)
    c = np.empty_like(a)
    fastnn.matmul(a, a, out=c)                    # warm up: packing buffers, threads, clocks
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fastnn.matmul(a, a, out=c)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def _dtype(name):
    if name == "bfloat16":
        return np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    return np.dtype(name)


@pytest.mark.parametrize("dtype,limit", [("float32", "peak_gflops_f32"), ("bfloat16", "peak_gflops_bf16")])
@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_never_beats_the_probed_peak(isa, threads, dtype, limit):
    # bfloat16: against the AVX512-BF16 dot product's probe on the avx512bf16 path (the float32 peak on
    # the others, where bfloat16 is widened).
    # A probe is short: it comes out low while another process, or the idle workers of the BLAS an
    # earlier test ran (OpenBLAS spins ~0.1 s), hold a core, and a matmul can never be faster than the
    # machine, so the best of every probe so far is compared with the best matmul so far, after each
    # attempt, and the test fails only when the matmul still beats every probe after five attempts.
    # On a quiet machine the first attempt passes: the matmul reaches 80-90% of the peak.
    threads = min(threads, fastnn.get_num_threads())
    previous = fastnn.get_num_threads()
    fastnn.set_num_threads(threads)
    try:
        peak = rate = 0.0
        for _ in range(5):
            time.sleep(0.3)
            peak = max(peak, fastnn._C.machine_limits(threads, True)[limit])
            rate = max(rate, _matmul_gflops(isa, _dtype(dtype)))
            peak = max(peak, fastnn._C.machine_limits(threads, True)[limit])
            if rate <= 1.05 * peak:
                return
        pytest.fail(f"{isa}, {threads} thread(s): {dtype} matmul {rate:.1f} GFLOP/s above the probe's peak "
                    f"{peak:.1f} GFLOP/s: the probe does not measure the FMA throughput")
    finally:
        fastnn.set_num_threads(previous)


def test_probe_below_the_clock_model(isa):
    """threads x 2 FMA pipes x lanes x 2 x clock bounds what any probe can measure (where the system
    reports its clock; many virtual machines do not)."""
    from fastnn.bench.limits import cpu_clock_ghz, model_peak_gflops
    if cpu_clock_ghz() is None:
        pytest.skip("the CPU clock is not reported here")
    peak = fastnn._C.machine_limits(1, True)["peak_gflops_f32"]
    model = model_peak_gflops(1, isa)
    assert peak <= 1.05 * model, f"{isa}: probe {peak:.1f} GFLOP/s above the model {model:.1f}"


def test_model_peak_counts_lanes_pipes_and_clock():
    from fastnn.bench.limits import model_peak_gflops
    assert model_peak_gflops(2, "avx2", clock_ghz=3.0) == 2 * 2 * 8 * 2 * 3.0
    assert model_peak_gflops(1, "avx512", f64=True, clock_ghz=2.0) == 2 * 8 * 2 * 2.0
    assert model_peak_gflops(1, "generic", clock_ghz=1.0) == 2 * 4 * 2 * 1.0
