"""The composed attention backward (fastnn/_attention_grad.py: the GPU path's algorithm, on any array
module) run on numpy arrays with the CPU matmul, against the CPU flash-style backward kernel."""
import math

import numpy as np
import pytest

import fastnn
from fastnn._attention_grad import attention_backward, reduce_grad
from fastnn._dropout import backward_dropout
from conftest import assert_close


def composed(g, q, k, v, o, lse, mask=None, causal=False, scale=None, group=None, max_bytes=256 << 20,
             dropout=None):
    qb = q.shape[:-2]
    kb, vb = k.shape[:-2], v.shape[:-2]
    if group:
        kb, vb = kb[:-1] + (q.shape[-3],), vb[:-1] + (q.shape[-3],)
    batch = tuple(np.broadcast_shapes(qb, kb, vb))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dq, dk, dv = attention_backward(np, fastnn.matmul, g, q, k, v, o, lse, mask, causal, scale, group, batch,
                                    max_bytes=max_bytes, dtype=np.float64, dropout=dropout)
    return (reduce_grad(dq, q.shape, len(batch), None), reduce_grad(dk, k.shape, len(batch), group),
            reduce_grad(dv, v.shape, len(batch), group))


CASES = [
    dict(q=(2, 3, 17, 8), k=(2, 3, 13, 8), v=(2, 3, 13, 5)),
    dict(q=(2, 3, 17, 8), k=(2, 3, 17, 8), v=(2, 3, 17, 8), causal=True),
    dict(q=(2, 3, 9, 8), k=(1, 3, 11, 8), v=(1, 3, 11, 8), mask="bool", mask_shape=(9, 11)),
    dict(q=(2, 4, 9, 8), k=(2, 2, 11, 8), v=(2, 2, 11, 6), mask="float", mask_shape=(2, 1, 9, 11), gqa=True),
    dict(q=(5, 7, 4), k=(5, 6, 4), v=(5, 6, 3), mask="bool_empty_rows", mask_shape=(5, 7, 6)),
    dict(q=(2, 3, 16, 8), k=(2, 3, 16, 8), v=(2, 3, 16, 8), causal=True, max_bytes=2 * 16 * 16 * 8),
    # scores of one head beyond max_bytes: blocks of query rows (float64 here: 8 bytes a score)
    dict(q=(2, 4, 17, 8), k=(2, 2, 13, 8), v=(2, 2, 13, 6), mask="float", mask_shape=(2, 1, 17, 13), gqa=True,
         max_bytes=5 * 13 * 8),
    dict(q=(2, 3, 17, 8), k=(2, 3, 17, 8), v=(2, 3, 17, 8), causal=True, max_bytes=3 * 17 * 8),
    dict(q=(5, 7, 4), k=(5, 6, 4), v=(5, 6, 3), mask="bool_empty_rows", mask_shape=(5, 7, 6), max_bytes=2 * 6 * 8),
    dict(q=(9, 8), k=(11, 8), v=(11, 5), mask="bool", mask_shape=(9, 11), max_bytes=4 * 11 * 8),
]


@pytest.mark.parametrize("p", [0.0, 0.4], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("case", CASES)
def test_composed_backward_matches_the_cpu_kernel(rng, case, p):
    q = rng.standard_normal(case["q"])
    k = rng.standard_normal(case["k"])
    v = rng.standard_normal(case["v"])
    mask = None
    if case.get("mask") == "bool":
        mask = rng.random(case["mask_shape"]) < 0.7
        mask[:, 0] = True
    elif case.get("mask") == "bool_empty_rows":
        mask = rng.random(case["mask_shape"]) < 0.6
        mask[:, 2, :] = False                      # a query row with no allowed key
    elif case.get("mask") == "float":
        mask = rng.standard_normal(case["mask_shape"])
    kw = dict(attn_mask=mask, is_causal=case.get("causal", False), enable_gqa=case.get("gqa", False))
    o, lse, *st = fastnn.scaled_dot_product_attention(q, k, v, return_lse=True, dropout_p=p, rng=11, **kw)
    st = st[0] if st else None
    g = rng.standard_normal(o.shape)
    want = fastnn.scaled_dot_product_attention_backward(g, q, k, v, o, lse, dropout_p=p, rng_state=st, **kw)
    group = q.shape[-3] // k.shape[-3] if kw["enable_gqa"] else None
    got = composed(g, q, k, v, o, lse, mask, kw["is_causal"], group=group,
                   max_bytes=case.get("max_bytes", 256 << 20), dropout=backward_dropout(p, st))
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert_close(a, b, np.float64, k=q.shape[-2])


def test_composed_backward_empty():
    q = np.zeros((2, 0, 4))
    k = np.zeros((2, 3, 4))
    v = np.zeros((2, 3, 5))
    o = np.zeros((2, 0, 5))
    lse = np.zeros((2, 0))
    dq, dk, dv = composed(o, q, k, v, o, lse)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert not dk.any() and not dv.any()
