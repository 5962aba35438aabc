"""The machine's limits, measured by fastnn's compiled probes: FMA peak and memory bandwidth."""
from __future__ import annotations

import fastnn


def machine_limits(threads=None, quick=False) -> dict:
    """What this machine can do, measured by the compiled probes on the ISA path in use: peak_gflops_f32
    and peak_gflops_f64 (independent register FMA chains on every thread), mem_copy_gbs, mem_rw_gbs
    (in place) and mem_adam_gbs (4 reads / 3 writes), on arrays far beyond the last-level cache;
    plus threads and source (how each figure was obtained)."""
    threads = threads or fastnn.get_num_threads()
    return dict(fastnn._C.machine_limits(threads, quick))


LIMIT_NAMES = {"peak_gflops_f32": "peak", "peak_gflops_f64": "peak64", "mem_copy_gbs": "copy",
               "mem_rw_gbs": "rw", "mem_adam_gbs": "adam"}
