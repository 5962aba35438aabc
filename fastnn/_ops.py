"""The public ops: argument checks, layout preparation and calls into the C++ kernels (fastnn._C).

Every check lives here, at the boundary: a bad argument raises TypeError (wrong type or dtype) or
ValueError (bad shape, axis or value) naming the argument, what was given and what was expected.
The kernels receive validated, prepared arrays and release the GIL while they run.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Optional, Tuple

import numpy as np

from . import _C
from ._attention_grad import reduce_grad
from ._dropout import backward_dropout, check_dropout_sizes, forward_dropout

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_ZERO_OFFSETS = np.zeros(1, dtype=np.int64)
_ZERO_OFFSETS.flags.writeable = False


# ---- argument checks ------------------------------------------------------------------------------

def _array(x, name: str) -> np.ndarray:
    """x as a float32/float64 numpy array, or a clear TypeError."""
    if isinstance(x, np.ndarray):
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}: expected a float32 or float64 array, got dtype {x.dtype}")
        return x
    if hasattr(x, "__cuda_array_interface__"):
        raise TypeError(
            f"{name}: got a GPU array ({type(x).__module__}.{type(x).__name__}) in a call with numpy arrays; "
            "pass every array of one call on the same side (cupy.asnumpy(x) to move it to the host)"
        )
    raise TypeError(f"{name}: expected a numpy.ndarray, got {type(x).__name__}")


def _same_dtype(ref: np.ndarray, ref_name: str, x: np.ndarray, name: str) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: dtype {x.dtype} does not match {ref_name}'s dtype {ref.dtype}; "
                        "operands of one op must share one dtype")


def _axis(axis, ndim: int, name: str = "axis") -> int:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(axis).__name__}")
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}: {axis} is out of range for an array of {ndim} dimension(s); "
                         f"expected -{ndim} <= {name} < {ndim}")
    return axis % ndim


def _real(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(x).__name__}")
    return float(x)


def _flag(x, name: str) -> bool:
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(x).__name__}")
    return bool(x)


def _check_out(out, shape, dtype, name: str = "out") -> np.ndarray:
    """Checks a user-provided output array (shape, dtype, writable, no self-overlapping strides)."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {out.dtype}")
    if out.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {out.shape}")
    if not out.flags.writeable:
        raise ValueError(f"{name}: the array is read-only")
    if _self_overlapping(out):
        raise ValueError(f"{name}: has zero or overlapping strides (several elements share memory, e.g. a "
                         "np.broadcast_to or as_strided view); pass a real array")
    return out


def _self_overlapping(a: np.ndarray) -> bool:
    """Whether elements of `a` may share memory: with the dims sorted by |stride|, each stride must step
    over the whole extent of the smaller ones (true of every slice or transpose of a real array)."""
    if a.size <= 1:
        return False
    extent = a.itemsize
    for stride, n in sorted((abs(s), n) for s, n in zip(a.strides, a.shape) if n > 1):
        if stride < extent:
            return True
        extent += stride * (n - 1)
    return False


def _result_buffer(out: Optional[np.ndarray], shape, dtype, inputs=(), in_place_ok=()) -> np.ndarray:
    """The C-contiguous array the kernel writes: `out` itself when it is C-contiguous and does not overlap
    an input (or is exactly one of `in_place_ok`, for element-wise ops), else a fresh array (copied into
    `out` afterwards by _commit)."""
    if out is None:
        return np.empty(shape, dtype)
    if out.flags.c_contiguous and out.flags.aligned:
        for x in inputs:
            if np.may_share_memory(out, x) and not any(_same_view(out, y) for y in in_place_ok if y is x):
                break
        else:
            return out
    return np.empty(shape, dtype)


def _same_view(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.shape == b.shape and a.strides == b.strides)


def _commit(out: Optional[np.ndarray], buf: np.ndarray) -> np.ndarray:
    if out is None:
        return buf
    if buf is not out:
        np.copyto(out, buf)
    return out


def _elementwise_layout(*arrays: np.ndarray):
    """C-contiguous views of same-layout operands without copying when all are C- or all F-contiguous;
    returns (views, transposed)."""
    if all(a.flags.c_contiguous and a.flags.aligned for a in arrays):
        return arrays, False
    if all(a.flags.f_contiguous and a.flags.aligned for a in arrays):
        return tuple(a.T for a in arrays), True
    return tuple(_contiguous(a) for a in arrays), False


def _contiguous(a: np.ndarray) -> np.ndarray:
    """a as a C-contiguous array aligned for its dtype: a itself when it is, else a copy. (A view at an odd
    byte offset is C-contiguous to NumPy, and np.ascontiguousarray keeps it, but the kernels need aligned
    elements: misaligned loads are undefined behaviour in C++, and vectorized loops assume alignment.)"""
    return a if a.flags.c_contiguous and a.flags.aligned else np.array(a, order="C")


def _elem_strides(a: np.ndarray) -> Tuple[np.ndarray, Tuple[int, ...]]:
    """(a, element strides); copies `a` in the rare case a stride is not a multiple of the item size."""
    if any(s % a.itemsize for s in a.strides) or not a.flags.aligned:
        a = a.copy()
    return a, tuple(s // a.itemsize for s in a.strides)


def _batch_offsets(a: np.ndarray, estrides, core: int, batch_shape, map_axis=None) -> np.ndarray:
    """Element offsets of each matrix of `a` (its last `core` dims) over the broadcast `batch_shape`.
    `map_axis=(axis, group)` makes batch index h along `axis` read a's index h // group (GQA)."""
    nb = a.ndim - core
    if nb == 0 and not batch_shape:
        return _ZERO_OFFSETS
    offs = np.zeros(a.shape[:nb], dtype=np.int64)
    for d in range(nb):
        shape = [1] * nb
        shape[d] = a.shape[d]
        offs = offs + (np.arange(a.shape[d], dtype=np.int64) * estrides[d]).reshape(shape)
    if map_axis is not None:
        axis, group = map_axis
        offs = np.repeat(offs, group, axis=axis)
    return np.ascontiguousarray(np.broadcast_to(offs, batch_shape), dtype=np.int64).reshape(-1)


def _broadcast_batch(shapes, names) -> Tuple[int, ...]:
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        desc = ", ".join(f"{n} {tuple(s)}" for n, s in zip(names, shapes))
        raise ValueError(f"batch dimensions do not broadcast: {desc}") from None


# ---- matmul and linear ----------------------------------------------------------------------------

def _gemm(a: np.ndarray, b: np.ndarray, buf: np.ndarray, batch_shape, bias=None, relu=False) -> None:
    """buf[batch] = a[batch] @ b[batch] (+ bias, relu) with a (..., M, K), b (..., K, N) of any strides."""
    a, ea = _elem_strides(a)
    b, eb = _elem_strides(b)
    M, K = a.shape[-2:]
    N = b.shape[-1]
    a_off = _batch_offsets(a, ea, 2, batch_shape)
    b_off = _batch_offsets(b, eb, 2, batch_shape)
    _C.gemm(a, b, buf, a_off, b_off, M, N, K, ea[-2], ea[-1], eb[-2], eb[-1], bias, relu, False)


def matmul(a, b, *, out=None):
    """Matrix product with numpy.matmul's semantics.

    a: (..., M, K) or (K,); b: (..., K, N) or (K,); float32 or float64, one dtype. 1-D operands are
    promoted to matrices and the added dimension removed from the result; batch dimensions broadcast.
    Any strides (transposed, negative, Fortran-ordered views) are read directly, without copies.
    out: optional array of the result's shape and dtype, written in place and returned.
    Returns an array of shape broadcast(a.shape[:-2], b.shape[:-2]) + (M, N) (minus promoted dims).
    Raises TypeError for non-arrays and non-float or mixed dtypes; ValueError for 0-d operands,
    mismatched inner dimensions or batch shapes that do not broadcast.
    """
    if type(a) is np.ndarray and type(b) is np.ndarray:
        c = _C.matmul2d(a, b, out)  # the common 2-D case with the least per-call overhead; None if not it
        if c is not None:
            return c
    a = _array(a, "a")
    b = _array(b, "b")
    _same_dtype(a, "a", b, "b")
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
        _check_out(out, shape, a.dtype)
    buf = _result_buffer(out, shape, a.dtype, (a, b))
    _gemm(a2, b2, buf.reshape(batch + (M, N)), batch)
    return _commit(out, buf)


def linear_shapes(x, weight) -> Tuple[int, int]:
    """(in, out) of x (..., in) @ weight (in, out), or a ValueError naming the argument whose shape is wrong;
    shared by linear and linear_backward, on the CPU and the GPU."""
    if weight.ndim != 2:
        raise ValueError(f"weight: expected 2 dimensions (in, out), got shape {weight.shape}")
    if x.ndim == 0:
        raise ValueError("x: expected at least 1 dimension (..., in), got a 0-d array")
    n_in, n_out = weight.shape
    if x.shape[-1] != n_in:
        raise ValueError(f"x: last dimension {x.shape[-1]} does not match weight's first dimension {n_in} "
                         f"(x {x.shape}, weight {weight.shape})")
    return n_in, n_out


def linear(x, weight, bias=None, *, activation=None):
    """activation(x @ weight + bias), with bias and activation fused into the product's store.

    x: (..., in); weight: (in, out); bias: (out,) or None; activation: None or "relu".
    Returns (..., out) in x's dtype. Raises TypeError for bad types/dtypes, ValueError for bad shapes
    or an unknown activation.
    """
    x = _array(x, "x")
    weight = _array(weight, "weight")
    _same_dtype(x, "x", weight, "weight")
    if activation not in (None, "relu"):
        raise ValueError(f"activation: expected None or 'relu', got {activation!r}")
    n_in, n_out = linear_shapes(x, weight)
    if bias is not None:
        bias = _array(bias, "bias")
        _same_dtype(x, "x", bias, "bias")
        if bias.shape != (n_out,):
            raise ValueError(f"bias: expected shape ({n_out},), got {bias.shape}")
        bias = _contiguous(bias)
    x2 = x.reshape(math.prod(x.shape[:-1]), n_in)
    y = np.empty((x2.shape[0], n_out), x.dtype)
    _gemm(x2, weight, y, (), bias, activation == "relu")
    return y.reshape(x.shape[:-1] + (n_out,))


# ---- relu -----------------------------------------------------------------------------------------

def relu(x, *, out=None):
    """max(x, 0) element-wise; NaN stays NaN (as np.maximum).

    x: any shape, float32 or float64. out: optional array of x's shape and dtype; may be x itself
    (in place). Returns the result (out when given).
    """
    x = _array(x, "x")
    if out is not None:
        _check_out(out, x.shape, x.dtype)
        if out.flags.c_contiguous and out.flags.aligned and _same_view(out, x):
            _C.relu(x, x)
            return out
    (xv,), transposed = _elementwise_layout(x)
    if out is None:
        y = np.empty(xv.shape, x.dtype)
        _C.relu(xv, y)
        return y.T if transposed else y
    buf = _result_buffer(out, x.shape, x.dtype, (x,))
    _C.relu(_contiguous(x), buf)
    return _commit(out, buf)


def relu_backward(grad_output, x, *, out=None):
    """Gradient of relu: grad_output where x > 0, else 0 (also 0 where x is NaN).

    grad_output and x: same shape and dtype. out: optional array of that shape and dtype.
    """
    g = _array(grad_output, "grad_output")
    x = _array(x, "x")
    _same_dtype(x, "x", g, "grad_output")
    if g.shape != x.shape:
        raise ValueError(f"grad_output: shape {g.shape} does not match x's shape {x.shape}")
    if out is not None:
        _check_out(out, x.shape, x.dtype)
    if out is None:
        (gv, xv), transposed = _elementwise_layout(g, x)
        y = np.empty(xv.shape, x.dtype)
        _C.relu_backward(gv, xv, y)
        return y.T if transposed else y
    in_place = (g,) if _same_view(out, g) else ((x,) if _same_view(out, x) else ())
    buf = _result_buffer(out, x.shape, x.dtype, (g, x), in_place)
    _C.relu_backward(_contiguous(g), _contiguous(x), buf)
    return _commit(out, buf)


# ---- softmax family -------------------------------------------------------------------------------

def _rows_last(x: np.ndarray, axis: int) -> np.ndarray:
    """x with `axis` moved last, C-contiguous (a view when it already is)."""
    return _contiguous(np.moveaxis(x, axis, -1) if axis != x.ndim - 1 else x)


def _softmax(x, axis, out, log: bool, name: str):
    x = _array(x, "x")
    if x.ndim == 0:
        raise ValueError(f"{name}: x must have at least 1 dimension, got a 0-d array")
    axis = _axis(axis, x.ndim)
    if out is not None:
        _check_out(out, x.shape, x.dtype)
    if x.size == 0:
        return out if out is not None else np.empty(x.shape, x.dtype)
    xr = _rows_last(x, axis)
    if axis == x.ndim - 1:
        buf = _result_buffer(out, x.shape, x.dtype, (x,), (x,))
    else:
        buf = np.empty(xr.shape, x.dtype)
    _C.softmax(xr, buf, xr.shape[-1], log)
    res = np.moveaxis(buf, -1, axis) if axis != x.ndim - 1 else buf
    return _commit(out, res) if out is not None else res


def softmax(x, axis=-1, *, out=None):
    """exp(x) / sum(exp(x)) along `axis`, computed safely for large magnitudes (max subtracted).

    x: float32/float64, at least 1-D; axis: int (default -1); out: optional array like x (may be x).
    A row containing +inf or NaN gives NaN, as the NumPy formula does.
    """
    return _softmax(x, axis, out, False, "softmax")


def log_softmax(x, axis=-1, *, out=None):
    """x - max - log(sum(exp(x - max))) along `axis`. Same arguments as softmax."""
    return _softmax(x, axis, out, True, "log_softmax")


def _softmax_backward(grad_output, output, axis, log: bool, name: str):
    g = _array(grad_output, "grad_output")
    y = _array(output, "output")
    _same_dtype(y, "output", g, "grad_output")
    if g.shape != y.shape:
        raise ValueError(f"grad_output: shape {g.shape} does not match output's shape {y.shape}")
    if y.ndim == 0:
        raise ValueError(f"{name}: output must have at least 1 dimension, got a 0-d array")
    axis = _axis(axis, y.ndim)
    if y.size == 0:
        return np.empty(y.shape, y.dtype)
    gr, yr = _rows_last(g, axis), _rows_last(y, axis)
    buf = np.empty(yr.shape, y.dtype)
    _C.softmax_backward(gr, yr, buf, yr.shape[-1], log)
    return np.moveaxis(buf, -1, axis) if axis != y.ndim - 1 else buf


def softmax_backward(grad_output, output, axis=-1):
    """Gradient of softmax given its output y: y * (g - sum(g * y, axis)).

    grad_output, output: same shape and dtype (output is softmax's result). Returns a new array.
    """
    return _softmax_backward(grad_output, output, axis, False, "softmax_backward")


def log_softmax_backward(grad_output, output, axis=-1):
    """Gradient of log_softmax given its output y (log-probabilities): g - exp(y) * sum(g, axis).

    grad_output, output: same shape and dtype (output is log_softmax's result). Returns a new array.
    """
    return _softmax_backward(grad_output, output, axis, True, "log_softmax_backward")


def cross_entropy(logits, labels):
    """Mean negative log-likelihood and its gradient, in one fused pass.

    logits: (N, C) float32/float64; labels: (N,) int32 or int64 with values in [0, C).
    Returns (loss, grad): loss a Python float (mean over the N rows; NaN when N == 0), grad (N, C)
    = (softmax(logits) - onehot(labels)) / N. A label outside [0, C) is a ValueError.
    """
    logits = _array(logits, "logits")
    if not isinstance(labels, np.ndarray):
        raise TypeError(f"labels: expected a numpy.ndarray of int32/int64, got {type(labels).__name__}")
    if labels.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
        raise TypeError(f"labels: expected dtype int32 or int64, got {labels.dtype}")
    if logits.ndim != 2:
        raise ValueError(f"logits: expected 2 dimensions (N, C), got shape {logits.shape}")
    n, c = logits.shape
    if labels.shape != (n,):
        raise ValueError(f"labels: expected shape ({n},) to match logits {logits.shape}, got {labels.shape}")
    grad = np.empty((n, c), logits.dtype)
    if n == 0:
        return float("nan"), grad
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= c:
        bad = lo if lo < 0 else hi
        raise ValueError(f"labels: value {bad} is out of range; expected 0 <= label < {c}")
    lab = _contiguous(labels.astype(np.int64, copy=False))
    total = _C.cross_entropy(_contiguous(logits), lab, grad, c, 1.0 / n)
    return total / n, grad


# ---- attention ------------------------------------------------------------------------------------

def _rows_contiguous(a: np.ndarray) -> np.ndarray:
    """a with unit stride in its last dim and non-negative strides elsewhere (copied only if needed)."""
    if (a.strides[-1] != a.itemsize or any(s < 0 for s in a.strides) or any(s % a.itemsize for s in a.strides)
            or not a.flags.aligned):
        return np.array(a, order="C")
    return a


class _Attention:
    """Validated, prepared attention operands shared by the forward and backward entry points."""

    def __init__(self, query, key, value, attn_mask, is_causal, scale, enable_gqa):
        q = _array(query, "query")
        k = _array(key, "key")
        v = _array(value, "value")
        _same_dtype(q, "query", k, "key")
        _same_dtype(q, "query", v, "value")
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
        if scale is None:
            scale = 1.0 / math.sqrt(E) if E > 0 else 1.0
        else:
            scale = _real(scale, "scale")
            if not abs(scale) <= float(np.finfo(q.dtype).max):  # NaN, inf or overflowing the dtype
                raise ValueError(f"scale: expected a finite number representable in {q.dtype}, got {scale}")
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
        self.dtype, self.batch, self.L, self.S, self.E, self.Ev = q.dtype, batch, L, S, E, Ev
        self.nbatch = math.prod(batch)
        self.causal, self.scale, self.group = is_causal, scale, group
        self.q_shape, self.k_shape, self.v_shape = q.shape, k.shape, v.shape

        # Kernel layouts: unit stride in the last dim, non-negative strides (copied only if needed).
        q, k, v = _rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v)
        self.q, self.k, self.v = q, k, v
        eq, ek, ev = (tuple(s // a.itemsize for s in a.strides) for a in (q, k, v))
        self.rows = (eq[-2], ek[-2], ev[-2])
        self.q_off = self._offsets(q, eq, None)
        self.k_off = self._offsets(k, ek, group)
        self.v_off = self._offsets(v, ev, group)

        self.mask, self.m_off, self.m_rs, self.m_cs = None, _ZERO_OFFSETS, 0, 0
        if attn_mask is not None:
            if not isinstance(attn_mask, np.ndarray):
                raise TypeError(f"attn_mask: expected a numpy.ndarray, got {type(attn_mask).__name__}")
            if attn_mask.dtype != np.bool_ and attn_mask.dtype != q.dtype:
                raise TypeError(f"attn_mask: expected dtype bool or {q.dtype} (the query's), got {attn_mask.dtype}")
            try:
                mfull = np.broadcast_to(attn_mask, batch + (L, S))
            except ValueError:
                raise ValueError(f"attn_mask: shape {attn_mask.shape} does not broadcast to {batch + (L, S)}") from None
            mfull, em = _elem_strides(mfull)
            if any(s < 0 for s in em):
                mfull = np.ascontiguousarray(mfull)
                _, em = _elem_strides(mfull)
            self.mask, self.m_rs, self.m_cs = mfull, em[-2], em[-1]
            self.m_off = self._offsets(mfull, em, None)

    def _offsets(self, a, estrides, group):
        nb = a.ndim - 2
        offs = _batch_offsets(a, estrides, 2, self.batch, (nb - 1, group) if group else None)
        if offs.size != self.nbatch:
            offs = np.ascontiguousarray(np.broadcast_to(offs, (self.nbatch,)), dtype=np.int64)
        return offs

    def empty(self):
        return self.nbatch == 0 or self.L == 0

    def kernel_args(self):
        return (self.q, self.k, self.v)

    def reduce_to(self, grad, shape, grouped):
        """Sums a per-head gradient (batch + core) down to an operand's shape: over the query heads of a
        GQA group (`grouped`: key and value) and over broadcast batch dimensions."""
        return np.ascontiguousarray(reduce_grad(grad, shape, len(self.batch), self.group if grouped else None))


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False, *, return_lse=False, rng=None):
    """softmax(query @ key^T * scale + mask) @ value, with PyTorch's semantics, flash-style.

    query (..., L, E), key (..., S, E), value (..., S, Ev) -> (..., L, Ev); leading dimensions
    broadcast as in matmul (2-D inputs allowed). float32/float64, one dtype.
    attn_mask: bool (True = may attend) or a float array of the same dtype added to the scores,
    broadcastable to (..., L, S). is_causal: query i may attend key j iff j <= i, i.e.
    tril(ones(L, S)) aligned at the top-left (flash-attn aligns bottom-right when L != S).
    scale: default 1/sqrt(E). enable_gqa: query (N, Hq, L, E) with key/value (N, Hkv, S, .),
    Hq divisible by Hkv, key/value head h serving query heads h*Hq/Hkv .. (h+1)*Hq/Hkv - 1.
    A query row with no allowed key gives zeros.
    dropout_p: in [0, 1) (else ValueError); as torch's, each attention probability is dropped with
    probability dropout_p and the survivors are scaled by 1 / (1 - dropout_p). The mask comes from
    Philox-4x32-10 keyed by (seed, offset) and each element's (batch, row, column) index (fastnn/_dropout.py
    gives the mapping), the same on every ISA path, thread count and on the GPU. rng: an int seed in
    [0, 2**64), a numpy.random.Generator (a 64-bit seed is drawn from it), a (seed, offset) pair (the
    rng_state of an earlier call: the same mask again), or None (fresh OS entropy); unused when dropout_p == 0.
    return_lse: also return the log-sum-exp of each query row's scaled, masked scores, shape (..., L)
    (-inf for a row with no allowed key): what scaled_dot_product_attention_backward needs. With
    dropout_p > 0 the result is then (out, lse, rng_state), rng_state the (seed, offset) pair of ints the
    backward needs to regenerate the mask; with dropout_p == 0 it is (out, lse).
    Keys are processed in tiles with an online softmax: no L x S matrix (nor mask) is ever held.
    """
    drop = forward_dropout(dropout_p, rng)
    return_lse = _flag(return_lse, "return_lse")
    at = _Attention(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    if drop is not None:
        check_dropout_sizes(at.nbatch, at.L, at.S)
    out = np.empty(at.batch + (at.L, at.Ev), at.dtype)
    lse = np.empty(at.batch + (at.L,), at.dtype) if return_lse else None
    if not at.empty() and (out.size or lse is not None):  # Ev == 0 still has an lse
        _C.sdpa(*at.kernel_args(), out.reshape(at.nbatch, at.L, at.Ev), at.q_off, at.k_off, at.v_off,
                at.L, at.S, at.E, at.Ev, *at.rows, at.mask, at.m_off, at.m_rs, at.m_cs, at.causal, at.scale,
                None if lse is None else lse.reshape(at.nbatch, at.L), drop)
    elif lse is not None:
        lse.fill(-np.inf)
    if not return_lse:
        return out
    return (out, lse) if drop is None else (out, lse, drop.rng_state)


def scaled_dot_product_attention_backward(grad_output, query, key, value, output, lse, attn_mask=None,
                                          is_causal=False, scale=None, enable_gqa=False, *, dropout_p=0.0,
                                          rng_state=None):
    """Gradients of scaled_dot_product_attention, flash-style (scores recomputed tile by tile).

    grad_output and output: (..., L, Ev) (output is the forward's result), lse: (..., L) from the forward
    with return_lse=True; the other arguments as given to the forward. With dropout_p > 0, rng_state is
    the (seed, offset) the forward returned (required; the mask is regenerated, never stored). Returns
    (grad_query, grad_key, grad_value) shaped like query, key and value (summed over the query heads
    that share a key/value head with enable_gqa, and over broadcast batch dimensions).
    Memory beyond the gradients is O(block) per thread; threads take whole (batch, head) pairs.
    """
    drop = backward_dropout(dropout_p, rng_state)
    at = _Attention(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    if drop is not None:
        check_dropout_sizes(at.nbatch, at.L, at.S)
    oshape = at.batch + (at.L, at.Ev)
    g = _array(grad_output, "grad_output")
    o = _array(output, "output")
    lse = _array(lse, "lse")
    for x, n in ((g, "grad_output"), (o, "output"), (lse, "lse")):
        _same_dtype(at.q, "query", x, n)
    if g.shape != oshape:
        raise ValueError(f"grad_output: expected shape {oshape} (the forward's output), got {g.shape}")
    if o.shape != oshape:
        raise ValueError(f"output: expected shape {oshape} (the forward's output), got {o.shape}")
    if lse.shape != at.batch + (at.L,):
        raise ValueError(f"lse: expected shape {at.batch + (at.L,)}, got {lse.shape}")
    dq = np.zeros(at.batch + (at.L, at.E), at.dtype)
    dk = np.zeros(at.batch + (at.S, at.E), at.dtype)
    dv = np.zeros(at.batch + (at.S, at.Ev), at.dtype)
    if not at.empty() and at.S:
        nb = at.nbatch
        _C.sdpa_backward(*at.kernel_args(), at.q_off, at.k_off, at.v_off, at.L, at.S, at.E, at.Ev, *at.rows,
                         at.mask, at.m_off, at.m_rs, at.m_cs, at.causal, at.scale,
                         _contiguous(g).reshape(nb, at.L, at.Ev),
                         _contiguous(o).reshape(nb, at.L, at.Ev),
                         _contiguous(lse).reshape(nb, at.L),
                         dq.reshape(nb, at.L, at.E), dk.reshape(nb, at.S, at.E), dv.reshape(nb, at.S, at.Ev), drop)
    return (at.reduce_to(dq, at.q_shape, False), at.reduce_to(dk, at.k_shape, True),
            at.reduce_to(dv, at.v_shape, True))


# ---- Adam -----------------------------------------------------------------------------------------

def _state(x, name: str, ref: np.ndarray) -> np.ndarray:
    x = _array(x, name)
    _same_dtype(ref, "param", x, name)
    if x.shape != ref.shape:
        raise ValueError(f"{name}: shape {x.shape} does not match param's shape {ref.shape}")
    if not (x.flags.c_contiguous and x.flags.aligned):
        raise ValueError(f"{name}: must be C-contiguous and aligned (it is updated in place; a copy would be "
                         "silently lost)")
    if not x.flags.writeable:
        raise ValueError(f"{name}: the array is read-only (it is updated in place)")
    return x


def adam_scalars(lr: float, beta1: float, beta2: float, step: int) -> Tuple[float, float]:
    """(step_size, sqrt of the second bias correction) of one Adam step, host-side Python floats computed
    exactly as torch computes them; shared by every Adam entry point, CPU and GPU."""
    return lr / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5


def adam_update(param, grad, exp_avg, exp_avg_sq, *, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=0.0, decoupled_weight_decay=False, maximize=False, max_exp_avg_sq=None):
    """One fused, in-place Adam step with torch.optim.Adam's arithmetic.

    param, exp_avg, exp_avg_sq (and max_exp_avg_sq for AMSGrad) are updated in place: they must be
    C-contiguous, writable, of one shape and dtype (float32/float64), and distinct. grad: same shape and
    dtype, any layout. step: the step number, counting from 1 (bias corrections use it).
    decoupled_weight_decay=True gives AdamW; maximize ascends. Returns None.
    """
    p = _array(param, "param")
    if not (p.flags.c_contiguous and p.flags.aligned):
        raise ValueError("param: must be C-contiguous and aligned (it is updated in place; a copy would be "
                         "silently lost)")
    if not p.flags.writeable:
        raise ValueError("param: the array is read-only (it is updated in place)")
    g = _array(grad, "grad")
    _same_dtype(p, "param", g, "grad")
    if g.shape != p.shape:
        raise ValueError(f"grad: shape {g.shape} does not match param's shape {p.shape}")
    m = _state(exp_avg, "exp_avg", p)
    v = _state(exp_avg_sq, "exp_avg_sq", p)
    vmax = _state(max_exp_avg_sq, "max_exp_avg_sq", p) if max_exp_avg_sq is not None else None
    states = [("param", p), ("exp_avg", m), ("exp_avg_sq", v)] + ([("max_exp_avg_sq", vmax)] if vmax is not None else [])
    for i in range(len(states)):
        for j in range(i + 1, len(states)):
            if states[i][1].size and np.may_share_memory(states[i][1], states[j][1]):
                raise ValueError(f"{states[j][0]}: shares memory with {states[i][0]}; the state arrays must be distinct")
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
    # Finite: an infinite lr, eps or weight decay only turns parameters into inf/NaN.
    if not 0 <= lr < math.inf:
        raise ValueError(f"lr: expected a finite number >= 0, got {lr}")
    if not 0 <= beta1 < 1:
        raise ValueError(f"beta1: expected 0 <= beta1 < 1, got {beta1}")
    if not 0 <= beta2 < 1:
        raise ValueError(f"beta2: expected 0 <= beta2 < 1, got {beta2}")
    if not 0 <= eps < math.inf:
        raise ValueError(f"eps: expected a finite number >= 0, got {eps}")
    if not 0 <= weight_decay < math.inf:
        raise ValueError(f"weight_decay: expected a finite number >= 0, got {weight_decay}")
    decoupled = _flag(decoupled_weight_decay, "decoupled_weight_decay")
    maximize = _flag(maximize, "maximize")
    if g.size and (not g.flags.c_contiguous or not g.flags.aligned or any(np.may_share_memory(g, s) for _, s in states)):
        g = np.array(g, order="C", copy=True)
    _C.adam(p, g, m, v, vmax, lr, beta1, beta2, eps, weight_decay, *adam_scalars(lr, beta1, beta2, step),
            decoupled, maximize)


# ---- threads and ISA ------------------------------------------------------------------------------

def set_num_threads(n) -> None:
    """Sets the number of threads fastnn's kernels use (all Python threads share it). n >= 1."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"n: expected an int >= 1, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n}")
    _C.set_num_threads(int(n))


def get_num_threads() -> int:
    """The number of threads fastnn's kernels use (default: OMP_NUM_THREADS, else the core count)."""
    return _C.get_num_threads()


def cpu_isa() -> str:
    """The CPU kernel path in use: 'generic', 'avx2' or 'avx512'."""
    return _C.isa()


def set_cpu_isa(name) -> None:
    """Switches the CPU kernel path ('generic', 'avx2' or 'avx512') for all later calls.
    ValueError when that path is not compiled in or this CPU does not support it."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    supported = _C.isa_supported().split(",")
    if not _C.set_isa(name):
        raise ValueError(f"name: CPU ISA path {name!r} is not available here; expected one of {supported}")
