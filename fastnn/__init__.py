"""fastnn: hand-written fast neural-network kernels for NumPy, PyTorch, JAX and CuPy arrays.

Every op runs a C++ kernel (its own thread pool + SIMD, the best ISA path this CPU supports picked at import)
on float32, float64, float16 or bfloat16 CPU arrays (numpy, ml_dtypes' bfloat16, torch CPU tensors, JAX arrays
or any DLPack array; results in the caller's type; the 16-bit dtypes computed in float32) and releases the
GIL while it runs; GPU arrays (cupy, torch CUDA tensors) run the CUDA
kernels (fastnn/_gpu.py). This module only re-exports (fastnn/_ops.py holds the ops). `fastnn.reference` holds the
same functions in plain NumPy (the test oracles). Set FASTNN_CPU_ISA=generic|avx2|avx512|avx512bf16 to force a
lower code path; an unavailable request warns and keeps the best available one.
"""
from __future__ import annotations

import os as _os
import platform as _platform
import warnings as _warnings

import numpy as _np

try:
    from . import _C
except ImportError as _e:  # the source tree without a build
    raise ImportError(
        f"fastnn's compiled extension fastnn._C is missing from {__path__[0]}: if this is the source tree of an "
        "installed fastnn, Python found the source folder first (run from another directory); else install "
        "the package (pip install .), or build it in place with tools/dev_build.sh"
    ) from _e
from ._ops import (
    adam_update,
    cpu_isa,
    cross_entropy,
    get_num_threads,
    linear,
    linear_backward,
    log_softmax,
    log_softmax_backward,
    matmul,
    relu,
    relu_backward,
    scaled_dot_product_attention,
    scaled_dot_product_attention_backward,
    set_cpu_isa,
    set_num_threads,
    softmax,
    softmax_backward,
)
from .train import Adam
from . import _gpu

__version__: str = _C.__version__


def cuda_is_available() -> bool:
    """True when fastnn's CUDA kernels can run here: fastnn._cuda was built, a CUDA device and driver are
    present, cupy imports, and the compiled architectures cover the current device. Never raises; the
    first call imports fastnn._cuda and cupy. `info()["cuda_unavailable_reason"]` says why not."""
    return _gpu.is_available()


__all__ = [
    "__version__", "info", "matmul", "linear", "relu", "relu_backward", "softmax", "log_softmax",
    "softmax_backward", "log_softmax_backward", "cross_entropy", "scaled_dot_product_attention", "scaled_dot_product_attention_backward", "adam_update",
    "linear_backward", "Adam", "cuda_is_available", "set_num_threads", "get_num_threads", "cpu_isa", "set_cpu_isa",
]


def info() -> dict:
    """The build and runtime record: version, compiler and flags, the thread pool and thread count, the CPU
    ISA paths compiled, supported here and in use; CUDA: whether fastnn._cuda was built, its toolkit and
    architectures, whether it is usable here (else why not) and, when a device exists, its name and compute capability (this imports fastnn._cuda, and cupy when a device exists)."""
    b = _C.build_info()
    return {
        "version": __version__,
        "compiler": b["compiler"],
        "build_type": b["build_type"],
        "cxx_flags": b["cxx_flags"],
        "thread_pool": b["thread_pool"],
        "num_threads": get_num_threads(),
        "cpu_isa": cpu_isa(),
        "cpu_isa_supported": _C.isa_supported().split(","),
        "cpu_isa_compiled": b["cpu_isa_compiled"].split(","),
        "cpu_isa_flags": b["cpu_isa_flags"],
        **_gpu.info(),
        "python": _platform.python_version(),
        "numpy": _np.__version__,
        "machine": _platform.machine(),
    }


def _apply_isa_env() -> None:
    want = _os.environ.get("FASTNN_CPU_ISA", "").strip()
    if not want:
        return
    try:
        set_cpu_isa(want)
    except ValueError:
        _warnings.warn(
            f"FASTNN_CPU_ISA={want!r} is not available on this machine/build (available: "
            f"{_C.isa_supported()}); using {cpu_isa()!r}",
            RuntimeWarning,
            stacklevel=2,
        )


_apply_isa_env()

from . import _threadpoolctl  # noqa: E402

_threadpoolctl.install()  # threadpoolctl lists and limits fastnn's pool (registered when it is imported)
del annotations  # from the __future__ import: not part of the API
