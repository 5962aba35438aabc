"""Dropout inside scaled dot-product attention: the seed handling shared by the CPU and GPU entry points,
and Philox-4x32-10 written once for any array module (numpy: the reference's mask; cupy: the composed GPU
backward). The CPU kernel (csrc/cpu/sdpa.cpp) and the CUDA kernel (cuda/attention.cu) compute the same bits.

The mask. Element (b, i, j) of the attention probabilities -- b the flat (C-order) index over the output's
batch dimensions (batch and heads), i the query row, j the key column -- with rng_state (seed, offset) is

    x = Philox4x32-10(counter = (j // 4, i, b, offset), key = (seed & 0xffffffff, seed >> 32))
    u = x[j % 4]                                  (one 32-bit word; 4 keys share one Philox call)
    kept  iff  u >= floor(dropout_p * 2**32)      (probability 1 - dropout_p, to within 2**-32)

and a kept probability is multiplied by 1 / (1 - dropout_p) (PyTorch's dropout). All counter words are
taken modulo 2**32 (b, i and j // 4 are far below 2**32 for any array that fits in memory).
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Tuple

import numpy as np

PHILOX_M = (0xD2511F53, 0xCD9E8D57)   # round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)   # key schedule (Weyl) increments
_U32 = 0xFFFFFFFF


class Dropout(NamedTuple):
    """What the kernels take: the drop threshold on the 32-bit word, the survivors' factor 1/(1-p), and
    the Philox seed (64 bits) and offset (32 bits)."""
    threshold: int
    keep_scale: float
    seed: int
    offset: int

    @property
    def rng_state(self) -> Tuple[int, int]:
        return (self.seed, self.offset)


def dropout_p_value(dropout_p) -> float:
    """dropout_p as a float in [0, 1), else ValueError (TypeError for a non-number)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p: expected a float in [0, 1), got {type(dropout_p).__name__}")
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p: expected 0 <= dropout_p < 1, got {dropout_p}")
    return p


def _int_in(x, name: str, bits: int) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name}: expected an int in [0, 2**{bits}), got {type(x).__name__}")
    if not 0 <= int(x) < 1 << bits:
        raise ValueError(f"{name}: expected an int in [0, 2**{bits}), got {x}")
    return int(x)


def rng_state_value(rng_state, name: str = "rng_state") -> Tuple[int, int]:
    """A (seed, offset) pair checked: seed in [0, 2**64), offset in [0, 2**32)."""
    if not isinstance(rng_state, (tuple, list)) or len(rng_state) != 2:
        raise TypeError(f"{name}: expected a (seed, offset) pair of ints, got {rng_state!r}")
    return _int_in(rng_state[0], f"{name} seed", 64), _int_in(rng_state[1], f"{name} offset", 32)


def forward_dropout(dropout_p, rng) -> Optional[Dropout]:
    """The forward's dropout (None when dropout_p == 0): rng is an int seed in [0, 2**64), a
    numpy.random.Generator (one 64-bit seed is drawn from it), a (seed, offset) pair (the rng_state a
    forward returned: the same mask again), or None (a seed from fresh OS entropy)."""
    p = dropout_p_value(dropout_p)
    if p == 0.0:
        return None
    if rng is None:
        rng = np.random.default_rng()
    if isinstance(rng, np.random.Generator):
        seed, offset = int(rng.integers(0, 1 << 64, dtype=np.uint64)), 0
    elif isinstance(rng, (tuple, list)):
        seed, offset = rng_state_value(rng, "rng")
    elif isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        seed, offset = _int_in(rng, "rng", 64), 0
    else:
        raise TypeError(f"rng: expected an int seed, a numpy.random.Generator or a (seed, offset) pair, "
                        f"got {type(rng).__name__}")
    return _make(p, seed, offset)


def backward_dropout(dropout_p, rng_state) -> Optional[Dropout]:
    """The backward's dropout (None when dropout_p == 0): rng_state is the (seed, offset) the forward
    returned, required when dropout_p > 0."""
    p = dropout_p_value(dropout_p)
    if p == 0.0:
        return None
    if rng_state is None:
        raise ValueError("rng_state: dropout_p > 0 needs the (seed, offset) the forward returned "
                         "(scaled_dot_product_attention(..., return_lse=True) gives (out, lse, rng_state))")
    return _make(p, *rng_state_value(rng_state))


def _make(p: float, seed: int, offset: int) -> Dropout:
    return Dropout(math.floor(p * 4294967296.0), 1.0 / (1.0 - p), seed, offset)


def check_dropout_sizes(nbatch: int, L: int, S: int) -> None:
    """The counter words hold b, i and j // 4 in 32 bits each."""
    if nbatch > 1 << 32 or L > 1 << 32 or S > 1 << 34:
        raise ValueError(f"dropout_p: attention too large for the dropout counter (batch {nbatch}, L {L}, S {S})")


# ---- Philox-4x32-10 on arrays ---------------------------------------------------------------------------

def philox4x32_10(xp, counter, key):
    """Philox-4x32-10 (Salmon et al., SC'11; Random123's reference) element-wise: counter is 4 uint64 arrays
    (broadcastable) holding 32-bit words, key 2 Python ints < 2**32. Returns the 4 output words as uint64
    arrays. A 32 x 32-bit product is exact in uint64, so its high and low halves are shifts and masks."""
    c0, c1, c2, c3 = (xp.asarray(c, dtype=xp.uint64) for c in counter)
    k0, k1 = key
    for _ in range(10):
        p0 = c0 * np.uint64(PHILOX_M[0])
        p1 = c2 * np.uint64(PHILOX_M[1])
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ np.uint64(k0), p1 & np.uint64(_U32),
                          (p0 >> np.uint64(32)) ^ c3 ^ np.uint64(k1), p0 & np.uint64(_U32))
        k0, k1 = (k0 + PHILOX_W[0]) & _U32, (k1 + PHILOX_W[1]) & _U32
    return c0, c1, c2, c3


def keep_mask(xp, d: Dropout, heads, rows, S: int):
    """bool array (len(heads), len(rows), S): which attention probabilities survive, for the flat batch
    indices `heads` and query rows `rows` (ranges or 1-D integer arrays) and keys 0..S-1."""
    b = xp.asarray(np.asarray(heads, dtype=np.uint64) & np.uint64(_U32), dtype=xp.uint64)[:, None, None]
    i = xp.asarray(np.asarray(rows, dtype=np.uint64) & np.uint64(_U32), dtype=xp.uint64)[None, :, None]
    g = xp.arange((S + 3) // 4, dtype=xp.uint64)[None, None, :]
    shape = (b.shape[0], i.shape[1], g.shape[2])
    ctr = [xp.broadcast_to(x, shape) for x in (g, i, b, xp.full((1, 1, 1), d.offset, dtype=xp.uint64))]
    words = xp.stack(philox4x32_10(xp, ctr, (d.seed & _U32, d.seed >> 32)), axis=-1)  # (..., G, 4)
    words = words.reshape(shape[:2] + (4 * shape[2],))[..., :S]
    return words >= np.uint64(d.threshold)
