#!/usr/bin/env bash
# Development build: configure + build fastnn._C into build/dev and link it into the source tree, so that
# `python -c "import fastnn"` works from the repository root without reinstalling. Warnings in the CUDA
# module are errors here (FASTNN_CUDA_WERROR=ON), as in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD_DIR:-build/dev}
if [ ! -f "$BUILD/build.ninja" ]; then
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFASTNN_CUDA=${FASTNN_CUDA:-OFF} \
    -DFASTNN_CUDA_WERROR=${FASTNN_CUDA_WERROR:-ON} \
    -Dpybind11_DIR="$(python3 -c 'import pybind11; print(pybind11.get_cmake_dir())')" >/dev/null
fi
cmake --build "$BUILD" -j "${JOBS:-2}"
for f in "$BUILD"/_C*.so; do ln -sf "../$f" "fastnn/$(basename "$f")"; done
