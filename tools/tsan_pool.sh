#!/usr/bin/env bash
# ThreadSanitizer run of fastnn's thread pool on its own (tools/tsan_pool.cpp; Python is not instrumented,
# so the pool is checked from C++). Not part of CI. Usage: tools/tsan_pool.sh   (exit status 0 when clean)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${BUILD_DIR:-build/tsan}
mkdir -p "$out"
"${CXX:-c++}" -std=c++17 -O1 -g -fsanitize=thread -Icsrc tools/tsan_pool.cpp csrc/threads.cpp -o "$out/tsan_pool" -pthread
# die_after_fork=0: the fork check runs in a child of a multi-threaded process, which TSan refuses by default.
TSAN_OPTIONS="halt_on_error=1:die_after_fork=0:${TSAN_OPTIONS:-}" "$out/tsan_pool"
