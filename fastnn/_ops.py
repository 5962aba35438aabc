"""The public ops, written once for every array type: argument checks, shape/axis planning, allocation.

Each public function first tries the compiled fast path for plain numpy arguments (fastnn._C: it checks
them and runs the kernel, or returns None for anything else). The general path then adopts the call's
arrays (fastnn/_backend.py: numpy, torch, JAX, cupy or another DLPack array, all of one family, viewed
without copies as numpy or cupy arrays) and runs the one check-and-plan below against the backend they
belong to (the CPU backend, or the CUDA one in fastnn/_gpu.py), which allocates and calls its compiled
entry; results go back in the caller's array type.

Every check lives here, at the boundary: a bad argument raises TypeError (wrong type or dtype) or
ValueError (bad shape, axis or value) naming the argument, what was given and what was expected, with
the same message on every backend.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Tuple

import numpy as np

from . import _C, _backend
from ._attention_grad import reduce_grad
from ._backend import HALF_MAX, adopt, contiguous, is_bf16, torch_view
from ._dropout import backward_dropout, check_dropout_sizes, forward_dropout

_ndarray = np.ndarray
_ZERO_OFFSETS = np.zeros(1, dtype=np.int64)
_ZERO_OFFSETS.flags.writeable = False
_INTS = (np.dtype(np.int32), np.dtype(np.int64))


# ---- argument checks ------------------------------------------------------------------------------

def _floats(bk, x, name: str):
    """x, checked to have one of the backend's float dtypes."""
    if x.dtype not in bk.float_dtypes:
        raise TypeError(f"{name}: expected a {bk.dtype_names} array, got dtype {x.dtype}")
    return x


def _largest(dtype) -> float:
    """The largest finite value of a float dtype (np.finfo does not know bfloat16)."""
    return HALF_MAX["bfloat16"] if is_bf16(dtype) else float(np.finfo(dtype).max)


def _same_dtype(ref, ref_name: str, x, name: str) -> None:
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


def _count(x, name: str, minimum: int, why: str = "") -> int:
    """x as a Python int >= minimum (any integer type but bool), else TypeError / ValueError."""
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name}: expected an int >= {minimum}, got bool")
    try:
        x = operator.index(x)
    except TypeError:
        raise TypeError(f"{name}: expected an int >= {minimum}, got {type(x).__name__}") from None
    if x < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}{why}, got {x}")
    return int(x)


def _check_out(bk, out, shape, dtype, name: str = "out"):
    """Checks a user-provided output array (shape, dtype, writable, no self-overlapping strides)."""
    if out.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {out.dtype}")
    if out.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {out.shape}")
    if not bk.writable(out):
        raise ValueError(f"{name}: the array is read-only")
    if _self_overlapping(out):
        raise ValueError(f"{name}: has zero or overlapping strides (several elements share memory, e.g. a "
                         "np.broadcast_to or as_strided view); pass a real array")
    return out


def _self_overlapping(a) -> bool:
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


def _in_place(bk, a, name: str) -> None:
    """An array the op updates in place: C-contiguous, aligned and writable (a copy would be lost)."""
    if not (a.flags.c_contiguous and bk.aligned(a)):
        raise ValueError(f"{name}: must be C-contiguous and aligned (it is updated in place; a copy would be "
                         "silently lost)")
    if not bk.writable(a):
        raise ValueError(f"{name}: the array is read-only (it is updated in place)")


def _distinct(bk, named) -> None:
    """The arrays of `named` [(name, array)] share no memory (each is updated in place once)."""
    for i in range(len(named)):
        for j in range(i + 1, len(named)):
            if named[i][1].size and bk.xp.may_share_memory(named[i][1], named[j][1]):
                raise ValueError(f"{named[j][0]}: shares memory with {named[i][0]}; the state arrays must be "
                                 "distinct")


# ---- layouts ---------------------------------------------------------------------------------------

def _same_view(bk, a, b) -> bool:
    return bk.address(a) == bk.address(b) and a.shape == b.shape and a.strides == b.strides


def _result_buffer(bk, out, shape, dtype, inputs=(), in_place_ok=()):
    """The C-contiguous array the kernel writes: `out` itself when it is C-contiguous and does not overlap
    an input (or is exactly one of `in_place_ok`, for element-wise ops), else a fresh array (copied into
    `out` afterwards by _commit)."""
    if out is None:
        return bk.xp.empty(shape, dtype)
    if out.flags.c_contiguous and bk.aligned(out):
        for x in inputs:
            if bk.xp.may_share_memory(out, x) and not any(_same_view(bk, out, y) for y in in_place_ok if y is x):
                break
        else:
            return out
    return bk.xp.empty(shape, dtype)


def _commit(bk, out, buf):
    if out is None:
        return buf
    if buf is not out:
        bk.xp.copyto(out, buf)
    return out


def _elementwise_layout(bk, *arrays):
    """C-contiguous views of same-layout operands without copying when all are C- or all F-contiguous;
    returns (views, transposed)."""
    if all(a.flags.c_contiguous and bk.aligned(a) for a in arrays):
        return arrays, False
    if all(a.flags.f_contiguous and bk.aligned(a) for a in arrays):
        return tuple(a.T for a in arrays), True
    return tuple(contiguous(bk, a) for a in arrays), False


def _elem_strides(bk, a):
    """(a, element strides); copies `a` in the rare case a stride is not a multiple of the item size."""
    if any(s % a.itemsize for s in a.strides) or not bk.aligned(a):
        a = a.copy()
    return a, tuple(s // a.itemsize for s in a.strides)


def _rows_last(bk, x, axis: int):
    """x with `axis` moved last, C-contiguous (a view when it already is)."""
    return contiguous(bk, bk.xp.moveaxis(x, axis, -1) if axis != x.ndim - 1 else x)


def _batch_offsets(a, estrides, core: int, batch_shape, map_axis=None) -> np.ndarray:
    """Element offsets (host int64) of each matrix of `a` (its last `core` dims) over the broadcast
    `batch_shape`. `map_axis=(axis, group)` makes batch index h along `axis` read a's index h // group (GQA)."""
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

def _gemm(bk, a, b, buf, batch_shape, bias=None, relu=False) -> None:
    """buf[batch] = a[batch] @ b[batch] (+ bias, relu) with a (..., M, K), b (..., K, N) of any strides."""
    if bk.half(a.dtype):
        # float16 / bfloat16 on the CPU: a and b read in place and widened while packing, float32 products
        # into a float32 buffer, rounded into buf
        c = bk.xp.empty(buf.shape, np.float32)
        a, ea = _elem_strides(bk, a)
        b, eb = _elem_strides(bk, b)
        a_off = bk.offsets(_batch_offsets(a, ea, 2, batch_shape))
        b_off = bk.offsets(_batch_offsets(b, eb, 2, batch_shape))
        bk.gemm_half(a, b, c, a_off, b_off, a.shape[-2], b.shape[-1], a.shape[-1], ea, eb,
                     None if bias is None else bk.widen(bias), relu)
        bk.narrow(c, buf)
        return
    a, ea = _elem_strides(bk, a)
    b, eb = _elem_strides(bk, b)
    M, K = a.shape[-2:]
    N = b.shape[-1]
    a_off = bk.offsets(_batch_offsets(a, ea, 2, batch_shape))
    b_off = bk.offsets(_batch_offsets(b, eb, 2, batch_shape))
    bk.gemm(a, b, buf, a_off, b_off, M, N, K, ea, eb, bias, relu)


def matmul(a, b, *, out=None):
    """Matrix product with numpy.matmul's semantics.

    a: (..., M, K) or (K,); b: (..., K, N) or (K,); float32, float64, float16 or bfloat16 (float32/float16 on the
    GPU), one dtype.
    1-D operands are promoted to matrices and the added dimension removed from the result; batch dimensions
    broadcast. Any strides (transposed, negative, Fortran-ordered views) are read directly, without copies.
    out: optional array of the result's shape and dtype, written in place and returned.
    Returns an array of shape broadcast(a.shape[:-2], b.shape[:-2]) + (M, N) (minus promoted dims).
    Raises TypeError for non-arrays and non-float or mixed dtypes; ValueError for 0-d operands,
    mismatched inner dimensions or batch shapes that do not broadcast.
    """
    if type(a) is _ndarray and type(b) is _ndarray:
        c = _C.matmul2d(a, b, out)  # the common 2-D case with the least per-call overhead; None if not it
        if c is not None:
            return c
    elif (out is None and (av := torch_view(a)) is not None and (bv := torch_view(b)) is not None
          and (c := _C.matmul2d(av, bv, None)) is not None):
        return _backend._from_numpy(c)
    bk, (a, b, out) = adopt("matmul", {"a": a, "b": b, "out": out}, ("out",))
    if bk.fast and (c := _C.matmul2d(a, b, out)) is not None:
        return bk.wrap(c)
    with bk.scope():
        return bk.wrap(_matmul(bk, a, b, out))


def _matmul(bk, a, b, out=None):
    _floats(bk, a, "a")
    _floats(bk, b, "b")
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
        _check_out(bk, out, shape, a.dtype)
    buf = _result_buffer(bk, out, shape, a.dtype, (a, b))
    _gemm(bk, a2, b2, buf.reshape(batch + (M, N)), batch)
    return _commit(bk, out, buf)


def _linear_shapes(x, weight) -> Tuple[int, int]:
    """(in, out) of x (..., in) @ weight (in, out), or a ValueError naming the argument whose shape is wrong."""
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
    if type(x) is _ndarray and type(weight) is _ndarray:
        y = _C.linear_fast(x, weight, bias, activation)
        if y is not None:
            return y
    elif ((xv := torch_view(x)) is not None and (wv := torch_view(weight)) is not None
          and ((bv := bias) is None or (bv := torch_view(bias)) is not None)
          and (y := _C.linear_fast(xv, wv, bv, activation)) is not None):
        return _backend._from_numpy(y)
    bk, (x, weight, bias) = adopt("linear", {"x": x, "weight": weight, "bias": bias})
    if bk.fast and (y := _C.linear_fast(x, weight, bias, activation)) is not None:
        return bk.wrap(y)
    _floats(bk, x, "x")
    _floats(bk, weight, "weight")
    _same_dtype(x, "x", weight, "weight")
    if activation not in (None, "relu"):
        raise ValueError(f"activation: expected None or 'relu', got {activation!r}")
    n_in, n_out = _linear_shapes(x, weight)
    if bias is not None:
        _floats(bk, bias, "bias")
        _same_dtype(x, "x", bias, "bias")
        if bias.shape != (n_out,):
            raise ValueError(f"bias: expected shape ({n_out},), got {bias.shape}")
    with bk.scope():
        bias = None if bias is None else contiguous(bk, bias)
        x2 = x.reshape(math.prod(x.shape[:-1]), n_in)
        y = bk.xp.empty((x2.shape[0], n_out), x.dtype)
        _gemm(bk, x2, weight, y, (), bias, activation == "relu")
        return bk.wrap(y.reshape(x.shape[:-1] + (n_out,)))


def linear_backward(grad_output, x, weight, *, bias=True, x_grad=True):
    """Gradients of y = x @ weight + bias with respect to x, weight and bias.

    grad_output: (..., out), the gradient of the loss with respect to y; x: (..., in); weight: (in, out);
    one float dtype. bias: whether the forward had a bias (then its gradient is returned, else None).
    x_grad: whether to compute grad_x; pass False for a first layer, whose input needs no gradient (it
    saves one of the two products), and None is returned in its place.
    For `linear(..., activation="relu")` pass `relu_backward(grad, y)` as grad_output.
    Returns (grad_x (..., in) or None, grad_weight (in, out), grad_bias (out,) or None), new arrays in
    x's dtype: grad_x = grad_output @ weight.T, grad_weight = x2.T @ g2 and grad_bias = g2.sum(0), with
    x2, g2 the 2-D (rows, features) views (float16 sums in float32). Both products run on the matmul kernel
    reading the transposes in place (no copies).
    Raises TypeError for non-arrays and non-float or mixed dtypes, ValueError for mismatched shapes.
    """
    bk, (g, x, weight) = adopt("linear_backward", {"grad_output": grad_output, "x": x, "weight": weight})
    _floats(bk, g, "grad_output")
    _floats(bk, x, "x")
    _floats(bk, weight, "weight")
    _same_dtype(x, "x", weight, "weight")
    _same_dtype(x, "x", g, "grad_output")
    bias = _flag(bias, "bias")
    x_grad = _flag(x_grad, "x_grad")
    n_in, n_out = _linear_shapes(x, weight)
    want = x.shape[:-1] + (n_out,)
    if g.shape != want:
        raise ValueError(f"grad_output: expected shape {want} (x's leading dimensions + weight's out), "
                         f"got {g.shape}")
    rows = math.prod(x.shape[:-1])
    with bk.scope():
        x2 = x.reshape(rows, n_in)
        g2 = g.reshape(rows, n_out)
        grad_x = matmul(g2, weight.T).reshape(x.shape) if x_grad else None  # (rows, out) @ (out, in)
        grad_w = matmul(x2.T, g2)  # (in, rows) @ (rows, out); rows == 0 gives zeros
        acc = np.float32 if x.dtype.itemsize == 2 else x.dtype  # float16 / bfloat16 sums in float32
        grad_b = g2.sum(axis=0, dtype=acc).astype(x.dtype, copy=False) if bias else None
        return bk.wrap((grad_x, grad_w, grad_b))


# ---- relu -----------------------------------------------------------------------------------------

def relu(x, *, out=None):
    """max(x, 0) element-wise; NaN stays NaN (as np.maximum).

    x: any shape, float32, float64, float16 or bfloat16 (float32/float16 on the GPU). out: optional array of x's shape and dtype;
    may be x itself (in place). Returns the result (out when given).
    """
    if type(x) is _ndarray:
        y = _C.relu_fast(x, out)
        if y is not None:
            return y
    elif out is None and (xv := torch_view(x)) is not None and (y := _C.relu_fast(xv, None)) is not None:
        return _backend._from_numpy(y)
    bk, (x, out) = adopt("relu", {"x": x, "out": out}, ("out",))
    if bk.fast and (y := _C.relu_fast(x, out)) is not None:
        return bk.wrap(y)
    _floats(bk, x, "x")
    if out is not None:
        _check_out(bk, out, x.shape, x.dtype)
    with bk.scope():
        if out is not None and out.flags.c_contiguous and bk.aligned(out) and _same_view(bk, out, x):
            bk.relu(x, x)
            return bk.wrap(out)
        if out is None:
            (xv,), transposed = _elementwise_layout(bk, x)
            y = bk.xp.empty(xv.shape, x.dtype)
            bk.relu(xv, y)
            return bk.wrap(y.T if transposed else y)
        buf = _result_buffer(bk, out, x.shape, x.dtype, (x,))
        bk.relu(contiguous(bk, x), buf)
        return bk.wrap(_commit(bk, out, buf))


def relu_backward(grad_output, x, *, out=None):
    """Gradient of relu: grad_output where x > 0, else 0 (also 0 where x is NaN).

    grad_output and x: same shape and dtype. out: optional array of that shape and dtype.
    """
    if type(x) is _ndarray and type(grad_output) is _ndarray:
        y = _C.relu_backward_fast(grad_output, x, out)
        if y is not None:
            return y
    elif (out is None and (gv := torch_view(grad_output)) is not None and (xv := torch_view(x)) is not None
          and (y := _C.relu_backward_fast(gv, xv, None)) is not None):
        return _backend._from_numpy(y)
    bk, (g, x, out) = adopt("relu_backward", {"grad_output": grad_output, "x": x, "out": out}, ("out",))
    if bk.fast and (y := _C.relu_backward_fast(g, x, out)) is not None:
        return bk.wrap(y)
    _floats(bk, g, "grad_output")
    _floats(bk, x, "x")
    _same_dtype(x, "x", g, "grad_output")
    if g.shape != x.shape:
        raise ValueError(f"grad_output: shape {g.shape} does not match x's shape {x.shape}")
    if out is not None:
        _check_out(bk, out, x.shape, x.dtype)
    with bk.scope():
        if out is None:
            (gv, xv), transposed = _elementwise_layout(bk, g, x)
            y = bk.xp.empty(xv.shape, x.dtype)
            bk.relu_backward(gv, xv, y)
            return bk.wrap(y.T if transposed else y)
        in_place = (g,) if _same_view(bk, out, g) else ((x,) if _same_view(bk, out, x) else ())
        buf = _result_buffer(bk, out, x.shape, x.dtype, (g, x), in_place)
        bk.relu_backward(contiguous(bk, g), contiguous(bk, x), buf)
        return bk.wrap(_commit(bk, out, buf))


# ---- softmax family -------------------------------------------------------------------------------

def _softmax(x, axis, out, log: bool, name: str):
    bk, (x, out) = adopt(name, {"x": x, "out": out}, ("out",))
    if bk.fast and (y := _C.softmax_fast(x, axis, out, log)) is not None:
        return bk.wrap(y)
    _floats(bk, x, "x")
    if x.ndim == 0:
        raise ValueError(f"{name}: x must have at least 1 dimension, got a 0-d array")
    axis = _axis(axis, x.ndim)
    if out is not None:
        _check_out(bk, out, x.shape, x.dtype)
    with bk.scope():
        if x.size == 0:
            return bk.wrap(out if out is not None else bk.xp.empty(x.shape, x.dtype))
        xr = _rows_last(bk, x, axis)
        if axis == x.ndim - 1:
            buf = _result_buffer(bk, out, x.shape, x.dtype, (x,), (x,))
        else:
            buf = bk.xp.empty(xr.shape, x.dtype)
        bk.softmax(xr, buf, log)
        res = bk.xp.moveaxis(buf, -1, axis) if axis != x.ndim - 1 else buf
        return bk.wrap(_commit(bk, out, res))


def softmax(x, axis=-1, *, out=None):
    """exp(x) / sum(exp(x)) along `axis`, computed safely for large magnitudes (max subtracted).

    x: float32/float64/float16/bfloat16 (float32/float16 on the GPU), at least 1-D; axis: int (default -1); out: optional array
    like x (may be x). A row containing +inf or NaN gives NaN, as the NumPy formula does.
    """
    if type(x) is _ndarray:
        y = _C.softmax_fast(x, axis, out, False)
        if y is not None:
            return y
    elif out is None and (xv := torch_view(x)) is not None and (y := _C.softmax_fast(xv, axis, None, False)) is not None:
        return _backend._from_numpy(y)
    return _softmax(x, axis, out, False, "softmax")


def log_softmax(x, axis=-1, *, out=None):
    """x - max - log(sum(exp(x - max))) along `axis`. Same arguments as softmax."""
    if type(x) is _ndarray:
        y = _C.softmax_fast(x, axis, out, True)
        if y is not None:
            return y
    elif out is None and (xv := torch_view(x)) is not None and (y := _C.softmax_fast(xv, axis, None, True)) is not None:
        return _backend._from_numpy(y)
    return _softmax(x, axis, out, True, "log_softmax")


def _softmax_backward(grad_output, output, axis, log: bool, name: str):
    bk, (g, y) = adopt(name, {"grad_output": grad_output, "output": output})
    _floats(bk, g, "grad_output")
    _floats(bk, y, "output")
    _same_dtype(y, "output", g, "grad_output")
    if g.shape != y.shape:
        raise ValueError(f"grad_output: shape {g.shape} does not match output's shape {y.shape}")
    if y.ndim == 0:
        raise ValueError(f"{name}: output must have at least 1 dimension, got a 0-d array")
    axis = _axis(axis, y.ndim)
    with bk.scope():
        if y.size == 0:
            return bk.wrap(bk.xp.empty(y.shape, y.dtype))
        gr, yr = _rows_last(bk, g, axis), _rows_last(bk, y, axis)
        buf = bk.xp.empty(yr.shape, y.dtype)
        bk.softmax_backward(gr, yr, buf, log)
        return bk.wrap(bk.xp.moveaxis(buf, -1, axis) if axis != y.ndim - 1 else buf)


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


_REDUCTIONS = ("mean", "sum", "none")


def _cross_entropy_args(reduction, ignore_index) -> Tuple[str, int]:
    """Checked (reduction, ignore_index) of a cross_entropy call."""
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    ignore_index = int(ignore_index)
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index: {ignore_index} does not fit in int64")
    return reduction, ignore_index


def cross_entropy(logits, labels, *, reduction="mean", ignore_index=-100):
    """Negative log-likelihood of softmax(logits) at the labels, and its gradient, in one fused pass
    (torch.nn.functional.cross_entropy's reduction and ignore_index).

    logits: (N, C) float32/float64/float16/bfloat16 (float32/float16 on the GPU); labels: (N,) int32 or int64 with values in
    [0, C) or equal to ignore_index (default -100; those rows get zero loss and zero gradient and do not
    count). reduction: "mean" (default: the mean over the rows not ignored; NaN when there are none),
    "sum", or "none" (the per-row losses).
    Returns (loss, grad): loss a Python float ("mean", "sum") or an (N,) array of the logits' dtype
    ("none"); grad (N, C) is the gradient of the loss ("none": of the summed per-row losses, so row i
    times the upstream gradient of loss[i] gives the chain rule) = (softmax(logits) - onehot(labels))
    divided by the number of rows not ignored for "mean". A label outside [0, C) that is not
    ignore_index is a ValueError (checking the labels synchronizes on the GPU); a bad reduction a
    ValueError, a non-int ignore_index a TypeError.
    """
    if type(logits) is _ndarray:
        r = _C.cross_entropy_fast(logits, labels, reduction, ignore_index)
        if r is not None:
            return r
    bk, (logits, labels) = adopt("cross_entropy", {"logits": logits, "labels": labels})
    if bk.fast and (r := _C.cross_entropy_fast(logits, labels, reduction, ignore_index)) is not None:
        return bk.wrap(r)
    reduction, ignore_index = _cross_entropy_args(reduction, ignore_index)
    _floats(bk, logits, "logits")
    if labels.dtype not in _INTS:
        raise TypeError(f"labels: expected dtype int32 or int64, got {labels.dtype}")
    if logits.ndim != 2:
        raise ValueError(f"logits: expected 2 dimensions (N, C), got shape {logits.shape}")
    n, c = logits.shape
    if labels.shape != (n,):
        raise ValueError(f"labels: expected shape ({n},) to match logits {logits.shape}, got {labels.shape}")
    with bk.scope():
        grad = bk.xp.empty((n, c), logits.dtype)
        rows = bk.xp.zeros(n, logits.dtype) if reduction == "none" else None
        kept = labels != ignore_index
        count = int(kept.sum())
        if count:
            kept_labels = labels[kept]
            lo, hi = int(kept_labels.min()), int(kept_labels.max())
            if lo < 0 or hi >= c:
                bad = lo if lo < 0 else hi
                raise ValueError(f"labels: value {bad} is out of range; expected 0 <= label < {c} "
                                 f"(or ignore_index={ignore_index})")
        if n and c:
            lab = contiguous(bk, labels.astype(np.int64, copy=False))
            scale = 1.0 / count if reduction == "mean" and count else 1.0
            total = bk.cross_entropy(contiguous(bk, logits), lab, grad, scale, ignore_index, rows)
        else:  # C == 0 with rows not ignored was refused above (every label out of range)
            total = 0.0
            grad.fill(0)
        if reduction == "none":
            return bk.wrap((rows, grad))
        if reduction == "sum":
            return total, bk.wrap(grad)
        return (total / count if count else float("nan")), bk.wrap(grad)


# ---- attention ------------------------------------------------------------------------------------

def _rows_unit(bk, a):
    """a with unit stride in its last dim and non-negative strides elsewhere (copied only if needed)."""
    if (a.strides[-1] != a.itemsize or any(s < 0 for s in a.strides) or any(s % a.itemsize for s in a.strides)
            or not bk.aligned(a)):
        return bk.xp.array(a, order="C")
    return a


class _Attention:
    """Validated, prepared attention operands shared by the forward and backward entry points."""

    def __init__(self, bk, q, k, v, attn_mask, is_causal, scale, enable_gqa):
        _floats(bk, q, "query")
        _floats(bk, k, "key")
        _floats(bk, v, "value")
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
            if not abs(scale) <= _largest(q.dtype):  # NaN, inf or overflowing the dtype
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
        # (Before the broadcast, which such heads fail too: the hint is what the caller reads.)
        if (not enable_gqa and q.ndim >= 3 and k.ndim >= 3 and q.shape[-3] != k.shape[-3]
                and 1 not in (q.shape[-3], k.shape[-3])):
            raise ValueError(f"query has {q.shape[-3]} heads and key has {k.shape[-3]}: pass enable_gqa=True "
                             "for grouped-query attention")
        batch = _broadcast_batch([qb, kb, vb], ["query", "key", "value"])
        if attn_mask is not None:
            if attn_mask.dtype != np.bool_ and attn_mask.dtype != q.dtype:
                raise TypeError(f"attn_mask: expected dtype bool or {q.dtype} (the query's), got {attn_mask.dtype}")
            # Broadcast *to* the scores' shape: a mask may not add dimensions (as in torch, whose output
            # keeps the query's shape).
            try:
                fits = np.broadcast_shapes(attn_mask.shape, batch + (L, S)) == batch + (L, S)
            except ValueError:
                fits = False
            if not fits:
                raise ValueError(f"attn_mask: shape {attn_mask.shape} does not broadcast to {batch + (L, S)}")
        self.bk, self.dtype, self.batch, self.L, self.S, self.E, self.Ev = bk, q.dtype, batch, L, S, E, Ev
        self.nbatch = math.prod(batch)
        self.causal, self.scale, self.group = is_causal, scale, group
        self.q_shape, self.k_shape, self.v_shape = q.shape, k.shape, v.shape
        self.attn_mask = attn_mask

    def plan(self, dot=False):
        """Kernel layouts: unit stride in the last dim, non-negative strides (copied only if needed), and
        each operand's element offsets over the broadcast batch (allocates: call inside bk.scope()).
        dot: for the kernels that, on a CPU with the bfloat16 dot product, read bfloat16 q, k, v as they are."""
        bk, q, k, v = self.bk, *self.operands
        if bk.half(self.dtype):  # float16 / bfloat16 on the CPU: the float32 kernels on widened copies
            if not (dot and bk.bf16_dot(self.dtype)):
                q, k, v = bk.widen(q), bk.widen(k), bk.widen(v)
            if self.attn_mask is not None and self.attn_mask.dtype == self.dtype:
                self.attn_mask = bk.widen(self.attn_mask)
        q, k, v = _rows_unit(bk, q), _rows_unit(bk, k), _rows_unit(bk, v)
        self.q, self.k, self.v = q, k, v
        eq, ek, ev = (tuple(s // a.itemsize for s in a.strides) for a in (q, k, v))
        self.rows = (eq[-2], ek[-2], ev[-2])
        self.q_off = self._offsets(q, eq, None)
        self.k_off = self._offsets(k, ek, self.group)
        self.v_off = self._offsets(v, ev, self.group)
        self.mask, self.m_off, self.m_rs, self.m_cs = None, bk.offsets(_ZERO_OFFSETS), 0, 0
        if self.attn_mask is not None:
            mfull, em = _elem_strides(bk, bk.xp.broadcast_to(self.attn_mask, self.batch + (self.L, self.S)))
            if any(s < 0 for s in em):
                mfull, em = _elem_strides(bk, bk.xp.ascontiguousarray(mfull))
            self.mask, self.m_rs, self.m_cs = mfull, em[-2], em[-1]
            self.m_off = self._offsets(mfull, em, None)
        return self

    def _offsets(self, a, estrides, group):
        nb = a.ndim - 2
        offs = _batch_offsets(a, estrides, 2, self.batch, (nb - 1, group) if group else None)
        if offs.size != self.nbatch:
            offs = np.ascontiguousarray(np.broadcast_to(offs, (self.nbatch,)), dtype=np.int64)
        return self.bk.offsets(offs)

    def empty(self):
        return self.nbatch == 0 or self.L == 0

    def reduce_to(self, grad, shape, grouped):
        """Sums a per-head gradient (batch + core) down to an operand's shape: over the query heads of a
        GQA group (`grouped`: key and value) and over broadcast batch dimensions."""
        g = reduce_grad(grad, shape, len(self.batch), self.group if grouped else None)
        return self.bk.xp.ascontiguousarray(g.astype(self.dtype, copy=False))


def _attention(op, arrays, attn_mask, is_causal, scale, enable_gqa, *extra):
    bk, (q, k, v, mask, *rest) = adopt(op, {"query": arrays[0], "key": arrays[1], "value": arrays[2],
                                            "attn_mask": attn_mask, **dict(extra)})
    at = _Attention(bk, q, k, v, mask, is_causal, scale, enable_gqa)
    at.operands = (q, k, v)
    return bk, at, rest


def _causal_nonfinite(bk, at) -> None:
    """Writes the causal mask out when the backend's causal forward kernel may not skip the keys above the
    diagonal. It skips them without reading them, but PyTorch and the oracle add -inf to those scores (NaN where
    a score is NaN or +inf) and multiply their zero probabilities by the values (NaN where a value is NaN or
    inf). The CPU kernels check the rows a skipped block involves themselves (forward and backward); the GPU's
    forward gets the mask written out (every key read; O(L * S) bytes) when an operand holds a non-finite
    element. Call inside bk.scope()."""
    if at.causal and at.L and at.S > 1 and not bk.causal_may_skip(at.operands):
        at.attn_mask, at.causal = bk.xp.tri(at.L, at.S, dtype=bool), False


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False, *, return_lse=False, rng=None):
    """softmax(query @ key^T * scale + mask) @ value, with PyTorch's semantics, flash-style.

    query (..., L, E), key (..., S, E), value (..., S, Ev) -> (..., L, Ev); leading dimensions
    broadcast as in matmul (2-D inputs allowed). float32/float64/float16/bfloat16 (float32/float16 on the
    GPU), one dtype.
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
    (-inf for a row with no allowed key; float32 on the GPU for every dtype): what
    scaled_dot_product_attention_backward needs. With dropout_p > 0 the result is then
    (out, lse, rng_state), rng_state the (seed, offset) pair of ints the backward needs to regenerate the
    mask; with dropout_p == 0 it is (out, lse).
    Keys are processed in tiles with an online softmax: no L x S matrix (nor mask) is ever held.
    """
    drop = forward_dropout(dropout_p, rng)
    return_lse = _flag(return_lse, "return_lse")
    bk, at, _ = _attention("scaled_dot_product_attention", (query, key, value), attn_mask, is_causal, scale,
                           enable_gqa)
    if drop is not None:
        check_dropout_sizes(at.nbatch, at.L, at.S)
    with bk.scope():
        _causal_nonfinite(bk, at)
        out = bk.xp.empty(at.batch + (at.L, at.Ev), at.dtype)
        lse = bk.xp.empty(at.batch + (at.L,), bk.lse_dtype(at.dtype)) if return_lse else None
        if not at.empty() and (out.size or lse is not None):  # Ev == 0 still has an lse
            bk.sdpa(at.plan(dot=True), out.reshape(at.nbatch, at.L, at.Ev),
                    None if lse is None else lse.reshape(at.nbatch, at.L), drop)
        elif lse is not None:
            lse.fill(-np.inf)
        if not return_lse:
            return bk.wrap(out)
        return bk.wrap((out, lse)) if drop is None else bk.wrap((out, lse)) + (drop.rng_state,)


def scaled_dot_product_attention_backward(grad_output, query, key, value, output, lse, attn_mask=None,
                                          is_causal=False, scale=None, enable_gqa=False, *, dropout_p=0.0,
                                          rng_state=None):
    """Gradients of scaled_dot_product_attention, flash-style (scores recomputed tile by tile).

    grad_output and output: (..., L, Ev) (output is the forward's result), lse: (..., L) from the forward
    with return_lse=True; the other arguments as given to the forward. With dropout_p > 0, rng_state is
    the (seed, offset) the forward returned (required; the mask is regenerated, never stored). Returns
    (grad_query, grad_key, grad_value) shaped like query, key and value (summed over the query heads
    that share a key/value head with enable_gqa, and over broadcast batch dimensions).
    Memory beyond the gradients is O(block) per thread; threads take whole (batch, head) pairs. (On the
    GPU it is composed of the CUDA matmul and element-wise operations: fastnn/_attention_grad.py.)
    """
    drop = backward_dropout(dropout_p, rng_state)
    bk, at, (g, o, lse) = _attention("scaled_dot_product_attention_backward", (query, key, value), attn_mask,
                                     is_causal, scale, enable_gqa,
                                     ("grad_output", grad_output), ("output", output), ("lse", lse))
    if drop is not None:
        check_dropout_sizes(at.nbatch, at.L, at.S)
    oshape = at.batch + (at.L, at.Ev)
    for x, n in ((g, "grad_output"), (o, "output"), (lse, "lse")):
        _floats(bk, x, n)
    for x, n in ((g, "grad_output"), (o, "output")):
        _same_dtype(at.operands[0], "query", x, n)
    if lse.dtype != bk.lse_dtype(at.dtype):
        raise TypeError(f"lse: expected a {bk.lse_dtype(at.dtype)} array (the forward's lse for {at.dtype} "
                        f"inputs), got dtype {lse.dtype}")
    if g.shape != oshape:
        raise ValueError(f"grad_output: expected shape {oshape} (the forward's output), got {g.shape}")
    if o.shape != oshape:
        raise ValueError(f"output: expected shape {oshape} (the forward's output), got {o.shape}")
    if lse.shape != at.batch + (at.L,):
        raise ValueError(f"lse: expected shape {at.batch + (at.L,)}, got {lse.shape}")
    with bk.scope():  # (no _causal_nonfinite: the GPU's composed backward reads every key; the CPU's checks)
        dq, dk, dv = bk.sdpa_backward(at.plan(dot=True), g, o, lse, matmul, drop)
        return bk.wrap((at.reduce_to(dq, at.q_shape, False), at.reduce_to(dk, at.k_shape, True),
                        at.reduce_to(dv, at.v_shape, True)))


# ---- Adam -----------------------------------------------------------------------------------------

def adam_scalars(lr: float, beta1: float, beta2: float, step: int) -> Tuple[float, float]:
    """(step_size, sqrt of the second bias correction) of one Adam step, host-side Python floats computed
    exactly as torch computes them; shared by every Adam entry point."""
    return lr / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5


def adam_hyper(lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize,
               names=("lr", "beta1", "beta2", "eps", "weight_decay")) -> dict:
    """Adam's hyper-parameters, checked (`names`: how the caller calls them, e.g. betas[0]); a dict of
    adam_update's keyword arguments."""
    n_lr, n_b1, n_b2, n_eps, n_wd = names
    h = dict(lr=_real(lr, n_lr), beta1=_real(beta1, n_b1), beta2=_real(beta2, n_b2), eps=_real(eps, n_eps),
             weight_decay=_real(weight_decay, n_wd),
             decoupled_weight_decay=_flag(decoupled_weight_decay, "decoupled_weight_decay"),
             maximize=_flag(maximize, "maximize"))
    # Finite: an infinite lr, eps or weight decay only turns parameters into inf/NaN.
    for k, name in (("lr", n_lr), ("eps", n_eps), ("weight_decay", n_wd)):
        if not 0 <= h[k] < math.inf:
            raise ValueError(f"{name}: expected a finite number >= 0, got {h[k]}")
    for k, name in (("beta1", n_b1), ("beta2", n_b2)):
        if not 0 <= h[k] < 1:
            raise ValueError(f"{name}: expected 0 <= {name} < 1, got {h[k]}")
    return h


def adam_step(bk, p, g, m, v, vmax, step: int, h: dict, written=None) -> None:
    """The kernel call of one checked Adam step (adam_update's and Adam.step's): grad copied when it is not
    C-contiguous or shares memory with one of the `written` arrays (default: all the updated ones; Adam
    passes only the parameter, as its state arrays are its own)."""
    if p.size == 0:
        return
    if not (g.flags.c_contiguous and bk.aligned(g)) or any(
            bk.xp.may_share_memory(g, s) for s in (written or (p, m, v, vmax)) if s is not None):
        g = bk.xp.array(g, order="C", copy=True)
    lr, beta1, beta2 = h["lr"], h["beta1"], h["beta2"]
    bk.adam(p, g, m, v, vmax, lr, beta1, beta2, h["eps"], h["weight_decay"], *adam_scalars(lr, beta1, beta2, step),
            h["decoupled_weight_decay"], h["maximize"])


def adam_update(param, grad, exp_avg, exp_avg_sq, *, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=0.0, decoupled_weight_decay=False, maximize=False, max_exp_avg_sq=None):
    """One fused, in-place Adam step with torch.optim.Adam's arithmetic.

    param, exp_avg, exp_avg_sq (and max_exp_avg_sq for AMSGrad) are updated in place: they must be
    C-contiguous, writable, of one shape, and distinct; float32/float64, one dtype; float16/bfloat16 params
    and grads with float32 moments (mixed precision) or moments of the params' dtype (on the GPU: param
    float32 or float16 and the moments always float32, as float16 moments would underflow). grad: param's
    shape and dtype, any layout. step: the step number, counting from 1 (bias corrections use it).
    decoupled_weight_decay=True gives AdamW; maximize ascends. Returns None (does not synchronize).
    JAX arrays are read-only: passing one as an updated array is a ValueError.
    """
    writes = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    bk, (p, g, m, v, vmax) = adopt("adam_update", {"param": param, "grad": grad, "exp_avg": exp_avg,
                                                   "exp_avg_sq": exp_avg_sq, "max_exp_avg_sq": max_exp_avg_sq},
                                   writes)
    _floats(bk, p, "param")
    _in_place(bk, p, "param")
    _floats(bk, g, "grad")
    _same_dtype(p, "param", g, "grad")
    if g.shape != p.shape:
        raise ValueError(f"grad: shape {g.shape} does not match param's shape {p.shape}")
    states = [("param", p)]
    allowed = bk.moment_dtypes(p.dtype)
    for x, name in ((m, "exp_avg"), (v, "exp_avg_sq"), (vmax, "max_exp_avg_sq")):
        if x is None:
            continue
        _floats(bk, x, name)
        if len(allowed) == 1 and allowed[0] != p.dtype and x.dtype != allowed[0]:
            raise TypeError(f"{name}: expected a {allowed[0]} array (the moments are {allowed[0]} on the "
                            f"{bk.kind}), got dtype {x.dtype}")
        if len(allowed) > 1 and x.dtype not in allowed:
            raise TypeError(f"{name}: expected a {' or '.join(map(str, allowed))} array (the moments of "
                            f"{p.dtype} parameters), got dtype {x.dtype}")
        if allowed == (p.dtype,):
            _same_dtype(p, "param", x, name)
        if x.shape != p.shape:
            raise ValueError(f"{name}: shape {x.shape} does not match param's shape {p.shape}")
        _in_place(bk, x, name)
        states.append((name, x))
    _distinct(bk, states)
    step = _count(step, "step", 1, " (steps count from 1)")
    h = adam_hyper(lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize)
    with bk.scope():
        adam_step(bk, p, g, m, v, vmax, step, h)


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
    """The CPU kernel path in use: 'generic', 'avx2', 'avx512' or 'avx512bf16' (avx512 with the bfloat16
    matmul and attention on the AVX512-BF16 dot product)."""
    return _C.isa()


def set_cpu_isa(name) -> None:
    """Switches the CPU kernel path ('generic', 'avx2', 'avx512' or 'avx512bf16') for all later calls.
    ValueError when that path is not compiled in or this CPU does not support it."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    supported = _C.isa_supported().split(",")
    if not _C.set_isa(name):
        raise ValueError(f"name: CPU ISA path {name!r} is not available here; expected one of {supported}")
