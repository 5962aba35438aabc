"""The fastnn ops on GPU arrays: argument checks, cupy allocations and calls into fastnn._cuda.

fastnn/__init__.py sends a call here when one of its array arguments exposes `__cuda_array_interface__`
(cupy arrays, or anything cupy.asarray accepts without a copy). Same signatures as the CPU functions;
float32 and float16 (float16 accumulates in float32); outputs are new cupy arrays on the inputs' device,
and every kernel is launched on cupy's current stream without synchronizing (except cross_entropy, which
checks its labels and returns the loss as a Python float, as on the CPU).

Errors: a host (numpy) array mixed with GPU arrays is a TypeError naming the argument; a bad dtype is a
TypeError, a bad shape or value a ValueError, as on the CPU. A GPU array when fastnn was built without
CUDA, or when cupy or a usable device is missing, is a RuntimeError that says which. A failed CUDA call
is a RuntimeError naming the op.

FASTNN_CUDA_KERNELS=plain (or `plain_kernels()`) runs the plainest kernel of every op: the references the
fast kernels are tested against.
"""
from __future__ import annotations

import contextlib
import functools
import math
import operator
import os
import threading
from typing import Optional

import numpy as np

from ._attention_grad import attention_backward, reduce_grad
from ._dropout import backward_dropout, check_dropout_sizes, forward_dropout
from ._ops import _axis, _batch_offsets, _broadcast_batch, _flag, _real, adam_scalars, linear_shapes
from .train import linear_backward_shapes

_DTYPE_CODES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}
_lock = threading.Lock()
_state: dict = {}  # "cuda", "cupy", "reason" (None when usable), "devices" (checked device ids)
_variant = 0 if os.environ.get("FASTNN_CUDA_KERNELS", "").strip().lower() == "plain" else 1


# ---- availability ----------------------------------------------------------------------------------

def _arch_supports(archs: str, cc) -> bool:
    """Whether code built for `archs` ("80-real,90-virtual,...") runs on compute capability cc=(major, minor):
    machine code runs on the same major version with an equal or higher minor; PTX is JIT-compiled for
    any newer device."""
    major, minor = cc
    for item in archs.split(","):
        item = item.strip()
        if not item:
            continue
        num, _, kind = item.partition("-")
        try:
            n = int(num)
        except ValueError:
            continue
        a_major, a_minor = n // 10, n % 10
        if kind in ("", "real") and a_major == major and a_minor <= minor:
            return True
        if kind in ("", "virtual") and (a_major, a_minor) <= (major, minor):
            return True
    return False


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


# ---- argument checks -----------------------------------------------------------------------------

class _Call:
    """One op call: converts and checks its arrays (one device, GPU memory only), and holds the device,
    the stream and the dtype code passed to the kernels."""

    def __init__(self, op: str):
        self.op = op
        self.cp, self.cuda = _ready(op)
        self.device = None
        self.device_name = None

    def array(self, x, name: str, dtypes=("float32", "float16")):
        cp = self.cp
        if isinstance(x, cp.ndarray):
            a = x
        elif hasattr(x, "__cuda_array_interface__"):
            a = cp.asarray(x)
        elif isinstance(x, np.ndarray):
            raise TypeError(f"{name}: got a numpy.ndarray (host memory) in a call with GPU arrays; pass every array "
                            "of one call on the same side (cupy.asarray(x) to move it to the GPU)")
        else:
            raise TypeError(f"{name}: expected a GPU array (cupy.ndarray or __cuda_array_interface__), got "
                            f"{type(x).__name__}")
        if dtypes is not None and a.dtype.name not in dtypes:
            raise TypeError(f"{name}: expected a {' or '.join(dtypes)} GPU array, got dtype {a.dtype}")
        dev = a.device.id
        if self.device is None:
            _check_device(dev)
            self.device, self.device_name = dev, name
        elif dev != self.device:
            raise ValueError(f"{name}: is on GPU {dev} but {self.device_name} is on GPU {self.device}; "
                             "the arrays of one call must share a device")
        return a

    def same_dtype(self, ref, ref_name: str, x, name: str) -> None:
        if x.dtype != ref.dtype:
            raise TypeError(f"{name}: dtype {x.dtype} does not match {ref_name}'s dtype {ref.dtype}; "
                            "operands of one op must share one dtype")

    def out(self, out, shape, dtype, name: str = "out"):
        out = self.array(out, name)
        if out.dtype != dtype:
            raise TypeError(f"{name}: expected dtype {dtype}, got {out.dtype}")
        if out.shape != tuple(shape):
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got {out.shape}")
        if out.size > 1 and any(s == 0 and n > 1 for s, n in zip(out.strides, out.shape)):
            raise ValueError(f"{name}: has a zero stride (several elements share memory); pass a real array")
        return out

    def scope(self):
        """The device context for allocations (outputs land on the inputs' device)."""
        return self.cp.cuda.Device(self.device)

    @property
    def stream(self) -> int:
        return self.cp.cuda.get_current_stream().ptr

    @staticmethod
    def code(dtype) -> int:
        return _DTYPE_CODES[np.dtype(dtype)]

    def offsets(self, offs: np.ndarray):
        return self.cp.asarray(np.ascontiguousarray(offs, dtype=np.int64))


def _same_view(a, b) -> bool:
    return a.data.ptr == b.data.ptr and a.shape == b.shape and a.strides == b.strides


def _writable_target(c: _Call, out, inputs, in_place_ok=()):
    """`out` itself when the kernel can write it directly (C-contiguous, no partial overlap with an input;
    exact same view as one of in_place_ok is fine for element-wise ops), else None."""
    if not out.flags.c_contiguous:
        return None
    for x in inputs:
        if c.cp.may_share_memory(out, x) and not any(x is y and _same_view(out, y) for y in in_place_ok):
            return None
    return out


def _commit(out, buf):
    if out is None or buf is out:
        return buf
    out[...] = buf
    return out


# ---- relu ------------------------------------------------------------------------------------------

def relu(x, *, out=None):
    """max(x, 0) element-wise on the GPU (NaN kept). x: float32/float16; out: optional GPU array (may be x)."""
    c = _Call("relu")
    x = c.array(x, "x")
    if out is not None:
        out = c.out(out, x.shape, x.dtype)
    with c.scope():
        xc = x if x.flags.c_contiguous else c.cp.ascontiguousarray(x)
        dst = None if out is None else _writable_target(c, out, (x,), (x,))
        buf = dst if dst is not None else c.cp.empty(x.shape, x.dtype)
        c.cuda.relu(c.device, c.code(x.dtype), xc.data.ptr, buf.data.ptr, x.size, c.stream, _variant)
        return _commit(out, buf)


def relu_backward(grad_output, x, *, out=None):
    """grad_output where x > 0, else 0, on the GPU. Same shape and dtype; out: optional GPU array."""
    c = _Call("relu_backward")
    g = c.array(grad_output, "grad_output")
    x = c.array(x, "x")
    c.same_dtype(x, "x", g, "grad_output")
    if g.shape != x.shape:
        raise ValueError(f"grad_output: shape {g.shape} does not match x's shape {x.shape}")
    if out is not None:
        out = c.out(out, x.shape, x.dtype)
    with c.scope():
        gc, xc = c.cp.ascontiguousarray(g), c.cp.ascontiguousarray(x)
        dst = None if out is None else _writable_target(c, out, (g, x), (g, x))
        buf = dst if dst is not None else c.cp.empty(x.shape, x.dtype)
        c.cuda.relu_backward(c.device, c.code(x.dtype), gc.data.ptr, xc.data.ptr, buf.data.ptr, x.size, c.stream,
                             _variant)
        return _commit(out, buf)


# ---- softmax family --------------------------------------------------------------------------------

def _rows_last(c: _Call, x, axis: int):
    return c.cp.ascontiguousarray(c.cp.moveaxis(x, axis, -1) if axis != x.ndim - 1 else x)


def _softmax(x, axis, out, log: bool, name: str):
    c = _Call(name)
    x = c.array(x, "x")
    if x.ndim == 0:
        raise ValueError(f"{name}: x must have at least 1 dimension, got a 0-d array")
    axis = _axis(axis, x.ndim)
    if out is not None:
        out = c.out(out, x.shape, x.dtype)
    with c.scope():
        if x.size == 0:
            return out if out is not None else c.cp.empty(x.shape, x.dtype)
        xr = _rows_last(c, x, axis)
        last = axis == x.ndim - 1
        dst = _writable_target(c, out, (x,), (x,)) if (out is not None and last) else None
        buf = dst if dst is not None else c.cp.empty(xr.shape, x.dtype)
        c.cuda.softmax(c.device, c.code(x.dtype), xr.data.ptr, buf.data.ptr, xr.size // xr.shape[-1], xr.shape[-1],
                       log, c.stream, _variant)
        res = buf if last else c.cp.moveaxis(buf, -1, axis)
        return _commit(out, res)


def softmax(x, axis=-1, *, out=None):
    """exp(x - max) / sum(exp(x - max)) along `axis` on the GPU; float32/float16; out may be x."""
    return _softmax(x, axis, out, False, "softmax")


def log_softmax(x, axis=-1, *, out=None):
    """x - max - log(sum(exp(x - max))) along `axis` on the GPU. Same arguments as softmax."""
    return _softmax(x, axis, out, True, "log_softmax")


def _softmax_backward(grad_output, output, axis, log: bool, name: str):
    c = _Call(name)
    g = c.array(grad_output, "grad_output")
    y = c.array(output, "output")
    c.same_dtype(y, "output", g, "grad_output")
    if g.shape != y.shape:
        raise ValueError(f"grad_output: shape {g.shape} does not match output's shape {y.shape}")
    if y.ndim == 0:
        raise ValueError(f"{name}: output must have at least 1 dimension, got a 0-d array")
    axis = _axis(axis, y.ndim)
    with c.scope():
        if y.size == 0:
            return c.cp.empty(y.shape, y.dtype)
        gr, yr = _rows_last(c, g, axis), _rows_last(c, y, axis)
        buf = c.cp.empty(yr.shape, y.dtype)
        c.cuda.softmax_backward(c.device, c.code(y.dtype), gr.data.ptr, yr.data.ptr, buf.data.ptr,
                                yr.size // yr.shape[-1], yr.shape[-1], log, c.stream, _variant)
        return c.cp.moveaxis(buf, -1, axis) if axis != y.ndim - 1 else buf


def softmax_backward(grad_output, output, axis=-1):
    """y * (g - sum(g * y)) along `axis` (y = softmax output) on the GPU."""
    return _softmax_backward(grad_output, output, axis, False, "softmax_backward")


def log_softmax_backward(grad_output, output, axis=-1):
    """g - exp(y) * sum(g) along `axis` (y = log_softmax output) on the GPU."""
    return _softmax_backward(grad_output, output, axis, True, "log_softmax_backward")


def cross_entropy(logits, labels):
    """(loss, grad) of the mean NLL over the N rows of (N, C) GPU logits; labels int32/int64 GPU array.

    Synchronizes: labels are checked to lie in [0, C) (ValueError otherwise) and the loss is returned as a
    Python float, as on the CPU; grad (N, C) = (softmax - onehot) / N stays on the GPU.
    """
    c = _Call("cross_entropy")
    logits = c.array(logits, "logits")
    labels = c.array(labels, "labels", dtypes=("int32", "int64"))
    if logits.ndim != 2:
        raise ValueError(f"logits: expected 2 dimensions (N, C), got shape {logits.shape}")
    n, k = logits.shape
    if labels.shape != (n,):
        raise ValueError(f"labels: expected shape ({n},) to match logits {logits.shape}, got {labels.shape}")
    with c.scope():
        grad = c.cp.empty((n, k), logits.dtype)
        if n == 0:
            return float("nan"), grad
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= k:
            bad = lo if lo < 0 else hi
            raise ValueError(f"labels: value {bad} is out of range; expected 0 <= label < {k}")
        lab = c.cp.ascontiguousarray(labels, dtype=c.cp.int64)
        xl = c.cp.ascontiguousarray(logits)
        row_loss = c.cp.empty(n, c.cp.float32)
        c.cuda.cross_entropy(c.device, c.code(logits.dtype), xl.data.ptr, lab.data.ptr, grad.data.ptr,
                             row_loss.data.ptr, n, k, 1.0 / n, c.stream, _variant)
        return float(row_loss.sum(dtype=c.cp.float64)) / n, grad


# ---- matmul and linear -----------------------------------------------------------------------------

def _estrides(c: _Call, a):
    """(a, element strides); copies `a` if a stride is not a multiple of the item size."""
    if any(s % a.itemsize for s in a.strides):
        a = c.cp.ascontiguousarray(a)
    return a, tuple(s // a.itemsize for s in a.strides)


def _gemm(c: _Call, a, b, buf, batch_shape, bias=None, relu=False) -> None:
    """buf (batch..., M, N contiguous) = a @ b (+ bias) (relu); a (..., M, K), b (..., K, N), any strides."""
    a, ea = _estrides(c, a)
    b, eb = _estrides(c, b)
    M, K = a.shape[-2:]
    N = b.shape[-1]
    nb = math.prod(batch_shape)
    if nb == 0 or M == 0 or N == 0:
        return
    a_off = c.offsets(_batch_offsets(a, ea, 2, batch_shape))
    b_off = c.offsets(_batch_offsets(b, eb, 2, batch_shape))
    c.cuda.gemm(c.device, c.code(a.dtype), a.data.ptr, b.data.ptr, buf.data.ptr, a_off.data.ptr, b_off.data.ptr,
                nb, M, N, K, ea[-2], ea[-1], eb[-2], eb[-1], 0 if bias is None else bias.data.ptr, bool(relu),
                c.stream, _variant)


def matmul(a, b, *, out=None):
    """numpy.matmul semantics on GPU arrays (float32: exact FP32 FMAs, no TF32; float16: tensor cores with
    float32 accumulation). 1-D operands promoted, batch dims broadcast, any strides; out: optional GPU array."""
    c = _Call("matmul")
    a = c.array(a, "a")
    b = c.array(b, "b")
    c.same_dtype(a, "a", b, "b")
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: 0-d operands are not allowed (a.ndim={a.ndim}, b.ndim={b.ndim}); "
                         "use multiplication for scalars")
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    if a2.shape[-1] != b2.shape[-2]:
        raise ValueError(f"matmul: a has shape {a.shape} and b has shape {b.shape}: the inner dimensions "
                         f"{a2.shape[-1]} and {b2.shape[-2]} must match")
    batch = _broadcast_batch([a2.shape[:-2], b2.shape[:-2]], ["a", "b"])
    M, N = a2.shape[-2], b2.shape[-1]
    shape = batch + ((M,) if a.ndim > 1 else ()) + ((N,) if b.ndim > 1 else ())
    if out is not None:
        out = c.out(out, shape, a.dtype)
    with c.scope():
        dst = None if out is None else _writable_target(c, out, (a, b))
        buf = dst if dst is not None else c.cp.empty(shape, a.dtype)
        _gemm(c, a2, b2, buf.reshape(batch + (M, N)), batch)
        return _commit(out, buf)


def linear(x, weight, bias=None, *, activation=None):
    """activation(x @ weight + bias) on the GPU, bias and relu fused into the product's store.
    x (..., in), weight (in, out), bias (out,) or None, activation None or "relu"."""
    c = _Call("linear")
    x = c.array(x, "x")
    weight = c.array(weight, "weight")
    c.same_dtype(x, "x", weight, "weight")
    if activation not in (None, "relu"):
        raise ValueError(f"activation: expected None or 'relu', got {activation!r}")
    n_in, n_out = linear_shapes(x, weight)
    if bias is not None:
        bias = c.array(bias, "bias")
        c.same_dtype(x, "x", bias, "bias")
        if bias.shape != (n_out,):
            raise ValueError(f"bias: expected shape ({n_out},), got {bias.shape}")
    with c.scope():
        if bias is not None:
            bias = c.cp.ascontiguousarray(bias)
        x2 = x.reshape(math.prod(x.shape[:-1]), n_in)
        y = c.cp.empty((x2.shape[0], n_out), x.dtype)
        _gemm(c, x2, weight, y, (), bias, activation == "relu")
        return y.reshape(x.shape[:-1] + (n_out,))


def linear_backward(grad_output, x, weight, *, bias=True, x_grad=True):
    """Gradients of y = x @ weight + bias on GPU arrays, with the CPU function's arguments and rules:
    (grad_x or None, grad_weight, grad_bias or None). Both products run on fastnn's CUDA matmul reading the
    transposed views in place; grad_bias is summed in float32."""
    c = _Call("linear_backward")
    g = c.array(grad_output, "grad_output")
    x = c.array(x, "x")
    weight = c.array(weight, "weight")
    c.same_dtype(x, "x", weight, "weight")
    c.same_dtype(x, "x", g, "grad_output")
    bias = _flag(bias, "bias")
    x_grad = _flag(x_grad, "x_grad")
    rows, n_in, n_out = linear_backward_shapes(g, x, weight)
    with c.scope():
        x2 = x.reshape(rows, n_in)
        g2 = g.reshape(rows, n_out)
        grad_x = matmul(g2, weight.T).reshape(x.shape) if x_grad else None
        grad_w = matmul(x2.T, g2)
        grad_b = g2.sum(axis=0, dtype=c.cp.float32).astype(x.dtype) if bias else None
        return grad_x, grad_w, grad_b


# ---- attention -------------------------------------------------------------------------------------

def _rows_unit(c: _Call, a):
    """a with unit stride in its last dim and non-negative strides elsewhere (copied only if needed)."""
    if a.strides[-1] != a.itemsize or any(s < 0 for s in a.strides) or any(s % a.itemsize for s in a.strides):
        return c.cp.ascontiguousarray(a)
    return a


def _attention_operands(c: _Call, query, key, value, attn_mask, is_causal, scale, enable_gqa):
    """The checked attention operands shared by the forward and the backward: (q, k, v, mask, L, S, E, Ev,
    scale, group, batch, is_causal) with the CPU functions' rules."""
    q = c.array(query, "query")
    k = c.array(key, "key")
    v = c.array(value, "value")
    c.same_dtype(q, "query", k, "key")
    c.same_dtype(q, "query", v, "value")
    for a, n in ((q, "query"), (k, "key"), (v, "value")):
        if a.ndim < 2:
            raise ValueError(f"{n}: expected at least 2 dimensions (..., length, features), got shape {a.shape}")
    is_causal = _flag(is_causal, "is_causal")
    enable_gqa = _flag(enable_gqa, "enable_gqa")
    L, E = q.shape[-2:]
    S, Ek = k.shape[-2:]
    Sv, Ev = v.shape[-2:]
    if Ek != E:
        raise ValueError(f"key: feature dimension {Ek} does not match query's {E} (query {q.shape}, key {k.shape})")
    if Sv != S:
        raise ValueError(f"value: length {Sv} does not match key's length {S} (key {k.shape}, value {v.shape})")
    if attn_mask is not None and is_causal:
        raise ValueError("attn_mask and is_causal: pass one or the other, not both")
    scale = (1.0 / math.sqrt(E) if E > 0 else 1.0) if scale is None else _real(scale, "scale")
    group = None
    qb, kb, vb = q.shape[:-2], k.shape[:-2], v.shape[:-2]
    if enable_gqa:
        if q.ndim < 3 or k.ndim < 3 or v.ndim < 3:
            raise ValueError("enable_gqa: query, key and value need a head dimension (..., H, L, E)")
        hq, hk, hv = q.shape[-3], k.shape[-3], v.shape[-3]
        if hk != hv:
            raise ValueError(f"enable_gqa: key has {hk} heads but value has {hv}")
        if hk == 0 or hq % hk:
            raise ValueError(f"enable_gqa: query heads ({hq}) must be a multiple of key/value heads ({hk})")
        group = hq // hk
        kb = kb[:-1] + (hq,)
        vb = vb[:-1] + (hq,)
    batch = _broadcast_batch([qb, kb, vb], ["query", "key", "value"])
    if (not enable_gqa and q.ndim >= 3 and k.ndim >= 3 and q.shape[-3] != k.shape[-3]
            and 1 not in (q.shape[-3], k.shape[-3])):
        raise ValueError(f"query has {q.shape[-3]} heads and key has {k.shape[-3]}: pass enable_gqa=True "
                         "for grouped-query attention")
    mask = None
    if attn_mask is not None:
        mask = c.array(attn_mask, "attn_mask", dtypes=None)
        if mask.dtype != np.bool_ and mask.dtype != q.dtype:
            raise TypeError(f"attn_mask: expected dtype bool or {q.dtype} (the query's), got {mask.dtype}")
        try:
            np.broadcast_shapes(mask.shape, batch + (L, S))
        except ValueError:
            raise ValueError(f"attn_mask: shape {mask.shape} does not broadcast to {batch + (L, S)}") from None
    return q, k, v, mask, L, S, E, Ev, scale, group, batch, is_causal


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False, *, return_lse=False, rng=None):
    """softmax(query @ key^T * scale + mask) @ value on GPU arrays, PyTorch's semantics (as the CPU function:
    bool or additive masks broadcast to (..., L, S), is_causal aligned top-left, enable_gqa, scale default
    1/sqrt(E), a row with no allowed key gives zeros; dropout_p, rng and the (out, lse, rng_state) result
    too, with the CPU's mask bit for bit). FlashAttention-2-style kernel: float16 on tensor cores; head dims
    too large for the device's shared memory fall back to a plain kernel."""
    c = _Call("scaled_dot_product_attention")
    drop = forward_dropout(dropout_p, rng)
    return_lse = _flag(return_lse, "return_lse")
    q, k, v, mask, L, S, E, Ev, scale, group, batch, is_causal = _attention_operands(
        c, query, key, value, attn_mask, is_causal, scale, enable_gqa)
    nbatch = math.prod(batch)
    if drop is not None:
        check_dropout_sizes(nbatch, L, S)

    def result(out, lse):
        if not return_lse:
            return out
        return (out, lse) if drop is None else (out, lse, drop.rng_state)

    with c.scope():
        cp = c.cp
        out = cp.empty(batch + (L, Ev), q.dtype)
        lse = cp.empty(batch + (L,), q.dtype) if return_lse else None
        if nbatch == 0 or L == 0:
            return result(out, lse)

        def offsets(a, grouped):
            a, ea = _estrides(c, a)
            nb = a.ndim - 2
            offs = _batch_offsets(a, ea, 2, batch, (nb - 1, group) if (grouped and group) else None)
            if offs.size != nbatch:
                offs = np.broadcast_to(offs, (nbatch,))
            return a, ea, c.offsets(offs)

        q, eq, q_off = offsets(_rows_unit(c, q), False)
        k, ek, k_off = offsets(_rows_unit(c, k), True)
        v, ev, v_off = offsets(_rows_unit(c, v), True)
        mask_kind, m_ptr, m_off, m_rs, m_cs = 0, 0, None, 0, 0
        if mask is not None:
            try:
                mfull = cp.broadcast_to(mask, batch + (L, S))
            except ValueError:
                raise ValueError(f"attn_mask: shape {mask.shape} does not broadcast to {batch + (L, S)}") from None
            mfull, em = _estrides(c, mfull)
            if any(s < 0 for s in em):
                mfull = cp.ascontiguousarray(mfull)
                mfull, em = _estrides(c, mfull)
            mask_kind = 1 if mfull.dtype == np.bool_ else 2
            m_ptr, m_rs, m_cs = mfull.data.ptr, em[-2], em[-1]
            _, _, m_off = offsets(mfull, False)
        c.cuda.sdpa(c.device, c.code(q.dtype), q.data.ptr, k.data.ptr, v.data.ptr, out.data.ptr, q_off.data.ptr,
                    k_off.data.ptr, v_off.data.ptr, nbatch, L, S, E, Ev, eq[-2], ek[-2], ev[-2], m_ptr, mask_kind,
                    0 if m_off is None else m_off.data.ptr, m_rs, m_cs, is_causal, scale,
                    0 if lse is None else lse.data.ptr, c.stream, _variant,
                    *((False, 0, 1.0, 0, 0) if drop is None else
                      (True, drop.threshold, drop.keep_scale, drop.seed, drop.offset)))
        return result(out, lse)


def scaled_dot_product_attention_backward(grad_output, query, key, value, output, lse, attn_mask=None,
                                          is_causal=False, scale=None, enable_gqa=False, *, dropout_p=0.0,
                                          rng_state=None):
    """Gradients of scaled_dot_product_attention on GPU arrays: (grad_query, grad_key, grad_value), with the
    CPU function's arguments and rules (dropout: the mask is regenerated from rng_state per chunk). Composed of fastnn's CUDA matmul and cupy element-wise operations
    in float32 (fastnn/_attention_grad.py): unlike the CPU kernel it materializes scores, of a chunk of heads
    at a time or, when one head's L x S scores exceed 256 MiB, of a block of query rows (there is no fused
    flash-style CUDA backward yet)."""
    c = _Call("scaled_dot_product_attention_backward")
    drop = backward_dropout(dropout_p, rng_state)
    q, k, v, mask, L, S, E, Ev, scale, group, batch, is_causal = _attention_operands(
        c, query, key, value, attn_mask, is_causal, scale, enable_gqa)
    oshape = batch + (L, Ev)
    g = c.array(grad_output, "grad_output")
    o = c.array(output, "output")
    m = c.array(lse, "lse")
    for x, n in ((g, "grad_output"), (o, "output"), (m, "lse")):
        c.same_dtype(q, "query", x, n)
    if g.shape != oshape:
        raise ValueError(f"grad_output: expected shape {oshape} (the forward's output), got {g.shape}")
    if o.shape != oshape:
        raise ValueError(f"output: expected shape {oshape} (the forward's output), got {o.shape}")
    if m.shape != batch + (L,):
        raise ValueError(f"lse: expected shape {batch + (L,)}, got {m.shape}")
    with c.scope():
        dq, dk, dv = attention_backward(c.cp, matmul, g, q, k, v, o, m, mask, is_causal, scale, group, batch,
                                        dropout=drop)
        n = len(batch)
        return tuple(c.cp.ascontiguousarray(reduce_grad(d, a.shape, n, grp).astype(q.dtype, copy=False))
                     for d, a, grp in ((dq, q, None), (dk, k, group), (dv, v, group)))


# ---- Adam ------------------------------------------------------------------------------------------

def adam_update(param, grad, exp_avg, exp_avg_sq, *, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=0.0, decoupled_weight_decay=False, maximize=False, max_exp_avg_sq=None):
    """One fused, in-place Adam step on GPU arrays, torch.optim.Adam's arithmetic.

    param and grad: float32 or float16 (one dtype). exp_avg, exp_avg_sq (and max_exp_avg_sq) are always
    float32, also for float16 params (mixed precision: float16 moments would underflow). The updated arrays
    must be C-contiguous and distinct. Other arguments as on the CPU. Returns None; does not synchronize.
    """
    c = _Call("adam_update")
    p = c.array(param, "param")
    g = c.array(grad, "grad")
    c.same_dtype(p, "param", g, "grad")
    if g.shape != p.shape:
        raise ValueError(f"grad: shape {g.shape} does not match param's shape {p.shape}")
    if not p.flags.c_contiguous:
        raise ValueError("param: must be C-contiguous (it is updated in place; a copy would be silently lost)")
    states = [("param", p)]
    for name, s in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("max_exp_avg_sq", max_exp_avg_sq)):
        if s is None:
            continue
        s = c.array(s, name, dtypes=("float32",))
        if s.shape != p.shape:
            raise ValueError(f"{name}: shape {s.shape} does not match param's shape {p.shape}")
        if not s.flags.c_contiguous:
            raise ValueError(f"{name}: must be C-contiguous (it is updated in place; a copy would be silently lost)")
        states.append((name, s))
    for i in range(len(states)):
        for j in range(i + 1, len(states)):
            if states[i][1].size and c.cp.may_share_memory(states[i][1], states[j][1]):
                raise ValueError(f"{states[j][0]}: shares memory with {states[i][0]}; the state arrays must be distinct")
    arrays = dict(states)
    if isinstance(step, bool):
        raise TypeError("step: expected an int >= 1, got bool")
    try:
        step = operator.index(step)
    except TypeError:
        raise TypeError(f"step: expected an int >= 1, got {type(step).__name__}") from None
    if step < 1:
        raise ValueError(f"step: expected an int >= 1 (steps count from 1), got {step}")
    lr, beta1, beta2 = _real(lr, "lr"), _real(beta1, "beta1"), _real(beta2, "beta2")
    eps, weight_decay = _real(eps, "eps"), _real(weight_decay, "weight_decay")
    if not lr >= 0:
        raise ValueError(f"lr: expected >= 0, got {lr}")
    if not 0 <= beta1 < 1:
        raise ValueError(f"beta1: expected 0 <= beta1 < 1, got {beta1}")
    if not 0 <= beta2 < 1:
        raise ValueError(f"beta2: expected 0 <= beta2 < 1, got {beta2}")
    if not eps >= 0:
        raise ValueError(f"eps: expected >= 0, got {eps}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay: expected >= 0, got {weight_decay}")
    decoupled = _flag(decoupled_weight_decay, "decoupled_weight_decay")
    maximize = _flag(maximize, "maximize")
    if p.size == 0:
        return None
    with c.scope():
        if not g.flags.c_contiguous or any(c.cp.may_share_memory(g, s) for _, s in states):
            g = c.cp.array(g, order="C", copy=True)
        vmax = arrays.get("max_exp_avg_sq")
        c.cuda.adam(c.device, c.code(p.dtype), p.data.ptr, g.data.ptr, arrays["exp_avg"].data.ptr,
                    arrays["exp_avg_sq"].data.ptr, 0 if vmax is None else vmax.data.ptr, p.size, lr, beta1, beta2,
                    eps, weight_decay, *adam_scalars(lr, beta1, beta2, step), decoupled, maximize,
                    c.stream, _variant)
    return None


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


# ---- dispatch --------------------------------------------------------------------------------------

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


def dispatch(cpu, gpu):
    """The public op: `gpu` when any argument exposes __cuda_array_interface__, else `cpu` (numpy arrays are
    recognised first, so the CPU path pays one type check per argument)."""
    ndarray = np.ndarray

    @functools.wraps(cpu)
    def op(*args, **kwargs):
        for a in args:
            if type(a) is not ndarray and hasattr(a, "__cuda_array_interface__"):
                return gpu(*args, **kwargs)
        if kwargs:
            for a in kwargs.values():
                if type(a) is not ndarray and hasattr(a, "__cuda_array_interface__"):
                    return gpu(*args, **kwargs)
        return cpu(*args, **kwargs)

    op.cpu, op.gpu = cpu, gpu
    return op
