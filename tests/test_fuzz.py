"""Fuzz: every public op called with random shapes (0-d to 5-D, empty dims), every numpy dtype, any strides
(transposed, negative, zero-stride broadcasts, self-overlapping and unaligned views), read-only arrays,
and arguments replaced by junk (None, Python scalars and lists, strings, wrong keyword types).

The contract checked on every call: it returns the float64 oracle's result (and leaves its inputs alone),
or raises TypeError / ValueError; never another exception, a crash or a hang. A read-only, zero-stride or
self-overlapping array given as an output (out=, the adam_update state) must be a ValueError.
FASTNN_FUZZ_EXAMPLES sets the examples per op (default 250).
"""
import collections
import faulthandler
import inspect
import math
import numbers
import os
import random
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, seed, settings, strategies as st

import fastnn
from fastnn import reference as ref
from conftest import assert_close, f64, softmax_backward_scale
from op_table import OP_IDS, OPS as TABLE

EXAMPLES = int(os.environ.get("FASTNN_FUZZ_EXAMPLES", "250"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))
# A new seed each run (so runs explore), recorded: a failing test prints it (captured setup output), and
# FASTNN_FUZZ_SEED=<seed> replays that run.
SEED = int(os.environ.get("FASTNN_FUZZ_SEED") or random.SystemRandom().randrange(2**32))


@pytest.fixture(autouse=True)
def _print_seed():
    print(f"fuzz seed: FASTNN_FUZZ_SEED={SEED}")
HANG_SECONDS = 60  # one call taking longer than this is a hang: dump the stacks and exit

FLOATS = [np.dtype(np.float32), np.dtype(np.float64)]
ALL_DTYPES = [np.dtype(d) for d in (
    np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
    np.float16, np.float32, np.float64, np.longdouble, np.complex64, np.complex128, np.clongdouble,
    object, "U3", "S3", "V8", "M8[s]", "m8[s]", [("a", "f4"), ("b", "f4")], ">f4", ">f8",
)] + [np.dtype(np.float32, metadata={"fuzz": 1}), np.dtype(np.float64, metadata={"fuzz": 1})]

# Per op: calls made, results checked against the oracle, TypeError/ValueError raised.
STATS = collections.defaultdict(collections.Counter)


# ---- arrays ---------------------------------------------------------------------------------------

def values(rng, shape, dtype, special=False):
    """Random normal values in `dtype` (any dtype: cast, or objects holding Python floats)."""
    x = rng.standard_normal(shape)
    if special and x.size:
        pick = rng.random(shape) < 0.15
        x[pick] = rng.choice([np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0, -0.0], size=int(pick.sum()))
    dtype = np.dtype(dtype)
    if dtype == object:
        return x.astype(object)  # Python floats
    if dtype.kind in "USVMm" or dtype.fields:
        return np.zeros(shape, dtype)
    with np.errstate(all="ignore"):
        return x.astype(dtype)


def layout(rng, shape, dtype, kind, special=False):
    """An array of logical `shape` stored as `kind`."""
    shape = tuple(shape)
    dtype = np.dtype(dtype)
    if kind == "C":
        return values(rng, shape, dtype, special)
    if kind == "F":
        return np.array(values(rng, shape, dtype, special), order="F")
    if kind == "T":
        return values(rng, shape[::-1], dtype, special).T
    if kind == "step":
        return values(rng, tuple(2 * n for n in shape), dtype, special)[(...,) + (slice(None, None, 2),) * len(shape)]
    if kind == "neg":
        return values(rng, shape, dtype, special)[(...,) + (slice(None, None, -1),) * len(shape)]
    if kind == "readonly":
        a = values(rng, shape, dtype, special)
        a.flags.writeable = False
        return a
    if kind == "bcast":  # zero strides: np.broadcast_to of a smaller array (read-only, as numpy makes it)
        small = tuple(1 if rng.random() < 0.6 else n for n in shape)
        return np.broadcast_to(values(rng, small, dtype, special), shape)
    if kind == "bcast_w":  # zero strides, but writable: what a careless caller can still produce
        small = values(rng, tuple(1 if n > 1 else n for n in shape), dtype, special)
        return np.lib.stride_tricks.as_strided(small, shape, [0 if n > 1 else s for n, s in zip(shape, small.strides)])
    if kind == "overlap":  # every dim advances one element: neighbouring rows share memory
        n = sum(max(d - 1, 0) for d in shape) + 1
        base = values(rng, (n,), dtype, special)
        return np.lib.stride_tricks.as_strided(base, shape, (dtype.itemsize,) * len(shape))
    if kind == "unaligned":  # C-contiguous at an odd byte offset
        n = math.prod(shape)
        buf = np.zeros(n * dtype.itemsize + 1, np.uint8)
        a = buf[1:].view(dtype).reshape(shape)
        a[...] = values(rng, shape, dtype, special)
        return a
    raise ValueError(kind)


IN_LAYOUTS = ["C", "C", "C", "F", "T", "step", "neg", "readonly", "bcast", "overlap", "unaligned"]
OUT_LAYOUTS = ["C", "C", "F", "step", "neg", "unaligned", "readonly", "bcast_w", "overlap"]


def self_overlapping(a: np.ndarray) -> bool:
    """Whether two elements of `a` share bytes (brute force over the element offsets)."""
    if a.size <= 1:
        return False
    idx = np.indices(a.shape).reshape(a.ndim, -1)
    offs = np.sort(np.asarray(a.strides, dtype=np.int64) @ idx)
    return bool(np.any(np.diff(offs) < a.itemsize))


def bad_output(a) -> bool:
    """An array fastnn must refuse to write: read-only, or several elements sharing memory."""
    return isinstance(a, np.ndarray) and (not a.flags.writeable or self_overlapping(a))


# ---- junk -----------------------------------------------------------------------------------------

class Opaque:
    pass


def _valid_dropout_p(x) -> bool:
    """Whether x is a dropout probability fastnn accepts (a real number in [0, 1), not a bool)."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_)) and 0 <= float(x) < 1


@st.composite
def junk(draw, rng, like=None):
    """A wrong argument: not an array, a non-float dtype, a wrong shape or layout, a wrong Python type."""
    kinds = ["none", "int", "float", "bool", "complex", "str", "list", "tuple", "dict", "object", "npscalar",
             "array0d", "any_dtype", "any_shape", "matrix", "memoryview"]
    if type(like) is np.ndarray:  # (not a junk np.matrix from an earlier mutation: its views misbehave)
        kinds += ["same_shape_dtype"] * 4 + ["same_as_list", "extra_dim", "fewer_dims", "transposed", "other_float"]
    kind = draw(st.sampled_from(kinds))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=5)))
    if kind == "none":
        return None
    if kind == "int":
        return draw(st.sampled_from([0, 1, -1, 2, 3, 7, -7, 2**31, 2**63, -2**63]))
    if kind == "float":
        return draw(st.sampled_from([0.0, 0.5, -1.5, 1.0, float("nan"), float("inf"), 1e308]))
    if kind == "bool":
        return draw(st.booleans())
    if kind == "complex":
        return 1 + 2j
    if kind == "str":
        return draw(st.sampled_from(["", "relu", "x", "1", "float32"]))
    if kind == "list":
        return values(rng, shape, np.float64).tolist()
    if kind == "tuple":
        return (1.0, 2.0)
    if kind == "dict":
        return {"x": 1}
    if kind == "object":
        return Opaque()
    if kind == "npscalar":
        return draw(st.sampled_from([np.float32(1.5), np.float64(-2.0), np.int64(2), np.bool_(True),
                                     np.complex64(1j), np.float16(1)]))
    if kind == "array0d":
        return np.array(1.5, dtype=draw(st.sampled_from(FLOATS)))
    if kind == "any_dtype":
        return layout(rng, shape, draw(st.sampled_from(ALL_DTYPES)), draw(st.sampled_from(["C", "F", "neg"])))
    if kind == "any_shape":
        return layout(rng, shape, draw(st.sampled_from(FLOATS)), draw(st.sampled_from(IN_LAYOUTS)))
    if kind == "matrix":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            return np.matrix(values(rng, (2, 3), np.float64))
    if kind == "memoryview":
        return memoryview(values(rng, (3,), np.float32))
    if kind == "same_shape_dtype":
        return layout(rng, like.shape, draw(st.sampled_from(ALL_DTYPES)), "C")
    if kind == "same_as_list":
        return like.tolist()
    if kind == "extra_dim":
        return like[None]
    if kind == "fewer_dims":
        return like[..., 0] if like.ndim and like.shape[-1] else like.reshape(-1)
    if kind == "transposed":
        return like.T
    if kind == "other_float":
        return like.astype(np.float64 if like.dtype == np.float32 else np.float32) if like.dtype.kind in "fiub" else like
    raise AssertionError(kind)


# ---- valid argument sets, per op ------------------------------------------------------------------

dims = st.sampled_from([0, 1, 1, 2, 3, 3, 4, 5, 7])


def shape_of(draw, min_nd, max_nd=5):
    return tuple(draw(st.lists(dims, min_size=min_nd, max_size=max_nd)))


def bcast_shape(draw, shape):
    """A shape that broadcasts to `shape`: some dims set to 1, some leading dims dropped."""
    s = [draw(st.sampled_from([n, n, 1])) for n in shape]
    return tuple(s[draw(st.integers(0, len(s))):])


def in_array(draw, rng, shape, dtype, special=False):
    return layout(rng, shape, dtype, draw(st.sampled_from(IN_LAYOUTS)), special)


def maybe_out(draw, rng, shape, dtype, inputs=()):
    """None, an output array of any layout (bad ones included), or a view sharing an input's memory."""
    kind = draw(st.sampled_from(["none", "none", "array", "array", "alias"]))
    if kind == "none":
        return None
    if kind == "alias":
        ins = [x for x in inputs if x.dtype == dtype and x.flags.writeable and x.size]
        if ins:
            return alias_of(draw, draw(st.sampled_from(ins)), shape)
    return layout(rng, shape, dtype, draw(st.sampled_from(OUT_LAYOUTS)))


def alias_of(draw, x, shape):
    """A view of `shape` into x's memory: x itself, or shifted by a few elements."""
    if tuple(x.shape) == tuple(shape) and draw(st.booleans()):
        return x
    base = x
    while base.base is not None and isinstance(base.base, np.ndarray):
        base = base.base
    flat = base.reshape(-1) if base.flags.c_contiguous else None
    n = math.prod(shape)
    if flat is None or flat.dtype != x.dtype or flat.size < n:
        return x if tuple(x.shape) == tuple(shape) else None
    shift = draw(st.integers(0, flat.size - n))
    return flat[shift:shift + n].reshape(shape)


@st.composite
def matmul_args(draw, rng):
    dtype = draw(st.sampled_from(FLOATS))
    m, k, n = draw(dims), draw(dims), draw(dims)
    batch = shape_of(draw, 0, 3)
    a_batch, b_batch = bcast_shape(draw, batch), bcast_shape(draw, batch)
    a_shape = a_batch + (m, k) if a_batch or draw(st.integers(0, 4)) else (k,)  # 1-D: promoted
    b_shape = b_batch + (k, n) if b_batch or draw(st.integers(0, 4)) else (k,)
    a, b = in_array(draw, rng, a_shape, dtype), in_array(draw, rng, b_shape, dtype)
    try:
        shape = np.matmul(np.empty(a_shape), np.empty(b_shape)).shape
    except ValueError:
        shape = ()
    return dict(a=a, b=b, out=maybe_out(draw, rng, shape, dtype, (a, b)))


@st.composite
def linear_args(draw, rng):
    dtype = draw(st.sampled_from(FLOATS))
    n_in, n_out = draw(dims), draw(dims)
    x = in_array(draw, rng, shape_of(draw, 0, 3) + (n_in,), dtype)
    w = in_array(draw, rng, (n_in, n_out), dtype)
    bias = in_array(draw, rng, (n_out,), dtype) if draw(st.booleans()) else None
    return dict(x=x, weight=w, bias=bias, activation=draw(st.sampled_from([None, "relu"])))


@st.composite
def relu_args(draw, rng):
    dtype = draw(st.sampled_from(FLOATS))
    x = in_array(draw, rng, shape_of(draw, 0), dtype, special=True)
    return dict(x=x, out=maybe_out(draw, rng, x.shape, dtype, (x,)))


@st.composite
def relu_backward_args(draw, rng):
    dtype = draw(st.sampled_from(FLOATS))
    shape = shape_of(draw, 0)
    g, x = in_array(draw, rng, shape, dtype, True), in_array(draw, rng, shape, dtype, True)
    return dict(grad_output=g, x=x, out=maybe_out(draw, rng, shape, dtype, (g, x)))


@st.composite
def softmax_args(draw, rng):
    dtype = draw(st.sampled_from(FLOATS))
    x = in_array(draw, rng, shape_of(draw, 1), dtype, special=draw(st.booleans()))
    axis = draw(st.integers(-x.ndim, x.ndim - 1))
    return dict(x=x, axis=axis, out=maybe_out(draw, rng, x.shape, dtype, (x,)))


@st.composite
def softmax_backward_args(draw, rng, log=False):
    dtype = draw(st.sampled_from(FLOATS))
    shape = shape_of(draw, 1)
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    g = in_array(draw, rng, shape, dtype)
    y = (ref.log_softmax if log else ref.softmax)(rng.standard_normal(shape), axis=axis).astype(dtype)
    return dict(grad_output=g, output=y, axis=axis)


@st.composite
def cross_entropy_args(draw, rng):
    dtype = draw(st.sampled_from(FLOATS))
    n, c = draw(dims), draw(dims)
    n = n if c else 0  # no label is valid when C == 0
    logits = in_array(draw, rng, (n, c), dtype)
    labels = rng.integers(0, max(c, 1), size=n).astype(draw(st.sampled_from([np.int32, np.int64])))
    if draw(st.integers(0, 4)) == 0:
        labels = labels[::-1]
    return dict(logits=logits, labels=labels)


@st.composite
def attention_operands(draw, rng, backward=False):
    dtype = draw(st.sampled_from(FLOATS))
    sizes = st.sampled_from([0, 1, 2, 3, 5, 8, 13, 17]) if not draw(st.integers(0, 9)) == 0 else \
        st.sampled_from([1, 31, 65, 130])
    L, S, E, Ev = draw(sizes), draw(sizes), draw(st.sampled_from([0, 1, 3, 8, 13])), draw(st.sampled_from([0, 1, 4, 9]))
    gqa = draw(st.integers(0, 3)) == 0
    if gqa:
        hk = draw(st.sampled_from([1, 2, 3]))
        hq = hk * draw(st.sampled_from([1, 2, 3]))
        lead = shape_of(draw, 0, 1)
        qb, kb = lead + (hq,), bcast_shape(draw, lead) + (hk,)
        vb = bcast_shape(draw, lead) + (hk,)
    else:
        batch = shape_of(draw, 0, 2)
        qb, kb, vb = bcast_shape(draw, batch), bcast_shape(draw, batch), bcast_shape(draw, batch)
    q = in_array(draw, rng, qb + (L, E), dtype)
    k = in_array(draw, rng, kb + (S, E), dtype)
    v = in_array(draw, rng, vb + (S, Ev), dtype)
    args = dict(query=q, key=k, value=v)
    mask_kind = draw(st.sampled_from(["none", "none", "causal", "bool", "float"]))
    if mask_kind == "causal":
        args["is_causal"] = True
    elif mask_kind != "none":
        try:
            full = np.broadcast_shapes(qb, kb if not gqa else kb[:-1] + (qb[-1],), vb if not gqa else vb[:-1] + (qb[-1],))
        except ValueError:
            full = ()
        mshape = bcast_shape(draw, tuple(full) + (L, S))
        if mask_kind == "bool":
            args["attn_mask"] = layout(rng, mshape, np.bool_, draw(st.sampled_from(["C", "F", "neg", "bcast"])))
            args["attn_mask"] = np.asarray(rng.random(mshape) < 0.7) if draw(st.booleans()) else args["attn_mask"]
        else:
            m = in_array(draw, rng, mshape, dtype)
            if m.flags.writeable and m.size and draw(st.booleans()):
                m[rng.random(mshape) < 0.2] = -np.inf
            args["attn_mask"] = m
    if draw(st.booleans()):
        args["scale"] = draw(st.sampled_from([0.5, 1.0, 0.125, np.float32(0.3), 2]))
    if gqa:
        args["enable_gqa"] = True
    return args


@st.composite
def sdpa_args(draw, rng):
    args = draw(attention_operands(rng))
    if draw(st.integers(0, 3)) == 0:
        args["return_lse"] = True
    if draw(st.integers(0, 5)) == 0:
        args["dropout_p"] = 0.0
    return args


@st.composite
def sdpa_backward_args(draw, rng):
    args = draw(attention_operands(rng))
    try:
        out, lse = fastnn.scaled_dot_product_attention(**args, return_lse=True)
    except (TypeError, ValueError):  # an invalid draw (broadcast clash): the junk of this case
        out = lse = np.zeros((1,), args["query"].dtype)
    g = in_array(draw, rng, out.shape, out.dtype)
    return dict(grad_output=g, output=out, lse=lse, **args)


@st.composite
def adam_args(draw, rng):
    dtype = draw(st.sampled_from(FLOATS))
    shape = shape_of(draw, 0, 3)
    state_layout = st.sampled_from(["C"] * 12 + ["F", "step", "neg", "readonly", "bcast_w", "overlap", "unaligned"])
    p = layout(rng, shape, dtype, draw(state_layout))
    g = in_array(draw, rng, shape, dtype)
    m = layout(rng, shape, dtype, draw(state_layout))
    v = layout(rng, shape, dtype, draw(state_layout) if draw(st.integers(0, 5)) == 0 else "C")
    if v.flags.writeable and not self_overlapping(v):
        np.abs(v, out=v)
    args = dict(param=p, grad=g, exp_avg=m, exp_avg_sq=v, step=draw(st.integers(1, 50)),
                lr=draw(st.sampled_from([1e-3, 0.1, 0.0, np.float32(0.01)])),
                beta1=draw(st.sampled_from([0.9, 0.0, 0.5, 0.99])), beta2=draw(st.sampled_from([0.999, 0.0, 0.9])),
                eps=draw(st.sampled_from([1e-8, 1e-3])),
                weight_decay=draw(st.sampled_from([0.0, 0.0, 0.01, 1])),
                decoupled_weight_decay=draw(st.booleans()), maximize=draw(st.booleans()))
    if draw(st.integers(0, 2)) == 0:
        vm = layout(rng, shape, dtype, draw(state_layout))
        if vm.flags.writeable and not self_overlapping(vm):
            np.abs(vm, out=vm)
        args["max_exp_avg_sq"] = vm
    if draw(st.integers(0, 9)) == 0:  # the same array twice: must be refused
        a, b = draw(st.sampled_from([("param", "exp_avg"), ("exp_avg", "exp_avg_sq"), ("param", "grad")]))
        args[b] = args[a]
    return args


@st.composite
def linear_backward_args(draw, rng):
    dtype = draw(st.sampled_from(FLOATS))
    n_in, n_out = draw(dims), draw(dims)
    lead = shape_of(draw, 0, 3)
    return dict(grad_output=in_array(draw, rng, lead + (n_out,), dtype), x=in_array(draw, rng, lead + (n_in,), dtype),
                weight=in_array(draw, rng, (n_in, n_out), dtype), bias=draw(st.booleans()))


# ---- oracles: the expected result of a call that returned ----------------------------------------

def _ref_args(args):
    return {k: f64(v) if isinstance(v, np.ndarray) and v.dtype in FLOATS else v for k, v in args.items()}


def _reduction(args, *names):
    return max([1] + [args[n].shape[-1] for n in names if isinstance(args.get(n), np.ndarray) and args[n].ndim])


def check_matmul(res, args):
    a, b = args["a"], args["b"]
    a64, b64 = f64(a, b)
    # scale: the norm of the terms (|a| @ |b|), for products that cancel (random vectors' dot products).
    assert_close(res, ref.matmul(a64, b64), a.dtype, k=a.shape[-1],
                 scale=float(np.linalg.norm(ref.matmul(np.abs(a64), np.abs(b64)))))


def check_linear(res, args):
    r = _ref_args(args)
    terms = ref.linear(np.abs(r["x"]), np.abs(r["weight"]), None if r.get("bias") is None else np.abs(r["bias"]))
    assert_close(res, ref.linear(r["x"], r["weight"], r.get("bias"), activation=args.get("activation")),
                 args["x"].dtype, k=args["x"].shape[-1] + 1, scale=float(np.linalg.norm(terms)))


def check_relu(res, args):
    exp = ref.relu(f64(args["x"])).astype(args["x"].dtype)
    assert res.dtype == args["x"].dtype and np.array_equal(res, exp, equal_nan=True)


def check_relu_backward(res, args):
    exp = ref.relu_backward(*f64(args["grad_output"], args["x"])).astype(args["x"].dtype)
    assert res.dtype == args["x"].dtype and np.array_equal(res, exp, equal_nan=True)


def check_softmax(res, args, log=False):
    x = args["x"]
    axis = args.get("axis", -1)
    with np.errstate(all="ignore"):
        exp = (ref.log_softmax if log else ref.softmax)(f64(x), axis=axis)
    assert_close(res, exp, x.dtype, k=x.shape[axis] if x.ndim else 1)


def check_softmax_backward(res, args, log=False):
    g, y = args["grad_output"], args["output"]
    axis = args.get("axis", -1)
    g64, y64 = f64(g, y)
    if log:
        exp = g64 - np.exp(y64) * g64.sum(axis=axis, keepdims=True)
        scale = float(np.linalg.norm(np.abs(g64) + np.exp(y64) * np.abs(g64).sum(axis=axis, keepdims=True)))
    else:
        exp = ref.softmax_backward(g64, y64, axis=axis)
        scale = softmax_backward_scale(g, y, axis=axis)
    assert_close(res, exp, y.dtype, k=y.shape[axis], scale=scale)


def check_cross_entropy(res, args):
    loss, grad = res
    logits = args["logits"]
    rloss, rgrad = ref.cross_entropy(f64(logits), np.asarray(args["labels"]))
    assert isinstance(loss, float)
    # the loss of float16 logits is a float32 computation too (on the widened logits)
    assert (math.isnan(loss) and math.isnan(rloss)) or abs(loss - rloss) <= 1e-4 * max(1.0, abs(rloss)) * (
        1 if logits.dtype.itemsize <= 4 else 1e-8)
    # scale: softmax - onehot cancels where the label's probability is near 1.
    n = max(logits.shape[0], 1)
    assert_close(grad, rgrad, logits.dtype, k=logits.shape[-1],
                 scale=float(np.linalg.norm(ref.softmax(f64(logits), axis=-1))) / n + math.sqrt(logits.shape[0]) / n)


def _loose_close(got, exp, dtype, scale, score_err=0.0):
    """Attention results: relative-norm error small against the operands' scale (catches garbage), plus the
    error that rounding the scores alone gives (score_err, see _score_rounding)."""
    got, exp = np.asarray(got), np.asarray(exp)
    assert got.shape == exp.shape and got.dtype == dtype, (got.shape, exp.shape, got.dtype)
    finite = np.isfinite(exp)
    assert np.array_equal(np.isnan(got), np.isnan(exp))
    err = np.linalg.norm(got[finite] - exp[finite])
    # float16 results: one rounding of a float32 result (relative 2^-11, doubled as in conftest.tolerance)
    base = {2: 2e-3, 4: 1e-4}.get(np.dtype(dtype).itemsize, 1e-10)
    tol = max(base, 10 * score_err) * max(np.linalg.norm(exp[finite]), scale, 1.0)
    assert err <= tol, f"error {err:.3e} > {tol:.3e}"


def _attention_ref_args(args):
    """The oracle's arguments; a scale is first rounded to the dtype, as the kernel uses it."""
    r = _ref_args(args)
    if r.get("scale") is not None:
        with np.errstate(all="ignore"):
            r["scale"] = float(args["query"].dtype.type(r["scale"]))
    return r


FORWARD_PARAMS = ("query", "key", "value", "attn_mask", "is_causal", "scale", "enable_gqa")


def refresh_forward(args, mutated):
    """After junk replaced a forward argument of the backward, recompute the forward's output and lse so
    that they match it (when the forward accepts it); the oracle recomputes them from scratch."""
    if not set(mutated) & set(FORWARD_PARAMS) or set(mutated) & {"output", "lse"}:
        return
    try:
        out, lse = fastnn.scaled_dot_product_attention(
            **{k: v for k, v in args.items() if k in FORWARD_PARAMS}, return_lse=True)
    except (TypeError, ValueError):
        return
    if out.shape == np.shape(args["grad_output"]):
        args["output"], args["lse"] = out, lse


def _score_rounding(args):
    """A bound on the rounding error of the scaled scores, which exp turns into a relative error of the
    weights. Junk like scale=2**31 gives float32 scores of 1e9, rounded to +-64: no result is meaningful."""
    q, k = f64(args["query"], args["key"])
    E = q.shape[-1]
    scale = args.get("scale")
    scale = abs(float(scale)) if scale is not None else (1 / math.sqrt(E) if E else 1.0)
    bound = scale * E * float(np.max(np.abs(q), initial=0)) * float(np.max(np.abs(k), initial=0))
    return bound * float(np.finfo(args["query"].dtype).eps)


def check_sdpa(res, args):
    score_err = _score_rounding(args)
    if score_err > 0.5:
        outs = res if isinstance(res, tuple) else (res,)
        assert all(o.dtype == args["query"].dtype for o in outs)
        return
    r = _attention_ref_args(args)
    with np.errstate(all="ignore"):
        exp = ref.scaled_dot_product_attention(**r)
    dtype = args["query"].dtype
    if args.get("return_lse"):
        (out, lse), (eout, else_) = res, exp
        # The oracle's lse misses batch dims only value contributes; the output's batch is the full broadcast.
        _loose_close(lse, np.broadcast_to(else_, out.shape[:-1]), dtype, 1.0, score_err)
    else:
        out, eout = res, exp
    _loose_close(out, eout, dtype, float(np.linalg.norm(f64(args["value"]))), score_err)


def check_sdpa_backward(res, args):
    score_err = _score_rounding(args)
    if score_err > 0.5:
        assert [g.shape for g in res] == [args[n].shape for n in ("query", "key", "value")]
        return
    r = _attention_ref_args(args)
    with np.errstate(all="ignore"):
        exp = ref.scaled_dot_product_attention_backward(**r)
    dtype = args["query"].dtype
    scale = float(np.linalg.norm(f64(args["grad_output"]))) * (1 + float(np.linalg.norm(f64(args["value"])))) * \
        (1 + float(np.linalg.norm(f64(args["key"]))) + float(np.linalg.norm(f64(args["query"]))))
    for got, e in zip(res, exp):
        _loose_close(got, e, dtype, scale, score_err)


def check_linear_backward(res, args):
    r = _ref_args(args)
    exp = ref.linear_backward(r["grad_output"], r["x"], r["weight"], bias=args.get("bias", True))
    # The same products on absolute values: the size of the terms, for results that cancel.
    terms = ref.linear_backward(np.abs(r["grad_output"]), np.abs(r["x"]), np.abs(r["weight"]), bias=True)
    for got, e, t in zip(res, exp, terms):
        if e is None:
            assert got is None
        else:
            assert_close(got, e, args["x"].dtype, k=max(1, math.prod(args["x"].shape[:-1]), args["weight"].shape[-1]),
                         scale=float(np.linalg.norm(t)))


ADAM_STATE = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def check_adam(res, args, before):
    assert res is None
    if max(abs(float(before.get(k, 0))) for k in ("lr", "eps", "weight_decay")) > 1e18:
        return  # junk like lr=1e308: inf in float32 (as in torch), finite in the float64 oracle
    # Hyper-parameters as Python floats, as fastnn takes them (a np.float32 lr would make NumPy compute
    # the oracle's step size in float32).
    r = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) else float(v) if isinstance(v, np.floating) else v)
         for k, v in before.items()}
    with np.errstate(all="ignore"):
        ref.adam_update(**r)
    dtype = args["param"].dtype
    tol = {2: 2e-3, 4: 2e-5}.get(dtype.itemsize, 1e-12)  # float16: the step's float32 result rounded once
    for name in ADAM_STATE:
        if args.get(name) is not None:
            got, exp = args[name].astype(np.float64), r[name]
            assert np.array_equal(np.isnan(got), np.isnan(exp)), name
            f = np.isfinite(exp)
            assert np.allclose(got[f], exp[f], rtol=tol, atol=tol * (1 + float(np.max(np.abs(exp[f]), initial=0)))), name


# ---- the ops: every op of the shared table (tests/op_table.py), plus adam_update ---------------------

# Per op: fuzz(rng) draws valid arguments (a dict), check(result, args) compares a returned result with the
# oracle, params are the arguments junk may replace, out_params those the op writes.
Op = collections.namedtuple("Op", "fn args check params out_params")


def table_args(op):
    """The fuzz of a table op without its own strategy below: the table's inputs in a drawn float dtype, each
    array re-laid out in a drawn layout (values kept), and a drawn out= when the op takes one."""
    @st.composite
    def draw_args(draw, rng):
        dtype = draw(st.sampled_from(FLOATS))
        args, kw = op.build(rng, dtype)
        names = list(inspect.signature(getattr(fastnn, op.name)).parameters)
        laid = {n: relaid(draw, a) if isinstance(a, np.ndarray) and a.dtype in FLOATS else a
                for n, a in zip(names, args)}
        if op.out:
            shape = getattr(fastnn, op.name)(*args, **kw).shape
            laid["out"] = maybe_out(draw, rng, shape, dtype, [a for a in laid.values() if isinstance(a, np.ndarray)])
        return {**laid, **kw}
    return draw_args


def relaid(draw, a):
    """a's values in a drawn input layout (a copy)."""
    kind = draw(st.sampled_from(["C", "F", "T", "neg", "readonly", "unaligned"]))
    if kind == "F":
        return np.asfortranarray(a)
    if kind == "T":
        return np.ascontiguousarray(a.T).T
    if kind == "neg":
        flip = (...,) + (slice(None, None, -1),) * a.ndim
        return np.ascontiguousarray(a[flip])[flip]
    b = layout(np.random.default_rng(0), a.shape, a.dtype, "unaligned" if kind == "unaligned" else "C")
    b[...] = a
    b.flags.writeable = kind != "readonly"
    return b


def table_check(op):
    """The table's oracle on the float64 arguments, within the table's tolerance."""
    def check(res, args):
        names = list(inspect.signature(getattr(fastnn, op.name)).parameters)
        r = _ref_args({k: v for k, v in args.items() if k != "out"})
        positional = [r.pop(n) for n in names if n in r and isinstance(r[n], np.ndarray)]
        with np.errstate(all="ignore"):
            want = op.oracle(*positional, **r)
        for got, w in zip(res if isinstance(res, tuple) else (res,), want if isinstance(want, tuple) else (want,)):
            assert_close(got, w, args[names[0]].dtype, k=op.k, check_dtype=isinstance(got, np.ndarray))  # (a loss)
    return check


# The ops' own strategies, checks and junk targets (an op of the table missing here is fuzzed with
# table_args / table_check over the arrays of its signature).
FUZZ = {
    "matmul": (matmul_args, check_matmul, ["a", "b", "out"]),
    "linear": (linear_args, check_linear, ["x", "weight", "bias", "activation"]),
    "relu": (relu_args, check_relu, ["x", "out"]),
    "relu_backward": (relu_backward_args, check_relu_backward, ["grad_output", "x", "out"]),
    "softmax": (softmax_args, check_softmax, ["x", "axis", "out"]),
    "log_softmax": (softmax_args, lambda r, a: check_softmax(r, a, log=True), ["x", "axis", "out"]),
    "softmax_backward": (softmax_backward_args, check_softmax_backward, ["grad_output", "output", "axis"]),
    "log_softmax_backward": (lambda rng: softmax_backward_args(rng, log=True),
                             lambda r, a: check_softmax_backward(r, a, log=True), ["grad_output", "output", "axis"]),
    "cross_entropy": (cross_entropy_args, check_cross_entropy, ["logits", "labels"]),
    "scaled_dot_product_attention": (
        sdpa_args, check_sdpa,
        ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa", "return_lse"]),
    "scaled_dot_product_attention_backward": (
        sdpa_backward_args, check_sdpa_backward,
        ["grad_output", "query", "key", "value", "output", "lse", "attn_mask", "is_causal", "scale", "enable_gqa"]),
    "linear_backward": (linear_backward_args, check_linear_backward, ["grad_output", "x", "weight", "bias"]),
}


def table_op(op, own=True):
    """The fuzz Op of a table op: its own strategy when FUZZ has one (and `own`), else the table's."""
    if own and op.name in FUZZ:
        args, check, params = FUZZ[op.name]
    else:
        n = len(op.build(np.random.default_rng(0), np.float32)[0])
        params = list(inspect.signature(getattr(fastnn, op.name)).parameters)[:n] + (["out"] if op.out else [])
        args, check = table_args(op), table_check(op)
    return Op(getattr(fastnn, op.name), args, check, params, ["out"] if op.out else [])


OPS = {op.name: table_op(op) for op in TABLE}
# adam_update updates its state in place (no result to compare by the table): its own strategy and check.
OPS["adam_update"] = Op(fastnn.adam_update, adam_args, None,
                        ["param", "grad", "exp_avg", "exp_avg_sq", "step", "lr", "beta1", "beta2", "eps",
                         "weight_decay", "decoupled_weight_decay", "maximize", "max_exp_avg_sq"],
                        ["param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
# Not kernels: the build record, thread and ISA settings, the CUDA probe, and the Adam class (over adam_update).
NOT_FUZZED = {"__version__", "info", "set_num_threads", "get_num_threads", "cpu_isa", "set_cpu_isa", "Adam",
              "cuda_is_available"}


def test_every_public_function_is_fuzzed():
    missing = [n for n in fastnn.__all__ if n not in OPS and n not in NOT_FUZZED]
    assert not missing, f"add these to tests/op_table.py: {missing}"


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    total = sum(c["calls"] for c in STATS.values())
    lines = [f"fuzz: {total} calls over {len(STATS)} ops ({EXAMPLES} examples per op; FASTNN_FUZZ_EXAMPLES)"]
    for name, c in sorted(STATS.items()):
        lines.append(f"  {name:40s} {c['calls']:5d} calls: {c['checked']:5d} checked against the oracle, "
                     f"{c['TypeError']:4d} TypeError, {c['ValueError']:4d} ValueError")
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is not None and capture is not None and total:
        with capture.global_and_fixture_disabled():
            tr.write_line("")
            for line in lines:
                tr.write_line(line)


def _same_memory(a, b):
    return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.may_share_memory(a, b)


# The drawn values include inf and NaN, on which the float64 oracle warns as NumPy does.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("name", list(OPS))
@seed(SEED)
@SETTINGS
@given(data=st.data())
def test_fuzz(name, data):
    fuzz_one(name, OPS[name], data)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("name", OP_IDS)
@seed(SEED)
@settings(SETTINGS, max_examples=max(EXAMPLES // 5, 10))
@given(data=st.data())
def test_fuzz_table_inputs(name, data):
    """Every table op fuzzed the way a new op is before it has a strategy of its own: the table's inputs in
    random layouts, junk, out= views, checked against the table's oracle."""
    fuzz_one(name, table_op(TABLE[OP_IDS.index(name)], own=False), data)


def fuzz_one(name, op, data):
    """One fuzz example: valid arguments drawn by op.args, 0-2 of them replaced by junk, then the contract."""
    if op.fn is None:
        pytest.skip(f"fastnn.{name} does not exist in this build")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    args = data.draw(op.args(rng), label="valid args")
    # 0-2 arguments replaced by junk (an omitted optional one may be added).
    mutated = []
    for _ in range(data.draw(st.sampled_from([0, 0, 1, 1, 1, 2]), label="mutations")):
        p = data.draw(st.sampled_from(op.params), label="mutated param")
        args[p] = data.draw(junk(rng, args.get(p)), label=f"junk {p}")
        # A "junk" dropout probability that is valid (0.5) is no junk: it draws a mask from fresh entropy
        # that the oracle cannot replay. Such examples are discarded (0.0 is the default, kept).
        assume(p != "dropout_p" or not _valid_dropout_p(args[p]) or args[p] == 0)
        mutated.append(p)
    args = {k: v for k, v in args.items() if not (v is None and k not in mutated)}
    isas = fastnn.info()["cpu_isa_supported"]
    isa = data.draw(st.sampled_from(isas), label="isa")

    if name == "scaled_dot_product_attention_backward":
        refresh_forward(args, mutated)

    outs = [args[p] for p in op.out_params if isinstance(args.get(p), np.ndarray)]
    # Refusals the contract requires: writing through these would corrupt other data, and adam_update's
    # state must be C-contiguous and aligned (updated in place, never through a silent copy).
    must_refuse = any(bad_output(o) for o in outs) or (name == "adam_update" and (
        any(not (o.flags.c_contiguous and o.flags.aligned) for o in outs)
        or any(x.size and _same_memory(x, y) for i, x in enumerate(outs) for y in outs[i + 1:])))
    before = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    inputs = {k: v for k, v in args.items() if isinstance(v, np.ndarray) and k not in op.out_params}

    stats = STATS[name]
    stats["calls"] += 1
    old = fastnn.cpu_isa()
    fastnn.set_cpu_isa(isa)
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    try:
        with np.errstate(all="ignore"):
            res = op.fn(**args)
    except (TypeError, ValueError) as e:
        stats["TypeError" if isinstance(e, TypeError) else "ValueError"] += 1
        assert str(e), "an error must say what is wrong"
        if not mutated and not must_refuse:
            raise AssertionError(f"{name} refused valid arguments: {e!r}") from e
        # Refused arrays must be left untouched.
        for k, v in args.items():
            if type(v) is np.ndarray and v.dtype.kind == "f":  # (np.matrix copies change shape)
                assert np.array_equal(v, before[k], equal_nan=True), f"{k} was modified by a refused call"
        return
    finally:
        faulthandler.cancel_dump_traceback_later()
        fastnn.set_cpu_isa(old)

    assert not must_refuse, f"{name} accepted an output it must refuse (read-only / shared memory / layout)"
    stats["checked"] += 1
    # The call returned: the arguments were valid, and the result must be the oracle's.
    out = args.get("out")
    if isinstance(out, np.ndarray):
        assert res is out, "with out=, the result is out itself"
    if name == "adam_update":
        check_adam(res, args, before)
    else:
        if name == "scaled_dot_product_attention_backward" and {"output", "lse"} & set(mutated):
            # Junk output / lse of the right shape: the oracle ignores them, so only the shapes can be checked.
            assert [g.shape for g in res] == [args[n].shape for n in ("query", "key", "value")]
        else:
            op.check(res, {k: (before[k] if k in inputs else v) for k, v in args.items()})
    # Inputs are not modified (unless they share memory with the output: then they are the output).
    for k, v in inputs.items():
        if not any(_same_memory(v, o) for o in outs if o is not None):
            assert np.array_equal(v, before[k], equal_nan=True), f"input {k} was modified"


# ---- every op of the shared table (tests/op_table.py): junk in any array argument --------------------

@SETTINGS
@given(data=st.data(), op=st.sampled_from(TABLE),
       junk=st.sampled_from([1.0, 3, [1.0, 2.0], "x", b"x", (1.0,), object(), {"a": 1}]))
def test_table_junk_in_any_array_argument_is_a_type_error(data, op, junk):
    args, kw = op.build(np.random.default_rng(0), np.float32)
    i = data.draw(st.integers(0, len(args) - 1))
    bad = args[:i] + (junk,) + args[i + 1:]
    with pytest.raises(TypeError, match="expected an array"):
        getattr(fastnn, op.name)(*bad, **kw)
