"""fastnn: hand-written fast neural-network kernels for NumPy arrays.

Every op runs a C++ kernel (OpenMP threads + SIMD, the best ISA path this CPU supports picked at import)
on float32 or float64 numpy arrays and releases the GIL while it runs. `fastnn.reference` holds the
same functions in plain NumPy (the test oracles). Set FASTNN_CPU_ISA=generic|avx2|avx512 to force a
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
        "fastnn's compiled extension fastnn._C is missing: install the package (pip install .) and import it "
        "from outside the source tree, or build it in place with tools/dev_build.sh"
    ) from _e
from ._ops import (
    adam_update,
    cpu_isa,
    cross_entropy,
    get_num_threads,
    linear,
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
from .train import Adam, linear_backward
from . import _runtime

__version__: str = _C.__version__

from . import _gpu

# GPU arrays (anything with __cuda_array_interface__, e.g. cupy) go to the CUDA kernels (fastnn/_gpu.py);
# numpy arrays to the CPU kernels. fastnn._cuda and cupy are imported only when a GPU array arrives.
matmul = _gpu.dispatch(matmul, _gpu.matmul)
linear = _gpu.dispatch(linear, _gpu.linear)
relu = _gpu.dispatch(relu, _gpu.relu)
relu_backward = _gpu.dispatch(relu_backward, _gpu.relu_backward)
softmax = _gpu.dispatch(softmax, _gpu.softmax)
log_softmax = _gpu.dispatch(log_softmax, _gpu.log_softmax)
softmax_backward = _gpu.dispatch(softmax_backward, _gpu.softmax_backward)
log_softmax_backward = _gpu.dispatch(log_softmax_backward, _gpu.log_softmax_backward)
cross_entropy = _gpu.dispatch(cross_entropy, _gpu.cross_entropy)
scaled_dot_product_attention = _gpu.dispatch(scaled_dot_product_attention, _gpu.scaled_dot_product_attention)
scaled_dot_product_attention_backward = _gpu.dispatch(scaled_dot_product_attention_backward,
                                                      _gpu.scaled_dot_product_attention_backward)
adam_update = _gpu.dispatch(adam_update, _gpu.adam_update)
linear_backward = _gpu.dispatch(linear_backward, _gpu.linear_backward)


# The most frequent calls go first through a compiled fast path for plain arguments (numpy arrays of one
# float dtype, C-contiguous, aligned, out= None or directly writable), which returns None for anything
# else; the general path above then runs. A call on tiny arrays so costs less than NumPy's.
def _fast(public, fast_call):
    fast_call.__doc__, fast_call.__wrapped__ = public.__doc__, public.__wrapped__
    fast_call.__name__ = fast_call.__qualname__ = public.__name__
    fast_call.cpu, fast_call.gpu = public.cpu, public.gpu
    return fast_call


def _fast_ops(ndarray=_np.ndarray, matmul2d=_C.matmul2d, relu_fast=_C.relu_fast,
              relu_backward_fast=_C.relu_backward_fast, softmax_fast=_C.softmax_fast, linear_fast=_C.linear_fast,
              cross_entropy_fast=_C.cross_entropy_fast, matmul_=matmul, relu_=relu, relu_backward_=relu_backward,
              softmax_=softmax, log_softmax_=log_softmax, linear_=linear, cross_entropy_=cross_entropy):
    def matmul(a, b, *, out=None):
        if type(a) is ndarray and type(b) is ndarray:
            c = matmul2d(a, b, out)
            if c is not None:
                return c
        return matmul_(a, b, out=out)

    def relu(x, *, out=None):
        if type(x) is ndarray:
            y = relu_fast(x, out)
            if y is not None:
                return y
        return relu_(x, out=out)

    def relu_backward(grad_output, x, *, out=None):
        if type(x) is ndarray and type(grad_output) is ndarray:
            y = relu_backward_fast(grad_output, x, out)
            if y is not None:
                return y
        return relu_backward_(grad_output, x, out=out)

    def softmax(x, axis=-1, *, out=None):
        if type(x) is ndarray:
            y = softmax_fast(x, axis, out, False)
            if y is not None:
                return y
        return softmax_(x, axis, out=out)

    def log_softmax(x, axis=-1, *, out=None):
        if type(x) is ndarray:
            y = softmax_fast(x, axis, out, True)
            if y is not None:
                return y
        return log_softmax_(x, axis, out=out)

    def linear(x, weight, bias=None, *, activation=None):
        if type(x) is ndarray and type(weight) is ndarray:
            y = linear_fast(x, weight, bias, activation)
            if y is not None:
                return y
        return linear_(x, weight, bias, activation=activation)

    def cross_entropy(logits, labels, *, reduction="mean", ignore_index=-100):
        if type(logits) is ndarray:
            r = cross_entropy_fast(logits, labels, reduction, ignore_index)
            if r is not None:
                return r
        return cross_entropy_(logits, labels, reduction=reduction, ignore_index=ignore_index)

    return (_fast(matmul_, matmul), _fast(relu_, relu), _fast(relu_backward_, relu_backward),
            _fast(softmax_, softmax), _fast(log_softmax_, log_softmax), _fast(linear_, linear),
            _fast(cross_entropy_, cross_entropy))


matmul, relu, relu_backward, softmax, log_softmax, linear, cross_entropy = _fast_ops()


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
    """The build and runtime record: version, compiler and flags, OpenMP (and the runtime library loaded for
    it) and thread count, the CPU ISA paths compiled, supported here and in use; CUDA: whether fastnn._cuda
    was built, its toolkit and architectures, whether it is usable here (else why not) and, when a device
    exists, its name and compute capability (this imports fastnn._cuda, and cupy when a device exists)."""
    b = _C.build_info()
    return {
        "version": __version__,
        "compiler": b["compiler"],
        "build_type": b["build_type"],
        "cxx_flags": b["cxx_flags"],
        "openmp": b["openmp"],
        "openmp_runtime": _runtime.openmp_runtime(_C.__file__) if b["openmp"] else None,
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
