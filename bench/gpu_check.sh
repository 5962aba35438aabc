#!/usr/bin/env bash
# The GPU suite in one command, for a fresh machine with an NVIDIA GPU and no internet (nvcc, CMake, ninja,
# pybind11, scikit-build-core, pytest, cupy and torch already installed):
#   1. pip install --no-build-isolation . with FASTNN_CUDA=ON (for this GPU's architecture only, to keep the
#      build short; FASTNN_GPU_ARCHS=default builds the release list instead)
#   2. the GPU tests: python -m pytest -m gpu tests/test_gpu.py (a usable GPU is required: no skips)
#   3. compute-sanitizer memcheck and racecheck on bench/gpu_smoke.py (every kernel, small shapes)
#   4. bench/gpu_bench.py: every op vs cuBLAS / cupy / torch, Markdown + JSON
# Usage: bench/gpu_check.sh OUTDIR    (logs and results land in OUTDIR; exit status 1 if any step failed)
set -uo pipefail
out=${1:?usage: bench/gpu_check.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export CUPY_TF32=0
start=$SECONDS
status=0
summary="$out/summary.md"
echo "# fastnn GPU check $(date -Iseconds)" > "$summary"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$summary" 2>&1 || true

step() {  # step NAME TIMEOUT_S COMMAND...: runs it, logs to OUTDIR/NAME.log, records ok/FAILED
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "==== [$((SECONDS - start))s] $name: $*"
  if timeout "$limit" "$@" > "$out/$name.log" 2>&1; then
    echo "- $name: ok ($((SECONDS - t0)) s)" >> "$summary"
  else
    echo "- $name: FAILED, rc $? ($((SECONDS - t0)) s): see $name.log" >> "$summary"
    tail -n 30 "$out/$name.log"
    status=1
  fi
}

archs=${FASTNN_GPU_ARCHS:-native}
arch_def=()
[ "$archs" != default ] && arch_def=(-Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$archs")
step install 420 python -m pip install --no-build-isolation --no-index --no-deps -v . \
  -Ccmake.define.FASTNN_CUDA=ON "${arch_def[@]}"
# The tests and the sanitizer must use the installed package (not a source tree built in place).
ls fastnn/_C*.so > /dev/null 2>&1 && echo "warning: fastnn/ holds an in-place build (tools/dev_build.sh); tests may import it" | tee -a "$summary"
(cd "$out" && python -c 'import fastnn, json; i = fastnn.info(); print(json.dumps(i, indent=1)); assert fastnn.cuda_is_available(), i.get("cuda_unavailable_reason")') > "$out/info.json" 2>&1 \
  || { echo "- cuda_is_available: FALSE (see info.json)" >> "$summary"; status=1; }

step pytest_gpu 300 python -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider
grep -q " skipped" "$out/pytest_gpu.log" && { echo "- pytest_gpu: some tests SKIPPED (see pytest_gpu.log)" >> "$summary"; status=1; }

sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
step memcheck 300 "$sanitizer" --tool memcheck --error-exitcode 9 python bench/gpu_smoke.py
step racecheck 300 "$sanitizer" --tool racecheck --racecheck-report hazard --error-exitcode 9 python bench/gpu_smoke.py

step bench 420 python bench/gpu_bench.py --out "$out"

echo "total: $((SECONDS - start)) s" >> "$summary"
cat "$summary"
[ -f "$out/gpu_bench.md" ] && cat "$out/gpu_bench.md"
exit $status
