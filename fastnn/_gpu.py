"""The CUDA backend: availability (fastnn._cuda, a device, cupy), and the backend object the shared ops
(fastnn/_ops.py) run against for GPU arrays (cupy arrays, torch CUDA tensors, anything with
__cuda_array_interface__ or CUDA DLPack): cupy allocations on the arrays' device and calls into
fastnn._cuda on the caller's current stream, without synchronizing. float32 and float16 (float16
accumulates in float32).

A GPU array when fastnn was built without CUDA, or when cupy or a usable device is missing, is a
RuntimeError that says which. A failed CUDA call is a RuntimeError naming the op.

FASTNN_CUDA_KERNELS=plain (or `plain_kernels()`) runs the plainest kernel of every op: the references the
fast kernels are tested against.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Optional

import numpy as np

from ._attention_grad import attention_backward
from ._cuda_arch import supports as _arch_supports

_DTYPE_CODES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}
_lock = threading.Lock()
_state: dict = {}  # "cuda", "cupy", "reason" (None when usable), "devices" (checked device ids)
_variant = 0 if os.environ.get("FASTNN_CUDA_KERNELS", "").strip().lower() == "plain" else 1


# ---- availability ----------------------------------------------------------------------------------

def _probe() -> None:
    """Imports fastnn._cuda and cupy and looks for a device, once; records why the GPU path is unusable."""
    if "reason" in _state:
        return
    with _lock:
        if "reason" in _state:
            return
        try:
            from . import _cuda
        except ImportError as e:
            _state["reason"] = (f"fastnn was built without CUDA (fastnn._cuda is not importable: {e}); rebuild with "
                                "nvcc available and -Ccmake.define.FASTNN_CUDA=ON")
            return
        _state["cuda"] = _cuda
        count, why = _cuda.device_count()
        if count == 0:
            driver = _cuda.driver_version()
            runtime = _cuda.build_info()["cuda_runtime_version"]
            hint = ("no NVIDIA driver was found (libcuda.so.1)" if driver == 0 else
                    f"driver supports CUDA {driver // 1000}.{driver % 1000 // 10}, fastnn._cuda was built with "
                    f"{runtime // 1000}.{runtime % 1000 // 10}")
            _state["reason"] = f"no CUDA device is usable ({why}; {hint})"
            return
        try:
            import cupy
        except ImportError as e:
            _state["reason"] = f"cupy is not installed or does not import ({e}); pip install cupy-cuda13x"
            return
        _state["cupy"] = cupy
        _state["devices"] = {}
        _state["reason"] = None


def unavailable_reason() -> Optional[str]:
    """None when GPU arrays can be used, else why not (built without CUDA, no device, no cupy)."""
    _probe()
    return _state["reason"]


def cuda_module():
    """fastnn._cuda when it imports, else None (no device needed)."""
    _probe()
    return _state.get("cuda")


def _check_device(dev: int) -> None:
    devices = _state["devices"]
    if dev not in devices:
        props = _state["cuda"].device_properties(dev)
        archs = _state["cuda"].build_info()["cuda_architectures"]
        cc = tuple(props["compute_capability"])
        devices[dev] = None if _arch_supports(archs, cc) else (
            f"GPU {dev} ({props['name']}) has compute capability {cc[0]}.{cc[1]}, but fastnn._cuda was built for "
            f"{archs}; rebuild with -Ccmake.define.CMAKE_CUDA_ARCHITECTURES={cc[0]}{cc[1]}")
    if devices[dev] is not None:
        raise RuntimeError(devices[dev])


def _ready(op: str):
    """(cupy, fastnn._cuda) or a RuntimeError saying why GPU arrays cannot be used."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"{op}: got a GPU array, but {reason}")
    return _state["cupy"], _state["cuda"]


@contextlib.contextmanager
def plain_kernels(enabled: bool = True):
    """Within the block, every op runs its plainest kernel (the reference for the fast ones)."""
    global _variant
    old = _variant
    _variant = 0 if enabled else 1
    try:
        yield
    finally:
        _variant = old


# ---- the CUDA backend ------------------------------------------------------------------------------

class Cuda:
    """The CUDA kernels (fastnn._cuda) on cupy arrays, for one call: the arrays' device (one per call), the
    stream (the caller's library's current one: cupy's, or torch's for torch tensors, made cupy's current
    stream inside scope() so cupy's own copies run on it too), and the compiled entries, which take raw
    pointers, the dtype code and the kernel variant."""

    float_dtypes = (np.dtype(np.float32), np.dtype(np.float16))
    dtype_names = "float32 or float16"
    kind = "GPU"  # the compute device, as messages name it (self.device is the device id)
    fast = False

    def __init__(self, op: str, family=None):
        self.cp, self.cuda = _ready(op)
        self.xp = self.cp
        self.family = family
        self.device = None
        self.device_name = None
        self.written = []

    def claim(self, a, name: str):
        """Checks that `a` (a cupy array) is on the call's device (the first array's)."""
        dev = a.device.id
        if self.device is None:
            _check_device(dev)
            self.device, self.device_name = dev, name
        elif dev != self.device:
            raise ValueError(f"{name}: is on GPU {dev} but {self.device_name} is on GPU {self.device}; "
                             "the arrays of one call must share a device")
        return a

    @contextlib.contextmanager
    def scope(self):
        """Allocations land on the arrays' device; cupy's current stream is the caller's one."""
        with self.cp.cuda.Device(self.device):
            ptr = None if self.family is None else self.family.stream(self.device)
            if ptr is None:
                yield
            else:
                with self.cp.cuda.ExternalStream(ptr):
                    yield

    def wrap(self, r):
        """A result in the caller's array type."""
        return r if self.family is None else self.family.wrap(r, self.written)

    @staticmethod
    def aligned(a) -> bool:
        return True  # cupy allocations are aligned, and cupy views keep whole elements

    @staticmethod
    def writable(a) -> bool:
        return True

    @staticmethod
    def address(a) -> int:
        return a.data.ptr

    def offsets(self, offs: np.ndarray):
        return self.cp.asarray(np.ascontiguousarray(offs, dtype=np.int64))

    @staticmethod
    def half(dtype) -> bool:
        """Whether a dtype is computed on widened float32 copies: never on the GPU (float16 runs natively)."""
        return False

    @staticmethod
    def moment_dtypes(dtype):
        """The moment dtypes accepted for parameters of `dtype`: float32."""
        return (np.dtype(np.float32),)

    @staticmethod
    def moment_dtype(dtype):
        """Adam's moments are float32 on the GPU, also for float16 params (float16 moments underflow)."""
        return np.dtype(np.float32)

    def causal_may_skip(self, arrays) -> bool:
        """Whether causal attention may skip the keys above the diagonal for these operands (called inside
        scope()): when every element is finite, from one sum per operand (non-finite whenever an element is; a
        sum that only overflows answers False, which costs speed, not correctness). The answer waits for the
        device. While the stream is being captured into a CUDA graph no wait is allowed: the kernels then skip
        those keys without looking (a NaN or inf there does not reach the result, unlike PyTorch's)."""
        cp = self.cp
        if cp.cuda.get_current_stream().is_capturing():
            return True
        sums = [cp.sum(a, dtype=cp.float32) for a in arrays]
        return bool(cp.isfinite(cp.stack(sums)).all())

    @staticmethod
    def lse_dtype(dtype):
        """Attention's log-sum-exp is float32 on the GPU, also for float16 inputs (as FlashAttention keeps it:
        a float16 lse shifts whole probability rows in the backward)."""
        return np.dtype(np.float32)

    @property
    def stream(self) -> int:
        return self.cp.cuda.get_current_stream().ptr

    def _args(self, dtype):
        return self.device, _DTYPE_CODES[np.dtype(dtype)]

    # -- the compiled entries --
    def relu(self, x, y):
        self.cuda.relu(*self._args(x.dtype), x.data.ptr, y.data.ptr, x.size, self.stream, _variant)

    def relu_backward(self, g, x, y):
        self.cuda.relu_backward(*self._args(x.dtype), g.data.ptr, x.data.ptr, y.data.ptr, x.size, self.stream,
                                _variant)

    def softmax(self, x, y, log: bool):
        n = x.shape[-1]
        self.cuda.softmax(*self._args(x.dtype), x.data.ptr, y.data.ptr, x.size // n, n, log, self.stream, _variant)

    def softmax_backward(self, g, y, out, log: bool):
        n = y.shape[-1]
        self.cuda.softmax_backward(*self._args(y.dtype), g.data.ptr, y.data.ptr, out.data.ptr, y.size // n, n, log,
                                   self.stream, _variant)

    def cross_entropy(self, logits, labels, grad, scale, ignore_index, rows) -> float:
        n, k = logits.shape
        row_loss = self.cp.zeros(n, self.cp.float32)  # the kernel's per-row losses are float32
        self.cuda.cross_entropy(*self._args(logits.dtype), logits.data.ptr, labels.data.ptr, grad.data.ptr,
                                row_loss.data.ptr, n, k, scale, ignore_index, self.stream, _variant)
        if rows is not None:
            rows[...] = row_loss
        return float(row_loss.sum(dtype=self.cp.float64))

    def gemm(self, a, b, buf, a_off, b_off, M, N, K, ea, eb, bias, relu):
        nb = a_off.size  # the broadcast batch (1 without batch dims)
        if buf.size == 0:
            return
        self.cuda.gemm(*self._args(a.dtype), a.data.ptr, b.data.ptr, buf.data.ptr, a_off.data.ptr, b_off.data.ptr,
                       nb, M, N, K, ea[-2], ea[-1], eb[-2], eb[-1], 0 if bias is None else bias.data.ptr, bool(relu),
                       self.stream, _variant)

    def sdpa(self, at, out, lse, drop):
        mask_kind = 0 if at.mask is None else (1 if at.mask.dtype == np.bool_ else 2)
        self.cuda.sdpa(*self._args(at.dtype), at.q.data.ptr, at.k.data.ptr, at.v.data.ptr, out.data.ptr,
                       at.q_off.data.ptr, at.k_off.data.ptr, at.v_off.data.ptr, at.nbatch, at.L, at.S, at.E, at.Ev,
                       *at.rows, 0 if at.mask is None else at.mask.data.ptr, mask_kind,
                       0 if at.mask is None else at.m_off.data.ptr, at.m_rs, at.m_cs, at.causal, at.scale,
                       0 if lse is None else lse.data.ptr, self.stream, _variant,
                       *((False, 0, 1.0, 0, 0) if drop is None else
                         (True, drop.threshold, drop.keep_scale, drop.seed, drop.offset)))

    def sdpa_backward(self, at, g, o, lse, matmul, drop):
        """No fused CUDA backward yet: composed of the CUDA matmul and cupy element-wise operations (the
        dropout mask regenerated per chunk)."""
        return attention_backward(self.cp, matmul, g, at.q, at.k, at.v, o, lse, at.mask, at.causal, at.scale,
                                  at.group, at.batch, dropout=drop)

    def adam(self, p, g, m, v, vmax, lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt, decoupled, maximize):
        self.cuda.adam(*self._args(p.dtype), p.data.ptr, g.data.ptr, m.data.ptr, v.data.ptr,
                       0 if vmax is None else vmax.data.ptr, p.size, lr, beta1, beta2, eps, weight_decay, step_size,
                       bc2_sqrt, decoupled, maximize, self.stream, _variant)


# ---- device record ---------------------------------------------------------------------------------

def info() -> dict:
    """The CUDA part of fastnn.info(): build record (toolkit, architectures) and, when a device is usable,
    its name and compute capability. Never raises."""
    try:
        cuda = cuda_module()
    except Exception as e:  # pragma: no cover - a broken install
        return {"cuda_built": False, "cuda_error": str(e)}
    if cuda is None:
        return {"cuda_built": False, "cuda_available": False, "cuda_unavailable_reason": unavailable_reason()}
    b = cuda.build_info()
    d = {
        "cuda_built": True,
        "cuda_toolkit": b["cuda_compiler_version"],
        "cuda_runtime_linked": b["cuda_runtime_version"],
        "cuda_architectures": b["cuda_architectures"].split(","),
        "cuda_driver": cuda.driver_version(),
    }
    reason = unavailable_reason()
    d["cuda_available"] = reason is None
    if reason is not None:
        d["cuda_unavailable_reason"] = reason
    count, _ = cuda.device_count()
    if count:
        try:
            props = cuda.device_properties(0)
            d["cuda_device"] = props["name"]
            d["cuda_compute_capability"] = "{}.{}".format(*props["compute_capability"])
            d["cuda_device_count"] = count
        except RuntimeError as e:
            d["cuda_device_error"] = str(e)
    return d


# ---- fastnn.cuda_is_available ----------------------------------------------------------------------

def is_available() -> bool:
    """True when GPU arrays can be used: fastnn._cuda built, a CUDA device present, cupy importable, and
    the current device covered by the compiled architectures."""
    if unavailable_reason() is not None:
        return False
    try:
        _check_device(_state["cupy"].cuda.Device().id)
    except Exception:
        return False
    return True


