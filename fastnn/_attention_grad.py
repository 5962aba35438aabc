"""The attention backward composed of batched products and element-wise array operations, for any array
module: the GPU path runs it on cupy arrays with fastnn's CUDA matmul (there is no fused CUDA backward
kernel yet); the tests run the same code on numpy arrays with the CPU matmul and compare it with the CPU
kernel. Unlike that flash-style kernel it materializes the L x S scores, of a chunk of heads at a time
(at most `max_bytes` of float32 scratch per array).
"""
from __future__ import annotations

import math


def reduce_grad(grad, shape, batch_ndim: int, group):
    """Sums a per-head gradient (batch + core dims) down to an operand's `shape`: over the query heads of
    a GQA group (`group`: the key and value gradients; None otherwise) and over broadcast batch
    dimensions. Works on numpy and cupy arrays alike."""
    if group:
        h = grad.shape[batch_ndim - 1]
        grad = grad.reshape(grad.shape[:batch_ndim - 1] + (h // group, group) + grad.shape[-2:])
        grad = grad.sum(axis=batch_ndim)
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape[:-2]) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)


def attention_backward(xp, matmul, grad_output, query, key, value, output, lse, mask, causal: bool,
                       scale: float, group, batch, max_bytes: int = 256 << 20, dtype=None):
    """Per-head gradients (dq, dk, dv) in `dtype` (default float32, also the computing precision), shaped batch + (L, E), batch + (S, E), batch + (S, Ev).

    query (..., L, E), key (..., S, E), value (..., S, Ev) as the forward took them (key and value with
    H / group heads when `group`); grad_output and output: batch + (L, Ev); lse: batch + (L,), the
    forward's log-sum-exp of the scaled, masked scores; mask: None or a bool (True = may attend) or float
    (added) array that broadcasts to batch + (L, S); causal: key j allowed for query i iff j <= i.
    `matmul(a, b)` multiplies stacks of matrices of any strides.
    """
    f32 = xp.dtype(dtype or xp.float32).type
    L, E = query.shape[-2:]
    S, Ev = value.shape[-2:]
    if group:
        key = xp.repeat(key, group, axis=-3)
        value = xp.repeat(value, group, axis=-3)
    nb = math.prod(batch)

    def flat(a, core):
        return xp.ascontiguousarray(xp.broadcast_to(a, batch + core)).reshape((nb,) + core).astype(f32, copy=False)

    q, k, v = flat(query, (L, E)), flat(key, (S, E)), flat(value, (S, Ev))
    g, o, m = flat(grad_output, (L, Ev)), flat(output, (L, Ev)), flat(lse, (L,))
    # A row with no allowed key has lse = -inf and scores all -inf (its output was zeros): 0 in place of its
    # lse makes its probabilities exp(-inf) = 0 instead of NaN.
    m = xp.where(m == -math.inf, f32(0), m)[..., None]
    dq = xp.zeros((nb, L, E), f32)
    dk = xp.zeros((nb, S, E), f32)
    dv = xp.zeros((nb, S, Ev), f32)
    if nb == 0 or L == 0 or S == 0:
        return dq.reshape(batch + (L, E)), dk.reshape(batch + (S, E)), dv.reshape(batch + (S, Ev))
    masks = None
    if mask is not None:
        masks = xp.broadcast_to(mask, batch + (L, S)).reshape((nb, L, S))
    allowed = xp.tril(xp.ones((L, S), dtype=bool)) if causal else None
    d = (g * o).sum(axis=-1)[..., None]          # rowsum(dO * O): the softmax backward's dot per query
    step = max(1, max_bytes // (xp.dtype(f32).itemsize * L * S))
    for i in range(0, nb, step):
        c = slice(i, min(nb, i + step))
        s = matmul(q[c], k[c].swapaxes(-1, -2)) * f32(scale)
        if masks is not None:
            mc = masks[c]
            s = xp.where(mc, s, f32(-math.inf)) if mc.dtype == bool else s + mc.astype(f32)
        if allowed is not None:
            s = xp.where(allowed, s, f32(-math.inf))
        p = xp.exp(s - m[c])
        dv[c] = matmul(p.swapaxes(-1, -2), g[c])
        ds = p * (matmul(g[c], v[c].swapaxes(-1, -2)) - d[c])
        dq[c] = matmul(ds, k[c]) * f32(scale)
        dk[c] = matmul(ds.swapaxes(-1, -2), q[c]) * f32(scale)
    return dq.reshape(batch + (L, E)), dk.reshape(batch + (S, E)), dv.reshape(batch + (S, Ev))
