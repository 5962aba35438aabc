"""Plain NumPy versions of every fastnn op: the test oracles.

Same signatures as the public API, written for clarity rather than speed.
Each function computes in the dtype of its inputs; the tests pass float64
copies so the oracle is more accurate than the kernel under test.
float16 and bfloat16 (ml_dtypes) inputs are computed in float64 from their
(already rounded) values and the results rounded to the input dtype, as
fastnn returns them (attention's lse stays float32, as fastnn's does).
"""
import functools
import math

import numpy as np

from ._dropout import backward_dropout, forward_dropout, keep_mask

__all__ = [
    "matmul", "linear", "relu", "relu_backward", "softmax", "log_softmax",
    "softmax_backward", "cross_entropy", "scaled_dot_product_attention",
    "adam_update", "linear_backward", "scaled_dot_product_attention_backward",
]


def _is_half(x) -> bool:
    return isinstance(x, np.ndarray) and x.dtype.itemsize == 2 and x.dtype.name in ("float16", "bfloat16")


def _half_in_float64(fn):
    """fn computed in float64 when an argument is a float16 / bfloat16 array; array results rounded back to
    that dtype (float32 lse results kept float32), in-place updates written back rounded to each array's dtype."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        half = next((x.dtype for x in (*args, *kwargs.values()) if _is_half(x)), None)
        if half is None:
            return fn(*args, **kwargs)
        written = []

        def up(x):
            if isinstance(x, np.ndarray) and (_is_half(x) or x.dtype == np.float32):
                y = x.astype(np.float64)
                written.append((x, y))
                return y
            return x

        res = fn(*(up(x) for x in args), **{k: up(v) for k, v in kwargs.items()})
        for orig, new in written:  # in-place ops (adam_update) write back; the others leave new == orig
            if orig.flags.writeable and not np.array_equal(orig.astype(np.float64), new, equal_nan=True):
                orig[...] = new.astype(orig.dtype)

        def down(r, i):
            if isinstance(r, np.ndarray) and r.dtype == np.float64:
                lse = fn.__name__ == "scaled_dot_product_attention" and i == 1
                return r.astype(np.float32 if lse else half)
            return r

        if isinstance(res, tuple):
            return tuple(down(r, i) for i, r in enumerate(res))
        return down(res, 0)
    return wrapper


def matmul(a, b):
    """numpy.matmul, with 0-d operands rejected like the public API."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError("matmul: operands must have at least 1 dimension")
    return np.matmul(a, b)


def relu(x):
    """max(x, 0); NaN stays NaN (like np.maximum)."""
    x = np.asarray(x)
    return np.maximum(x, np.zeros((), x.dtype))


def relu_backward(grad_output, x):
    """grad_output where x > 0, else 0 (NaN in x counts as not > 0)."""
    grad_output, x = np.asarray(grad_output), np.asarray(x)
    return np.where(x > 0, grad_output, np.zeros((), grad_output.dtype))


def linear(x, weight, bias=None, activation=None):
    """activation(x @ weight + bias), weight (in, out), bias (out,)."""
    if activation not in (None, "relu"):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    y = matmul(x, weight)
    if bias is not None:
        y = y + np.asarray(bias)
    return relu(y) if activation == "relu" else y


def softmax(x, axis=-1):
    """exp(x - max) / sum(exp(x - max)); subtracting the max avoids overflow."""
    x = np.asarray(x)
    m = np.max(x, axis=axis, keepdims=True) if x.size else x
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def log_softmax(x, axis=-1):
    """x - max - log(sum(exp(x - max)))."""
    x = np.asarray(x)
    m = np.max(x, axis=axis, keepdims=True) if x.size else x
    shifted = x - m
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def softmax_backward(grad_output, output, axis=-1):
    """Gradient of softmax given its output y: y * (g - sum(g * y))."""
    g, y = np.asarray(grad_output), np.asarray(output)
    return y * (g - np.sum(g * y, axis=axis, keepdims=True))


def log_softmax_backward(grad_output, output, axis=-1):
    """Gradient of log_softmax given its output y: g - exp(y) * sum(g)."""
    g, y = np.asarray(grad_output), np.asarray(output)
    return g - np.exp(y) * np.sum(g, axis=axis, keepdims=True)


def cross_entropy(logits, labels, *, reduction="mean", ignore_index=-100):
    """Negative log-likelihood over N rows and its gradient w.r.t. logits (torch's reduction, ignore_index).

    logits (N, C), integer labels (N,) in [0, C) or == ignore_index (zero loss and gradient, not counted).
    Returns (loss, grad): loss a float ("mean" over the rows kept, NaN if none; "sum") or the (N,) per-row
    losses ("none"); grad (N, C) = (softmax(logits) - onehot(labels)) / (rows kept for "mean", else 1).
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    n, c = logits.shape
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    kept = labels != ignore_index
    if kept.any() and (labels[kept].min() < 0 or labels[kept].max() >= c):
        raise ValueError(f"labels must lie in [0, {c})")
    rows = np.arange(n)[kept]
    lab = labels[kept]
    row_loss = np.zeros(n, logits.dtype)
    grad = np.zeros_like(logits)
    if rows.size:
        row_loss[rows] = -log_softmax(logits[rows], axis=1)[np.arange(rows.size), lab]
        grad[rows] = softmax(logits[rows], axis=1)
        grad[rows, lab] -= 1
    if reduction == "none":
        return row_loss, grad
    if reduction == "sum":
        return float(np.sum(row_loss)), grad
    count = rows.size
    return (float(np.sum(row_loss)) / count if count else float("nan")), grad / max(count, 1)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False, *,
                                 return_lse=False, rng=None):
    """softmax(q @ k^T * scale + mask) @ v with PyTorch's semantics.

    query (..., L, E), key (..., S, E), value (..., S, Ev) -> (..., L, Ev);
    leading dims broadcast. Bool mask: True = may attend; float mask: added.
    is_causal: tril(ones(L, S)), aligned top-left. enable_gqa: key/value heads
    (axis -3) are repeated to match query heads. A row with no allowed key
    gives zeros. return_lse: also return log(sum(exp(scores))) per query row,
    shape (..., L) (-inf for a row with no allowed key).
    dropout_p > 0: the probabilities times _dropout_factors (the mask of fastnn/_dropout.py, the whole
    L x S of it, from rng as fastnn takes it); return_lse then returns (out, lse, rng_state).
    """
    q, k, v = np.asarray(query), np.asarray(key), np.asarray(value)
    drop = forward_dropout(dropout_p, rng)
    if attn_mask is not None and is_causal:
        raise ValueError("attn_mask and is_causal are mutually exclusive")
    L, E, S = q.shape[-2], q.shape[-1], k.shape[-2]
    if enable_gqa and k.ndim >= 3 and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k = np.repeat(k, rep, axis=-3)
        v = np.repeat(v, rep, axis=-3)
    if scale is None:
        scale = 1.0 / math.sqrt(E) if E else 1.0
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) * q.dtype.type(scale)
    if is_causal:
        attn_mask = np.tril(np.ones((L, S), dtype=bool))
    if attn_mask is not None:
        attn_mask = np.asarray(attn_mask)
        if attn_mask.dtype == bool:
            with np.errstate(invalid="ignore"):  # -inf added, as PyTorch's additive mask (+inf - inf = NaN)
                scores = np.where(attn_mask, scores, scores - np.inf)
        else:
            scores = scores + attn_mask
    # Subtract the row max for safety; a row whose max is -inf has no allowed
    # key (softmax would be 0/0), so it gets zero weights instead of NaN.
    m = np.max(scores, axis=-1, keepdims=True, initial=-np.inf)
    dead = m == -np.inf
    p = np.exp(scores - np.where(dead, 0, m))
    total = np.sum(p, axis=-1, keepdims=True)
    p /= np.where(dead, 1, total)
    if drop is not None:
        p = p * _dropout_factors(drop, p, v, q.dtype)
    out = np.matmul(p, v)
    if not return_lse:
        return out
    lse = np.where(dead, -np.inf, m + np.log(np.where(dead, 1, total)))
    return (out, lse[..., 0]) if drop is None else (out, lse[..., 0], drop.rng_state)


def _dropout_factors(drop, p, v, dtype):
    """keep / (1 - dropout_p) for every probability of p (..., L, S), with the batch dims of the
    output (p's and v's broadcast): element (b, i, j), b the flat index over those dims."""
    batch = np.broadcast_shapes(p.shape[:-2], v.shape[:-2])
    L, S = p.shape[-2:]
    keep = keep_mask(np, drop, range(math.prod(batch)), range(L), S).reshape(batch + (L, S))
    return np.where(keep, dtype.type(drop.keep_scale), dtype.type(0))


def adam_update(param, grad, exp_avg, exp_avg_sq, *, step, lr=1e-3, beta1=0.9,
                beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
                maximize=False, max_exp_avg_sq=None):
    """One Adam/AdamW/AMSGrad step in place, with torch.optim.Adam's arithmetic.

    Modifies param, exp_avg, exp_avg_sq (and max_exp_avg_sq when given).
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    g = -grad if maximize else grad
    if weight_decay != 0:
        if decoupled_weight_decay:
            param *= 1 - lr * weight_decay
        else:
            g = g + weight_decay * param
    exp_avg += (1 - beta1) * (g - exp_avg)
    exp_avg_sq *= beta2
    exp_avg_sq += (1 - beta2) * g * g
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    v = exp_avg_sq
    if max_exp_avg_sq is not None:
        np.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        v = max_exp_avg_sq
    denom = np.sqrt(v) / bias_correction2_sqrt + eps
    param -= exp_avg / denom * (lr / bias_correction1)


def linear_backward(grad_output, x, weight, bias=True, x_grad=True):
    """Gradients of x @ weight + bias: (g @ weight.T or None, x2.T @ g2, g2.sum(0) or
    None), with x2 (rows, in) and g2 (rows, out) the 2-D reshapes of x and grad_output."""
    g, x, weight = np.asarray(grad_output), np.asarray(x), np.asarray(weight)
    n_in, n_out = weight.shape
    rows = math.prod(x.shape[:-1])
    x2, g2 = x.reshape(rows, n_in), g.reshape(rows, n_out)
    grad_x = np.matmul(g, weight.T) if x_grad else None
    grad_weight = np.matmul(x2.T, g2)
    grad_bias = g2.sum(axis=0) if bias else None
    return grad_x, grad_weight, grad_bias


def _sum_to(grad, shape):
    """Sums grad over the dimensions that broadcasting added or stretched from 1,
    giving an array of `shape`."""
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    return grad.sum(axis=axes, keepdims=True) if axes else grad


def scaled_dot_product_attention_backward(grad_output, query, key, value, output, lse,
                                          attn_mask=None, is_causal=False, scale=None,
                                          enable_gqa=False, *, dropout_p=0.0, rng_state=None):
    """Gradients (grad_query, grad_key, grad_value) of scaled_dot_product_attention.

    Dense math on the full L x S probability matrix, recomputed from query and
    key (output and lse, the forward's results, are accepted for the signature
    and not used): with P = softmax(scores), dO = grad_output,
      dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dP * P)),
      dQ = scale * dS K,  dK = scale * dS^T Q.
    Rows with no allowed key have P = 0 and contribute nothing. Gradients are
    summed back to each operand's shape: over broadcast batch dimensions and,
    with enable_gqa, over the query heads sharing a key/value head.
    Dropout (dropout_p > 0, rng_state from the forward), Z the factors keep / (1 - p):
      dV = (P Z)^T dO,  dP = (dO V^T) Z,  and dS, dQ, dK as above.
    """
    drop = backward_dropout(dropout_p, rng_state)
    q, k, v = np.asarray(query), np.asarray(key), np.asarray(value)
    do = np.asarray(grad_output)
    if attn_mask is not None and is_causal:
        raise ValueError("attn_mask and is_causal are mutually exclusive")
    L, E, S = q.shape[-2], q.shape[-1], k.shape[-2]
    rep = 1
    if enable_gqa and k.ndim >= 3 and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
    kr = np.repeat(k, rep, axis=-3) if rep > 1 else k
    vr = np.repeat(v, rep, axis=-3) if rep > 1 else v
    if scale is None:
        scale = 1.0 / math.sqrt(E) if E else 1.0
    scale = q.dtype.type(scale)
    scores = np.matmul(q, np.swapaxes(kr, -1, -2)) * scale
    if is_causal:
        attn_mask = np.tril(np.ones((L, S), dtype=bool))
    if attn_mask is not None:
        attn_mask = np.asarray(attn_mask)
        if attn_mask.dtype == bool:
            with np.errstate(invalid="ignore"):  # -inf added, as PyTorch's additive mask (+inf - inf = NaN)
                scores = np.where(attn_mask, scores, scores - np.inf)
        else:
            scores = scores + attn_mask
    m = np.max(scores, axis=-1, keepdims=True, initial=-np.inf)
    dead = m == -np.inf
    p = np.exp(scores - np.where(dead, 0, m))
    p /= np.where(dead, 1, np.sum(p, axis=-1, keepdims=True))
    z = 1 if drop is None else _dropout_factors(drop, p, vr, q.dtype)
    dv = np.matmul(np.swapaxes(p * z, -1, -2), do)
    dp = np.matmul(do, np.swapaxes(vr, -1, -2)) * z
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
    dq = np.matmul(ds, kr) * scale
    dk = np.matmul(np.swapaxes(ds, -1, -2), q) * scale
    # Broadcast batch dims first (to the repeated shape), then fold GQA groups.
    kshape = k.shape[:-3] + (k.shape[-3] * rep,) + k.shape[-2:] if rep > 1 else k.shape
    vshape = v.shape[:-3] + (v.shape[-3] * rep,) + v.shape[-2:] if rep > 1 else v.shape
    dq, dk, dv = _sum_to(dq, q.shape), _sum_to(dk, kshape), _sum_to(dv, vshape)
    if rep > 1:
        dk = dk.reshape(k.shape[:-2] + (rep,) + k.shape[-2:]).sum(axis=-3)
        dv = dv.reshape(v.shape[:-2] + (rep,) + v.shape[-2:]).sum(axis=-3)
    return dq, dk, dv


for _name in __all__:
    globals()[_name] = _half_in_float64(globals()[_name])
