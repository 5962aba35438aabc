"""The machine's limits, measured by fastnn's compiled probes: FMA peak and memory bandwidth."""
from __future__ import annotations

import os

import fastnn


def machine_limits(threads=None, quick=False) -> dict:
    """What this machine can do, measured by the compiled probes on the ISA path in use: peak_gflops_f32
    and peak_gflops_f64 (independent register FMA chains on every thread), peak_gflops_bf16 (the
    AVX512-BF16 dot product's on the avx512bf16 path; elsewhere = peak_gflops_f32, the rate of bfloat16
    products widened to float32), mem_copy_gbs, mem_rw_gbs
    (in place) and mem_adam_gbs (4 reads / 3 writes), on arrays far beyond the last-level cache;
    plus threads, source (how each figure was obtained) and model_peak_gflops_f32, the float32 peak
    from the clock (model_peak_gflops; None when the clock is unknown)."""
    threads = threads or fastnn.get_num_threads()
    limits = dict(fastnn._C.machine_limits(threads, quick))
    limits["isa"] = fastnn.cpu_isa()
    limits["model_peak_gflops_f32"] = model_peak_gflops(threads, limits["isa"])
    return limits


LIMIT_NAMES = {"peak_gflops_f32": "peak", "peak_gflops_f64": "peak64", "peak_gflops_bf16": "peak bf16", "mem_copy_gbs": "copy",
               "mem_rw_gbs": "rw", "mem_adam_gbs": "adam"}


# FMA pipes per core assumed by the model peak: two on every x86-64 core since Haswell / Zen 1 (both
# 256-bit, or 512-bit on Intel server cores and Zen 5); one 512-bit pipe on Zen 4 and client Intel cores,
# where the model overstates the AVX-512 peak by 2x. Generic (SSE2) path: one mul and one add pipe
# counted as one FMA pipe of 4 lanes, twice.
FMA_PIPES = 2
LANES_F32 = {"generic": 4, "avx2": 8, "avx512": 16, "avx512bf16": 16}


def cpu_clock_ghz():
    """The CPU's highest clock in GHz when the system reports it (cpufreq's cpuinfo_max_freq, where it
    includes the boost clock), else None. /proc/cpuinfo's "cpu MHz" is not used: it is the current clock,
    and on virtual machines the nominal TSC rate (2.6 GHz on a VM whose cores ran at 4.1)."""
    try:
        if os.path.exists("/sys/devices/system/cpu/cpufreq/boost"):
            return None         # acpi-cpufreq: cpuinfo_max_freq leaves the boost clock out
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            return int(f.read()) / 1e6
    except (OSError, ValueError):
        return None


def implied_clock_ghz(peak_gflops, isa, f64=False):
    """The clock at which FMA_PIPES pipes of this ISA's width give `peak_gflops` on one core: a reading
    aid for the probe (above any real clock: the probe is wrong; far below: it measured latency)."""
    lanes = LANES_F32.get(isa)
    return peak_gflops / (FMA_PIPES * (lanes // 2 if f64 else lanes) * 2) if lanes and peak_gflops else None


def model_peak_gflops(threads, isa, f64=False, clock_ghz=None):
    """threads x FMA_PIPES x lanes x 2 flops x clock: the peak the probe should approach (None when the
    clock is unknown). A probe above it by more than a few percent is measuring something else."""
    clock = clock_ghz or cpu_clock_ghz()
    lanes = LANES_F32.get(isa)
    if not clock or not lanes:
        return None
    return threads * FMA_PIPES * (lanes // 2 if f64 else lanes) * 2 * clock
