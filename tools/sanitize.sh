#!/usr/bin/env bash
# Hardening run: builds fastnn._C with AddressSanitizer + UndefinedBehaviorSanitizer into build/asan
# (-DFASTNN_SANITIZE=ON) and runs the test suite against it. Python itself is not instrumented, so the
# sanitizer runtimes are preloaded (LD_PRELOAD). The tests run from a staging copy (fastnn/ with the
# sanitized module, tests/, conftest.py, pyproject.toml), so the in-place dev build is never picked up.
# Usage: tools/sanitize.sh [pytest args...]   (default: the whole suite; exit status non-zero on any report)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
BUILD=${BUILD_DIR:-build/asan}
if [ ! -f "$BUILD/build.ninja" ]; then
  # RelWithDebInfo: line numbers in reports and no stripping / LTO of the module (pybind11 does both in
  # Release); the kernels keep their -O3 from FASTNN_OPT_FLAGS.
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFASTNN_SANITIZE=ON -DFASTNN_CUDA=OFF \
    -Dpybind11_DIR="$(python3 -c 'import pybind11; print(pybind11.get_cmake_dir())')" >/dev/null
fi
cmake --build "$BUILD" -j "${JOBS:-2}"

stage=$(mktemp -d "${TMPDIR:-/tmp}/fastnn-asan.XXXXXX")
trap 'rm -rf "$stage"' EXIT
cp -r fastnn tests conftest.py pyproject.toml "$stage/"
for d in examples bench; do [ -d "$d" ] && cp -r "$d" "$stage/"; done
rm -f "$stage"/fastnn/_C*.so
cp "$BUILD"/_C*.so "$stage/fastnn/"
find "$stage" -name __pycache__ -prune -exec rm -rf {} +

asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
for lib in "$asan" "$ubsan"; do
  [ -f "$lib" ] || { echo "sanitize: $lib not found (gcc -print-file-name)" >&2; exit 2; }
done
log="$root/$BUILD/sanitize.log"
reports="$root/$BUILD/reports"  # one file per process with a report (pytest's capture would swallow stderr)
rm -rf "$reports" && mkdir -p "$reports"
# detect_leaks=0: CPython's own allocations at exit are not ours (tests/test_leaks.py checks RSS instead).
# allocator_may_return_null=1: an impossible allocation returns NULL (-> MemoryError), as without ASan.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:allocator_may_return_null=1:log_path=$reports/asan:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$reports/ubsan:${UBSAN_OPTIONS:-}"
export FASTNN_SANITIZED=1  # tests that cannot run under ASan (address-space limits, huge arrays) skip
# Preflight: the staged, instrumented module is the one imported, with the runtime active.
(cd "$stage" && LD_PRELOAD="$asan $ubsan" PYTHONPATH="$stage" python3 -c "
import ctypes, fastnn
assert fastnn._C.__file__.startswith('$stage'), fastnn._C.__file__
assert hasattr(ctypes.CDLL(None), '__asan_init'), 'ASan runtime not loaded'
print('sanitize: testing', fastnn._C.__file__, '(ISA', fastnn.cpu_isa() + ')')")
set +e
(cd "$stage" && LD_PRELOAD="$asan $ubsan" PYTHONPATH="$stage" python3 -m pytest -q -p no:cacheprovider "$@") 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# Files holding only warnings (e.g. "failed to allocate" from the MemoryError tests) are not reports.
nreports=$( (grep -lE 'ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer' "$reports"/* 2>/dev/null || true) | wc -l)
if [ "$rc" -eq 0 ] && [ "$nreports" -eq 0 ]; then
  echo "sanitize: CLEAN (ASan + UBSan, $(grep -oE '[0-9]+ passed' "$log" | tail -1); log $log)"
else
  echo "sanitize: FAILED (pytest exit $rc, $nreports sanitizer report(s) in $reports; log $log)" >&2
  for f in $(grep -lE 'ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer' "$reports"/* 2>/dev/null || true); do
    echo "== $f"; grep -vE 'WARNING: AddressSanitizer failed to allocate' "$f" | head -40
  done >&2
  exit $(( rc ? rc : 1 ))
fi
