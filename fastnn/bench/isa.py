"""`fastnn bench --isa PATH|all`: fastnn on one ISA path and its peers forced onto the same instruction
set, one child process per path (the peers read their settings when they load, so a path cannot be
changed inside a running process), each printing its own tables."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Dict, List

import fastnn

PATHS = ("generic", "avx2", "avx512", "avx512bf16")

# What makes each peer run one instruction set, set before it loads: NumPy's OpenBLAS (its kernel
# family; Nehalem is its newest without AVX, the nearest to fastnn's SSE2 baseline), and PyTorch's own
# ATen kernels, its MKL and its oneDNN. The tables' headers then say which kernels the peers report.
PEER_ENV: Dict[str, Dict[str, str]] = {
    "generic": {"OPENBLAS_CORETYPE": "Nehalem", "ATEN_CPU_CAPABILITY": "default",
                "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "avx2": {"OPENBLAS_CORETYPE": "Haswell", "ATEN_CPU_CAPABILITY": "avx2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512": {"OPENBLAS_CORETYPE": "SkylakeX", "ATEN_CPU_CAPABILITY": "avx512",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    # avx512 plus the bf16 dot product: OpenBLAS's Cooper Lake kernels (its bf16 family), ATen's avx512
    # (its highest), and oneDNN, which runs PyTorch's bfloat16 matmul, allowed the AVX512-BF16 instructions.
    "avx512bf16": {"OPENBLAS_CORETYPE": "Cooperlake", "ATEN_CPU_CAPABILITY": "avx512",
                   "MKL_ENABLE_INSTRUCTIONS": "AVX512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
}
# Set in each child: the path its peers were forced to (the report says so instead of warning that
# OPENBLAS_CORETYPE is set).
FORCED_ENV = "FASTNN_BENCH_PEER_ISA"


def resolve(name: str) -> List[str]:
    """The paths `--isa name` runs: one, or every path this CPU supports for "all". ValueError for a
    path this machine or build lacks."""
    supported = fastnn.info()["cpu_isa_supported"]
    if name == "all":
        return [p for p in PATHS if p in supported]
    if name not in supported:
        raise ValueError(f"--isa {name}: not available here (this CPU and build support: "
                         f"{', '.join(supported)})")
    return [name]


def path_file(path: str, isa: str, several: bool) -> str:
    """FILE for one path's output: absolute (the child runs elsewhere), with -ISA before the suffix
    when several paths write one each."""
    path = os.path.abspath(path)
    if not several:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}-{isa}{ext}"


def run_paths(paths: List[str], bench_args: List[str], json_path=None, plot_path=None, out=sys.stdout) -> int:
    """Runs `fastnn bench BENCH_ARGS` once per ISA path in a child process with fastnn and its peers
    forced to that path; --json / --plot files get one per path. Returns the worst exit status."""
    # The child imports the fastnn this process runs: started in the folder above the package, so that a
    # source tree in the current directory cannot shadow it.
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(fastnn.__file__)))
    status = 0
    for isa in paths:
        args = list(bench_args)
        if json_path:
            args += ["--json", path_file(json_path, isa, len(paths) > 1)]
        if plot_path:
            args += ["--plot", path_file(plot_path, isa, len(paths) > 1)]
        env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_L2_SIZE"}
        env.update(PEER_ENV[isa], FASTNN_CPU_ISA=isa, **{FORCED_ENV: isa})
        env["PYTHONPATH"] = os.pathsep.join([package_parent] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        forced = ", ".join(f"{k}={v}" for k, v in PEER_ENV[isa].items())
        print(f"## ISA path {isa}: fastnn FASTNN_CPU_ISA={isa}; peers {forced}\n", file=out, flush=True)
        child = subprocess.run([sys.executable, "-c", "import sys; from fastnn.__main__ import main; "
                                "sys.exit(main(sys.argv[1:]))", "bench", *args],
                               cwd=package_parent, env=env, stdout=out if out is not sys.stdout else None)
        status = max(status, child.returncode)
        print("", file=out, flush=True)
    return status
