"""The attention backward composed of batched products and element-wise array operations, for any array
module: the GPU path runs it on cupy arrays with fastnn's CUDA matmul (there is no fused CUDA backward
kernel yet); the tests run the same code on numpy arrays with the CPU matmul and compare it with the CPU
kernel. Unlike that flash-style kernel it materializes scores: those of a chunk of heads at a time, or of
a block of query rows of one head when a head's L x S scores exceed `max_bytes` (float32 scratch per array).
"""
from __future__ import annotations

import math

import numpy as np

from ._dropout import keep_mask


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
                       scale: float, group, batch, max_bytes: int = 256 << 20, dtype=None, dropout=None):
    """Per-head gradients (dq, dk, dv) in `dtype` (default float32, also the computing precision), shaped batch + (L, E), batch + (S, E), batch + (S, Ev).

    query (..., L, E), key (..., S, E), value (..., S, Ev) as the forward took them (key and value with
    H / group heads when `group`); grad_output and output: batch + (L, Ev); lse: batch + (L,), the
    forward's log-sum-exp of the scaled, masked scores; mask: None or a bool (True = may attend) or float
    (added) array that broadcasts to batch + (L, S); causal: key j allowed for query i iff j <= i.
    `matmul(a, b)` multiplies stacks of matrices of any strides. dropout: None or fastnn._dropout.Dropout
    (the forward's); its mask Z = keep / (1 - p) is regenerated per chunk: dV = (P Z)^T dO, dP = (dO V^T) Z.
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
    mfull = xp.broadcast_to(mask, batch + (L, S)) if mask is not None else None
    heads = [()] if not batch else [tuple(int(t) for t in np.unravel_index(h, batch)) for h in range(nb)]
    d = (g * o).sum(axis=-1)[..., None]          # rowsum(dO * O): the softmax backward's dot per query
    # = rowsum(dP * P) where finite; where not, the chunks below take that rowsum as written (as the CPU kernel;
    # computed for every chunk, a row sum beside the chunk's products, so that no host wait is needed)
    # Chunks of whole heads while a head's L x S scores fit max_bytes, else one head and blocks of query rows.
    per_head = xp.dtype(f32).itemsize * L * S
    hstep, rstep = (max(1, max_bytes // per_head), L) if per_head <= max_bytes else \
        (1, max(1, max_bytes // (xp.dtype(f32).itemsize * S)))
    keys = xp.arange(S)
    for i in range(0, nb, hstep):
        c = slice(i, min(nb, i + hstep))
        for r0 in range(0, L, rstep):
            r = slice(r0, min(L, r0 + rstep))
            qr = q[c, r]
            s = matmul(qr, k[c].swapaxes(-1, -2)) * f32(scale)
            if mfull is not None:
                mc = xp.stack([mfull[heads[h]][r] for h in range(c.start, c.stop)])
                s = xp.where(mc, s, s - f32(math.inf)) if mc.dtype == bool else s + mc.astype(f32)
            if causal:
                s = xp.where(keys[None, :] <= xp.arange(r.start, r.stop)[:, None], s, s - f32(math.inf))
            p = xp.exp(s - m[c, r])
            gr = g[c, r]
            dp = matmul(gr, v[c].swapaxes(-1, -2))
            if dropout is None:
                dv[c] += matmul(p.swapaxes(-1, -2), gr)
            else:
                z = xp.where(keep_mask(xp, dropout, range(c.start, c.stop), range(r.start, r.stop), S),
                             f32(dropout.keep_scale), f32(0))
                dv[c] += matmul((p * z).swapaxes(-1, -2), gr)
                dp = dp * z
            dr = d[c, r]
            dr = xp.where(xp.isfinite(dr), dr, (dp * p).sum(axis=-1, keepdims=True))
            ds = p * (dp - dr)
            dq[c, r] = matmul(ds, k[c]) * f32(scale)
            dk[c] += matmul(ds.swapaxes(-1, -2), qr) * f32(scale)
    return dq.reshape(batch + (L, E)), dk.reshape(batch + (S, E)), dv.reshape(batch + (S, Ev))
