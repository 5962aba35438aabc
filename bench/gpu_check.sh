#!/usr/bin/env bash
# The GPU suite in one command of at most 8 minutes, for a fresh machine with an NVIDIA GPU and no network
# (python3 with numpy, cupy, pytest, pybind11, scikit-build-core, cmake and ninja; nvcc; compute-sanitizer
# optional). Each step has a fixed time cap and the whole run a total cap (TOTAL_S, 480 s); a step that
# would start past the total is not run. Every log and result is written under OUTDIR as it is produced, so
# a run killed from outside still leaves what it had.
#
#   step       cap   what
#   preflight   20 s  GPU, driver, python, cupy, nvcc, cmake, compute-sanitizer; NO usable GPU: stops here
#   build      150 s  pip install --no-build-isolation --no-index --no-deps --target WORK/site . with
#                     FASTNN_CUDA=ON and CMAKE_CUDA_ARCHITECTURES=native (this GPU only; the build resolves
#                     `native` and records the list), into a scratch folder: nothing is installed system-wide
#   check       15 s  fastnn.info(), cuda_is_available() and the architecture rule for this device; stops
#                     here (printing why) if the GPU is not usable by the build
#   tests      150 s  pytest -m gpu over the test files that hold GPU tests (each op's file, test_gpu_edge.py,
#                     test_cuda_arch.py) against the installed package (a copy of tests/ outside the tree):
#                     every test must pass, none skip
#   memcheck    60 s  compute-sanitizer memcheck over bench/gpu_smoke.py --no-pool (every kernel, fast and
#                     plain, float32 and float16), instrumenting fastnn's kernels only, with cupy's memory
#                     pool off so every array is its own allocation and an overrun is caught at its edge
#   bench       80 s  bench/gpu_bench.py --quick: every op timed against cuBLAS / cupy / torch, checked first
#                     (fastnn.bench.CudaEvents from the installed package: CUDA events, L2 flushed)
# Sum of the caps: 475 s.
#
# --more (bench/gpu_check_more.sh): what does not fit, in a second call of at most 9 minutes (TOTAL_S 540):
# preflight, build and check as above, then compute-sanitizer racecheck (110 s), initcheck (40 s) and
# synccheck (40 s) over bench/gpu_smoke.py --no-pool (every kernel, fast and plain variants, fastnn's kernels
# only), and the full-size bench (140 s).
#
# Usage: bench/gpu_check.sh OUTDIR              on a GPU machine (exit 0: every step passed; 1: a step
#                                               failed; 2: stopped, no usable GPU; 3: passed, but a step could
#                                               not run: sanitizer missing or refused, time budget spent)
#        bench/gpu_check.sh [--more] --rehearse [OUTDIR]
#                                               on a machine without a GPU (CI): every step that needs no GPU
#                                               (the same build with `native` standing for FAKE_ARCHS, default
#                                               90-real, an H100/H200; the architecture rule against fake
#                                               devices; the tests, which must skip with a reason; the
#                                               sanitizer and bench command lines; the time accounting and
#                                               the output files). Exit 0 when the rehearsal passed. The
#                                               build may take up to 900 s there (a CI machine has 2 cores,
#                                               the GPU machine 16); its time is reported against 150 s.
# OUTDIR holds at most 8 files (summary.md, env.log, build.log, tests.log or sanitizers.log, memcheck.log,
# bench.log, gpu_bench.md, gpu_bench.json). Environment: PYTHON (python3), TOTAL_S (480), FASTNN_GPU_ARCHS (native;
# `default` builds the release list), JOBS (build jobs; default all cores, 2 when rehearsing), WORK
# (scratch folder, default a new one under /tmp; the build folder inside it is reused when WORK is given).
set -uo pipefail
rehearse=0
more=0
while [ $# -gt 0 ]; do
  case $1 in
    --rehearse) rehearse=1; shift ;;
    --more) more=1; shift ;;
    *) break ;;
  esac
done
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-}
if [ -z "$out" ]; then
  [ $rehearse = 1 ] || { echo "usage: bench/gpu_check.sh [--rehearse] OUTDIR" >&2; exit 64; }
  out=$repo/build/gpu-check-rehearsal
fi
mkdir -p "$out" && out=$(cd "$out" && pwd)
rm -f "$out"/summary.md "$out"/env.log "$out"/build.log "$out"/tests.log "$out"/memcheck.log "$out"/bench.log \
  "$out"/sanitizers.log "$out"/gpu_bench.md "$out"/gpu_bench.json
PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-$([ $more = 1 ] && echo 540 || echo 480)}
FAKE_ARCHS=${FAKE_ARCHS:-90-real}  # what `native` resolves to on an H100 / H200 (compute capability 9.0)
work=${WORK:-$(mktemp -d /tmp/fastnn-gpu-check.XXXXXX)}
mkdir -p "$work"
site=$work/site
export PYTHONUNBUFFERED=1 CUPY_TF32=0 PYTHONDONTWRITEBYTECODE=1
start=$SECONDS
status=0       # 1: a step failed
incomplete=0   # a step could not run
summary=$out/summary.md
env_log=$out/env.log
if [ $more = 0 ]; then
  declare -A CAP=([preflight]=20 [build]=150 [check]=15 [tests]=150 [memcheck]=60 [bench]=80)
  ORDER=(preflight build check tests memcheck bench)
else
  declare -A CAP=([preflight]=20 [build]=150 [check]=15 [racecheck]=110 [initcheck]=40 [synccheck]=40 [bench]=140)
  ORDER=(preflight build check racecheck initcheck synccheck bench)
fi
GPU_BUILD_CAP=${CAP[build]}
if [ $rehearse = 1 ]; then  # a CI machine builds far slower than the GPU machine: more time, reported apart
  CAP[build]=900
  TOTAL_S=$((TOTAL_S + 900 - GPU_BUILD_CAP))
fi

say() { echo "[$((SECONDS - start))s] $*"; }
{
  echo "# fastnn GPU check$([ $more = 1 ] && echo ' --more')$([ $rehearse = 1 ] && echo ' (REHEARSAL: no GPU)'), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  if commit=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null); then
    git -C "$repo" diff --quiet HEAD 2>/dev/null || commit="$commit + local changes"
  else
    commit="? (no git metadata)"
  fi
  echo "commit $commit; total cap ${TOTAL_S} s"
  echo
  echo "| step | result | seconds | cap |"
  echo "|---|---|---|---|"
} > "$summary"
notes=()
note() { notes+=("$*"); say "$*"; }
record() {  # record STEP RESULT SECONDS
  echo "| $1 | $2 | $3 | ${CAP[$1]} |" >> "$summary"
  say "$1: $2 ($3 s of ${CAP[$1]})"
}
finish() {
  local total=$((SECONDS - start))
  {
    echo
    for n in "${notes[@]}"; do echo "- $n"; done
    echo
    echo "total: $total s (cap $TOTAL_S s); exit status $1"
  } >> "$summary"
  for f in "$out"/*; do  # the device tool returns files up to 16 MiB: keep the end of an oversized log
    [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt 15000000 ] && { tail -c 14000000 "$f" > "$f.tmp" && mv "$f.tmp" "$f"; }
  done
  echo
  cat "$summary"
  [ -s "$out/gpu_bench.md" ] && { echo; cat "$out/gpu_bench.md"; }
  [ -z "${WORK:-}" ] && rm -rf "$work"
  exit "$1"
}

# run_step STEP LOG COMMAND...: runs COMMAND under the step's cap (never past the total), output appended to
# LOG. Sets step_rc (124: killed at the cap) and step_s; returns step_rc.
run_step() {
  local name=$1 log=$2
  shift 2
  local left=$((TOTAL_S - (SECONDS - start)))
  local cap=${CAP[$name]}
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -le 0 ]; then
    step_rc=125; step_s=0
    return 125
  fi
  say "$name: $* (cap $cap s)"
  echo "==== $name: $* (cap $cap s)" >> "$log"
  local t0=$SECONDS
  (cd "$work" && timeout -k 5 "$cap" "$@") >> "$log" 2>&1
  step_rc=$?
  step_s=$((SECONDS - t0))
  return $step_rc
}
verdict() {  # verdict STEP [what failed]: records ok / FAILED / TIMED OUT / not run from step_rc
  case $step_rc in
    0) record "$1" ok "$step_s" ;;
    124|137) record "$1" "TIMED OUT at its cap: see $1's log" "$step_s"; status=1 ;;
    125) record "$1" "not run: the total time budget is spent" 0; incomplete=1 ;;
    *) record "$1" "FAILED (rc $step_rc)${2:+: $2}" "$step_s"; status=1 ;;
  esac
}

# ---- time accounting: the caps fit the total ----------------------------------------------------------
caps=0
for s in "${ORDER[@]}"; do caps=$((caps + CAP[$s])); done
if [ "$caps" -gt "$TOTAL_S" ]; then
  note "the step caps add up to $caps s, over the total of $TOTAL_S s"
  finish 1
fi

# ---- preflight ----------------------------------------------------------------------------------------
cat > "$work/preflight.py" <<'EOF'
import importlib.metadata, os, platform, sys, sysconfig
print("python", sys.version.split()[0], sys.executable, platform.machine())
for dist in ("numpy", "pytest", "pybind11", "scikit-build-core", "cmake", "ninja", "cupy-cuda13x", "cupy-cuda12x",
             "torch", "ml-dtypes"):
    try:
        print(dist, importlib.metadata.version(dist))
    except importlib.metadata.PackageNotFoundError:
        print(dist, "MISSING")
inc = sysconfig.get_paths()["include"]
print(f"Python.h: {'present' if os.path.exists(os.path.join(inc, 'Python.h')) else 'MISSING'} in {inc}")
try:
    import cupy
    print("cupy", cupy.__version__)
    n = cupy.cuda.runtime.getDeviceCount()
    for d in range(n):
        p = cupy.cuda.runtime.getDeviceProperties(d)
        print(f"GPU {d}: {p['name'].decode()} compute capability {p['major']}.{p['minor']}, "
              f"{p['totalGlobalMem'] / 2**30:.1f} GiB")
    if n == 0:
        sys.exit("NO GPU: cupy sees no CUDA device")
    ccs = sorted({(cupy.cuda.runtime.getDeviceProperties(d)["major"], cupy.cuda.runtime.getDeviceProperties(d)["minor"])
                  for d in range(n)})
    print("NATIVE_FALLBACK=" + ";".join(f"{a}{b}-real" for a, b in ccs))
except ImportError as e:
    sys.exit(f"NO GPU: cupy does not import ({e}); fastnn's GPU path needs cupy")
except Exception as e:
    sys.exit(f"NO GPU: cupy cannot use the device ({type(e).__name__}: {e})")
EOF
find_sanitizer() {
  command -v compute-sanitizer && return
  local c
  for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer \
           /usr/local/cuda-*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer; do
    [ -x "$c" ] && { echo "$c"; return; }
  done
  local nv; nv=$(command -v nvcc) && c=$(dirname "$(readlink -f "$nv")")/compute-sanitizer && [ -x "$c" ] && echo "$c"
}
t0=$SECONDS
{
  echo "==== preflight"
  uname -a
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi: not usable"
  nvcc --version 2>&1 | tail -n 2 || echo "nvcc: MISSING"
  cmake --version 2>&1 | head -n 1 || echo "cmake: MISSING"
  sanitizer=$(find_sanitizer)
  echo "compute-sanitizer: ${sanitizer:-MISSING}"
  [ -n "$sanitizer" ] && timeout 20 "$sanitizer" --version 2>&1 | tail -n 2
} >> "$env_log" 2>&1
sanitizer=$(find_sanitizer)
left=$((CAP[preflight] - (SECONDS - t0)))
timeout -k 5 "$((left > 5 ? left : 5))" "$PY" "$work/preflight.py" >> "$env_log" 2>&1
pre_rc=$?
step_s=$((SECONDS - t0))
grep -E "NO GPU|^(pybind11|scikit-build-core|Python.h).*MISSING|compute-sanitizer|GPU [0-9]+:" "$env_log" | sed 's/^/  /'
no_gpu=$(grep -E '^NO GPU' "$env_log" | tail -n 1)
if [ $pre_rc -ne 0 ] && [ $rehearse = 0 ]; then
  record preflight "STOPPED: ${no_gpu:-the preflight failed (rc $pre_rc): see env.log}" "$step_s"
  finish 2
fi
# What the build needs: stop now rather than after minutes of a build that cannot succeed.
missing=$(grep -E "^(pybind11|scikit-build-core) MISSING|^Python.h: MISSING" "$env_log" | cut -d' ' -f1 | tr '\n' ' ')
command -v nvcc > /dev/null || missing="nvcc $missing"
command -v cmake > /dev/null || grep -q "^cmake [0-9]" "$env_log" || missing="cmake $missing"
if [ -n "$missing" ]; then
  record preflight "FAILED: the build needs what is missing here: $missing(see env.log)" "$step_s"
  finish 1
fi
if [ $rehearse = 1 ]; then
  record preflight "ok (rehearsal: ${no_gpu:-a GPU is present})" "$step_s"
else
  record preflight ok "$step_s"
fi
[ -z "$sanitizer" ] && note "compute-sanitizer not found: the sanitizer steps will not run"

# ---- build ----------------------------------------------------------------------------------------------
archs=${FASTNN_GPU_ARCHS:-native}
defs=(-Ccmake.define.FASTNN_CUDA=ON -Cbuild-dir="$work/build")
[ "$archs" != default ] && defs+=(-Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$archs")
# `native` is resolved by CMake's own device query; should that find nothing, the capability cupy reported
# stands in (the rehearsal's fake device list, without a GPU).
fallback=$(sed -n 's/^NATIVE_FALLBACK=//p' "$env_log" | tail -n 1)
[ $rehearse = 1 ] && fallback=$FAKE_ARCHS
[ -n "$fallback" ] && defs+=(-Ccmake.define.FASTNN_CUDA_NATIVE_ARCHS="$fallback")
export CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-$([ $rehearse = 1 ] && echo 2 || nproc)}
rm -rf "$site"
run_step build "$out/build.log" "$PY" -m pip install --no-build-isolation --no-index --no-deps --no-compile \
  --target "$site" -v "${defs[@]}" "$repo"
verdict build "see build.log"
[ $step_rc -ne 0 ] && finish 1
if [ $rehearse = 1 ]; then
  note "rehearsal: the build took $step_s s here; its cap on the GPU machine is $GPU_BUILD_CAP s"
fi
export PYTHONPATH=$site

# ---- check: is the GPU usable by this build? -------------------------------------------------------------
cat > "$work/check.py" <<'EOF'
import json, os, sys
import fastnn
from fastnn import _cuda_arch, _gpu
rehearse = sys.argv[1] == "1"
info = fastnn.info()
print(json.dumps(info, indent=1, default=str))
assert fastnn.__file__.startswith(os.environ["PYTHONPATH"]), f"fastnn imported from {fastnn.__file__}"
cuda = _gpu.cuda_module()
if cuda is None:
    sys.exit(f"fastnn._cuda was not built or does not import: {info.get('cuda_unavailable_reason')}")
archs = cuda.build_info()["cuda_architectures"]
print("recorded architectures:", archs)
if rehearse:
    # The architecture rule against fake devices: what `native` stood for must run on its device, and the
    # build must have recorded a resolved list (no special value left).
    fake = os.environ["FAKE_ARCHS"]
    assert archs == fake.replace(";", ","), f"the build recorded {archs!r}, expected {fake!r}"
    parsed = _cuda_arch.parse(archs)
    assert all(not isinstance(e, str) for e in parsed), f"unresolved special value in {archs!r}"
    cc = (parsed[0][0], parsed[0][1])
    assert _cuda_arch.supports(archs, cc), f"{archs} must run on compute capability {cc}"
    assert not _cuda_arch.supports(archs, (cc[0] - 1, 0)), f"{archs} must not claim compute capability {cc[0] - 1}.0"
    print(f"architecture rule: {archs} runs on a fake device of compute capability {cc[0]}.{cc[1]}, "
          f"not on {cc[0] - 1}.0")
    reason = _gpu.unavailable_reason()
    assert not fastnn.cuda_is_available() and reason, "a GPU is usable here: run without --rehearse"
    print("rehearsal: no usable GPU, as expected:", reason)
    sys.exit(0)
if "cuda_compute_capability" in info:
    cc = tuple(int(c) for c in info["cuda_compute_capability"].split("."))
    print(f"architecture rule: {archs} on compute capability {cc[0]}.{cc[1]}: {_cuda_arch.supports(archs, cc)}")
if not fastnn.cuda_is_available():
    why = _gpu.unavailable_reason()
    if why is None:  # the device is there but the build's code does not run on it: the per-device check says why
        try:
            _gpu._check_device(0)
        except Exception as e:
            why = str(e)
    sys.exit(f"NOT USABLE: {why or info.get('cuda_device_error') or '?'} "
             f"(architectures {archs}, device {info.get('cuda_device')} {info.get('cuda_compute_capability')})")
print(f"usable: {info['cuda_device']} (compute capability {info['cuda_compute_capability']}), built for {archs}")
EOF
export FAKE_ARCHS
run_step check "$env_log" "$PY" "$work/check.py" "$rehearse"
if [ $step_rc -ne 0 ] && [ $step_rc -ne 125 ]; then
  why=$(grep -E "^(NOT USABLE|AssertionError|fastnn._cuda)" "$env_log" | tail -n 1)
  echo "${why:-the availability check failed: see env.log}"
  record check "STOPPED: ${why:-see env.log}" "$step_s"
  finish $([ $rehearse = 1 ] && echo 1 || echo 2)
fi
verdict check

sanitize() {  # sanitize STEP LOG TOOL-ARGS...: compute-sanitizer over gpu_smoke.py --no-pool, fastnn's kernels only
  local name=$1 log=$2
  shift 2
  if [ -n "$sanitizer" ]; then
    # Kernel names hold the namespace fastnn: cupy's own kernels run uninstrumented.
    local help filt
    help=$("$sanitizer" --help 2>&1)
    if grep -q -- "--kernel-name" <<<"$help"; then filt=(--kernel-name kns=fastnn)
    elif grep -q -- "--kernel-regex" <<<"$help"; then filt=(--kernel-regex kns=fastnn)
    else filt=(--filter kns=fastnn); fi
    run_step "$name" "$log" "$sanitizer" "$@" "${filt[@]}" --error-exitcode 9 --print-limit 50 \
      "$PY" "$repo/bench/gpu_smoke.py" --no-pool
    if [ $step_rc -ne 0 ] && [ $step_rc -ne 9 ] && [ $step_rc -lt 124 ] && [ "$step_s" -lt 10 ]; then
      # A quick refusal may be the kernel filter's syntax on this version: once more, every kernel checked.
      local first=$step_s
      note "$name: compute-sanitizer refused the run with the kernel filter (rc $step_rc); retried without it"
      run_step "$name" "$log" "$sanitizer" "$@" --error-exitcode 9 --print-limit 50 \
        "$PY" "$repo/bench/gpu_smoke.py" --no-pool
      step_s=$((step_s + first))
    fi
    if [ $step_rc -eq 0 ] || [ $step_rc -eq 9 ] || [ $step_rc -ge 124 ]; then
      verdict "$name" "errors found or a wrong result: see $(basename "$log")"
    else  # the tool itself failed (e.g. "Device not supported" under gVisor): no finding about fastnn
      record "$name" "COULD NOT RUN (rc $step_rc): $(grep -m1 -iE 'error|not supported' "$log" | cut -c1-120)" "$step_s"
      incomplete=1
    fi
  elif [ $rehearse = 1 ]; then
    # No sanitizer here: the smoke script must start and stop on the missing GPU, saying so.
    run_step "$name" "$log" "$PY" "$repo/bench/gpu_smoke.py" --no-pool
    if [ $step_rc -ne 0 ] && [ $step_rc -lt 124 ] && grep -q "no usable GPU" "$log"; then
      record "$name" "ok (rehearsal: no sanitizer; gpu_smoke.py --no-pool stops on the missing GPU)" "$step_s"
    else step_rc=1; verdict "$name" "gpu_smoke.py did not stop on the missing GPU"; fi
  else
    record "$name" "COULD NOT RUN: compute-sanitizer not found" 0
    incomplete=1
  fi
}

if [ $more = 0 ]; then
  # ---- tests ------------------------------------------------------------------------------------------------
  # From a copy of tests/ outside the source tree, so that only the installed package can be imported.
  rm -rf "$work/t" && mkdir -p "$work/t" && cp -r "$repo/tests" "$repo/pyproject.toml" "$work/t/"
  # The GPU tests live in each op's test file (marked through gpu_helpers.needs_gpu) and in the files marked
  # as a whole (test_gpu_edge.py, test_cuda_arch.py); -m gpu selects them.
  mapfile -t tests < <(cd "$repo" && grep -lE "needs_gpu|pytestmark = pytest.mark.gpu" tests/test_*.py)
  say "tests: ${#tests[@]} files: ${tests[*]}"
  run_step tests "$out/tests.log" bash -c 'cd t && exec "$0" -m pytest -q -rs --tb=short -p no:cacheprovider -m gpu "$@"' \
    "$PY" "${tests[@]}"
  if [ $step_rc -eq 0 ]; then
    skipped=$(grep -Eo "[0-9]+ skipped" "$out/tests.log" | tail -n 1)
    if [ $rehearse = 1 ]; then
      # Every GPU test must skip, each with the reason; the tests that need no GPU must pass.
      bad=$(grep -E "^SKIPPED" "$out/tests.log" | grep -v "no CUDA device\|GPU tests skipped\|needs a GPU" | head -n 3)
      if [ -z "$skipped" ] || [ -n "$bad" ]; then step_rc=1; verdict tests "rehearsal expected every GPU test to skip with its reason: ${bad:-none skipped}"
      else record tests "ok (rehearsal: $(grep -Eo '[0-9]+ passed' "$out/tests.log" | tail -n 1), $skipped with the reason)" "$step_s"; fi
    elif [ -n "$skipped" ]; then
      step_rc=1; verdict tests "$skipped with a usable GPU: see tests.log"
    else
      record tests "ok ($(grep -Eo '[0-9]+ passed' "$out/tests.log" | tail -n 1))" "$step_s"
    fi
  else
    verdict tests "$(grep -Eo '[0-9]+ failed' "$out/tests.log" | tail -n 1) see tests.log"
  fi

  sanitize memcheck "$out/memcheck.log" --tool memcheck
else
  sanitize racecheck "$out/sanitizers.log" --tool racecheck --racecheck-report hazard
  sanitize initcheck "$out/sanitizers.log" --tool initcheck
  sanitize synccheck "$out/sanitizers.log" --tool synccheck
fi

# ---- bench ------------------------------------------------------------------------------------------------
bench_args=(--out "$out")
[ $more = 0 ] && bench_args+=(--quick)
t_bench=$SECONDS
run_step bench "$out/bench.log" "$PY" "$repo/bench/gpu_bench.py" "${bench_args[@]}"
if [ $rehearse = 1 ]; then
  if [ $step_rc -ne 0 ] && [ $step_rc -lt 124 ] && grep -q "no usable GPU" "$out/bench.log" && (cd "$work" && "$PY" -c "
import importlib.util, sys
spec = importlib.util.spec_from_file_location('gpu_bench', '$repo/bench/gpu_bench.py')
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
sys.exit(m.self_test())") >> "$out/bench.log" 2>&1; then  # cd: python -c puts the working directory first
    step_s=$((SECONDS - t_bench))
    record bench "ok (rehearsal: gpu_bench.py stops on the missing GPU; its checks' tolerances self-tested)" "$step_s"
  else step_rc=1; verdict bench "see bench.log"; fi
else
  verdict bench "a check failed or the bench broke: see bench.log"
fi

# ---- outputs ----------------------------------------------------------------------------------------------
nfiles=$(find "$out" -type f | wc -l)
if [ "$nfiles" -gt 8 ] || find "$out" -mindepth 1 -type d | grep -q .; then
  note "OUTDIR holds $nfiles files or a folder: the device tool returns at most 8 files"
  status=1
fi
if [ $rehearse = 1 ]; then
  expected="summary.md env.log build.log bench.log $([ $more = 1 ] && echo sanitizers.log || echo tests.log memcheck.log)"
  for f in $expected; do
    [ -s "$out/$f" ] || { note "rehearsal: $f is missing or empty"; status=1; }
  done
fi
if [ $status -ne 0 ]; then finish 1; fi
if [ $incomplete -ne 0 ]; then finish 3; fi
finish 0
