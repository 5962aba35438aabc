"""NaN, +inf and -inf through every op, forward and backward, and Adam (plain, AMSGrad, decoupled decay,
maximize): one non-finite value placed in a vector body, in a vector tail or on a tile edge of one input, on
every ISA path at 1 and 2 threads (and on the GPU when there is one). The result has exactly the float64
oracle's NaN and signed-inf pattern, and the finite elements match it (conftest.assert_close)."""
import numpy as np
import pytest

import fastnn
from fastnn import reference as ref
from conftest import assert_close, f64, softmax_backward_scale
from gpu_helpers import needs_gpu

VALUES = [np.nan, np.inf, -np.inf]
# Sizes: 69 = 4 * 16 + 5 columns (a vector body and a tail on every path), 37 rows (tile + 1 and - 3 for the
# GEMM's row tiles), 1030 rows for the row ops (more than one thread's grain at 69 columns).


def positions(shape, last=False):
    """Indices in a vector body, in the last vector's tail and on the last row / column (a tile edge); with
    `last`, also the very last element (for causal attention: a key above the diagonal of the first query
    block, in a block the kernels would skip)."""
    body = tuple(min(3, n - 1) for n in shape)
    tail = tuple(min(3, n - 1) for n in shape[:-1]) + (shape[-1] - 1,)
    edge = (shape[0] - 1,) + tuple(min(5, n - 1) for n in shape[1:])
    return {"body": body, "tail": tail, "edge": edge, **({"last": tuple(n - 1 for n in shape)} if last else {})}


def _softmax_backward_oracle(g, y, log):
    g, y = f64(g, y)
    if log:
        return g - np.exp(y) * g.sum(-1, keepdims=True)
    return ref.softmax_backward(g, y)


def _relu_backward_oracle(g, x):
    return ref.relu_backward(*f64(g, x))


# op name -> (input shapes, function(fastnn-module-like, *inputs) -> tuple of results, oracle(*float64) ->
# tuple, reduction length k for the tolerance)
def _linear_backward(fn, g, x, w):
    return tuple(r for r in fn.linear_backward(g, x, w))


def _sdpa(fn, q, k, v):
    return (fn.scaled_dot_product_attention(q, k, v),)


def _sdpa_backward(fn, do, q, k, v):
    out, lse = fn.scaled_dot_product_attention(q, k, v, return_lse=True)
    return tuple(fn.scaled_dot_product_attention_backward(do, q, k, v, out, lse))


def _sdpa_causal(fn, q, k, v):
    return (fn.scaled_dot_product_attention(q, k, v, is_causal=True),)


def _sdpa_causal_backward(fn, do, q, k, v):
    out, lse = fn.scaled_dot_product_attention(q, k, v, return_lse=True, is_causal=True)
    return tuple(fn.scaled_dot_product_attention_backward(do, q, k, v, out, lse, is_causal=True))


def _cross_entropy(fn, x):
    labels = np.arange(x.shape[0]) % x.shape[1]
    loss, grad = fn.cross_entropy(x, labels)
    return np.array(loss), grad


def _cross_entropy_ref(x):
    labels = np.arange(x.shape[0]) % x.shape[1]
    with np.errstate(invalid="ignore"):
        loss, grad = ref.cross_entropy(x, labels)
    return np.array(loss), grad


OPS = {
    "relu": ([(1030, 69)], lambda fn, x: (fn.relu(x),), lambda x: (ref.relu(x),), 1),
    "relu_backward": ([(1030, 69), (1030, 69)], lambda fn, g, x: (fn.relu_backward(g, x),),
                      lambda g, x: (ref.relu_backward(g, x),), 1),
    "matmul": ([(37, 69), (69, 41)], lambda fn, a, b: (fn.matmul(a, b),), lambda a, b: (ref.matmul(a, b),), 69),
    "linear_relu": ([(37, 69), (69, 41), (41,)], lambda fn, x, w, b: (fn.linear(x, w, b, activation="relu"),),
                    lambda x, w, b: (ref.linear(x, w, b, activation="relu"),), 70),
    "linear_backward": ([(37, 69), (37, 41), (41, 69)], _linear_backward,
                        lambda g, x, w: ref.linear_backward(g, x, w), 41),
    "softmax": ([(1030, 69)], lambda fn, x: (fn.softmax(x),), lambda x: (ref.softmax(x),), 69),
    "log_softmax": ([(1030, 69)], lambda fn, x: (fn.log_softmax(x),), lambda x: (ref.log_softmax(x),), 69),
    "softmax_backward": ([(1030, 69), (1030, 69)], lambda fn, g, y: (fn.softmax_backward(g, y),),
                         lambda g, y: (_softmax_backward_oracle(g, y, False),), 69),
    "log_softmax_backward": ([(1030, 69), (1030, 69)], lambda fn, g, y: (fn.log_softmax_backward(g, y),),
                             lambda g, y: (_softmax_backward_oracle(g, y, True),), 69),
    "cross_entropy": ([(1030, 69)], _cross_entropy, _cross_entropy_ref, 69),
    "attention": ([(2, 2, 37, 24), (2, 2, 69, 24), (2, 2, 69, 20)], _sdpa,
                  lambda q, k, v: (ref.scaled_dot_product_attention(q, k, v),), 93),
    "attention_backward": ([(2, 2, 37, 20), (2, 2, 37, 24), (2, 2, 69, 24), (2, 2, 69, 20)], _sdpa_backward,
                           lambda do, q, k, v: ref.scaled_dot_product_attention_backward(do, q, k, v, None, None),
                           93),
    # causal, 150 queries and keys (several query and key blocks on every path): the non-finite key or value
    # also lands above the diagonal (key 3 or 5 is masked for rows 0-2 or 0-4; the last key, 149, for every
    # query of the first block, which the kernels would skip), where PyTorch's additive mask still gives NaN.
    "attention_causal": ([(1, 2, 150, 24), (1, 2, 150, 24), (1, 2, 150, 20)], _sdpa_causal,
                         lambda q, k, v: (ref.scaled_dot_product_attention(q, k, v, is_causal=True),), 150),
    "attention_causal_backward": ([(1, 2, 150, 20), (1, 2, 150, 24), (1, 2, 150, 24), (1, 2, 150, 20)],
                                  _sdpa_causal_backward,
                                  lambda do, q, k, v: ref.scaled_dot_product_attention_backward(
                                      do, q, k, v, None, None, is_causal=True), 150),
}
# linear_backward's reference takes (grad_output, x, weight) with x (rows, in), weight (in, out).
OPS["linear_backward"] = ([(37, 41), (37, 69), (69, 41)], _linear_backward,
                          lambda g, x, w: ref.linear_backward(g, x, w), 69)


def _inputs(rng, shapes, dtype, softmax_out=None):
    arrays = [rng.standard_normal(s).astype(dtype) for s in shapes]
    if softmax_out is not None:  # backward ops take a forward result y
        y = fastnn.log_softmax(arrays[1]) if softmax_out == "log" else fastnn.softmax(arrays[1])
        arrays[1] = y.astype(dtype)
    return arrays


def check_op(name, rng, dtype, to_device=None, from_device=None):
    shapes, run, oracle, k = OPS[name]
    y_kind = {"softmax_backward": "plain", "log_softmax_backward": "log"}.get(name)
    for which in range(len(shapes)):
        for where, idx in positions(shapes[which], last=name.startswith("attention_causal")).items():
            for value in VALUES:
                arrays = _inputs(rng, shapes, dtype, y_kind)
                arrays[which][idx] = value
                args = arrays if to_device is None else [to_device(a) for a in arrays]
                got = run(fastnn, *args)
                if from_device is not None:
                    got = tuple(from_device(g) for g in got)
                with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                    want = oracle(*f64(*arrays)) if len(arrays) > 1 else oracle(f64(*arrays))
                for i, (g, w) in enumerate(zip(got, want)):
                    what = f"{name}: {value} in input {which} at {where} {idx}, result {i}"
                    scale = 0.0
                    if name == "softmax_backward":
                        scale = softmax_backward_scale(arrays[0], arrays[1])
                    try:
                        assert_close(g, w, dtype, k=k, check_dtype=False, scale=scale)
                    except AssertionError as e:
                        raise AssertionError(f"{what}: {e}") from None


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(OPS))
def test_nonfinite_ops(isa, restore_threads, rng, name, dtype, threads):
    fastnn.set_num_threads(threads)
    check_op(name, rng, dtype)


# ---- Adam -------------------------------------------------------------------------------------------

ADAM_OPTIONS = {
    "plain": dict(),
    "amsgrad": dict(amsgrad=True),
    "l2": dict(weight_decay=0.1),
    "adamw": dict(weight_decay=0.1, decoupled_weight_decay=True),
    "maximize_amsgrad": dict(maximize=True, amsgrad=True),
}


def check_adam(rng, dtype, option, to_device=None, from_device=None, n=1001):
    kw = dict(ADAM_OPTIONS[option])
    ams = kw.pop("amsgrad", False)
    names = ["param", "grad", "exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if ams else [])
    base = {"param": rng.standard_normal(n), "grad": rng.standard_normal(n),
            "exp_avg": 0.1 * rng.standard_normal(n), "exp_avg_sq": 0.01 * rng.random(n)}
    if ams:
        base["max_exp_avg_sq"] = 0.02 * rng.random(n)
    base = {name: a.astype(dtype) for name, a in base.items()}
    for which in names:
        # body: inside the first vectors; tail: the last element (n is odd); edge: where 2 threads split.
        for where, idx in {"body": 3, "tail": n - 1, "edge": n // 2}.items():
            for value in VALUES:
                state = {name: a.copy() for name, a in base.items()}
                state[which][idx] = value
                want = {name: f64(a) for name, a in state.items()}
                with np.errstate(invalid="ignore", over="ignore"):
                    ref.adam_update(want["param"], want["grad"], want["exp_avg"], want["exp_avg_sq"], step=3,
                                    lr=0.01, max_exp_avg_sq=want.get("max_exp_avg_sq"), **kw)
                dev = state if to_device is None else {name: to_device(a) for name, a in state.items()}
                fastnn.adam_update(dev["param"], dev["grad"], dev["exp_avg"], dev["exp_avg_sq"], step=3, lr=0.01,
                                   max_exp_avg_sq=dev.get("max_exp_avg_sq"), **kw)
                for name in names:
                    got = dev[name] if from_device is None else from_device(dev[name])
                    try:
                        assert_close(got, want[name], dtype, k=3, check_dtype=False)
                    except AssertionError as e:
                        raise AssertionError(f"adam {option}: {value} in {which} at {where}, {name}: {e}") from None


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("option", list(ADAM_OPTIONS))
def test_nonfinite_adam(isa, restore_threads, rng, option, dtype, threads):
    fastnn.set_num_threads(threads)
    check_adam(rng, dtype, option, n=1001 if threads == 1 else 2 * 32768 + 17)  # 2 threads: > 2 grains


# ---- the same matrix on the GPU ---------------------------------------------------------------------

@needs_gpu
@pytest.mark.parametrize("name", list(OPS))
def test_nonfinite_ops_gpu(rng, name):
    import cupy as cp
    check_op(name, rng, np.float32, to_device=cp.asarray, from_device=lambda a: cp.asnumpy(a) if isinstance(
        a, cp.ndarray) else a)


@needs_gpu
@pytest.mark.parametrize("option", list(ADAM_OPTIONS))
def test_nonfinite_adam_gpu(rng, option):
    import cupy as cp
    check_adam(rng, np.float32, option, to_device=cp.asarray, from_device=cp.asnumpy)
