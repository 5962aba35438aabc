"""The oracles themselves, checked against hand-computed values and independent formulations, so a
wrong oracle cannot hide a wrong kernel."""
import math

import numpy as np
import pytest

from fastnn import reference as ref


def test_matmul_reference():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    b = np.array([[5.0, 6.0], [7.0, 8.0]])
    assert np.array_equal(ref.matmul(a, b), [[19.0, 22.0], [43.0, 50.0]])
    assert ref.matmul(np.ones(3), np.ones(3)) == 3.0
    assert np.array_equal(ref.matmul(np.ones((2, 0)), np.ones((0, 3))), np.zeros((2, 3)))
    with pytest.raises(ValueError):
        ref.matmul(np.array(1.0), np.ones(2))


def test_linear_and_relu_reference():
    x = np.array([[1.0, -2.0]])
    w = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]])
    b = np.array([0.5, 0.5, -1.0])
    assert np.array_equal(ref.linear(x, w, b), [[1.5, -1.5, -1.0]])
    assert np.array_equal(ref.linear(x, w, b, activation="relu"), [[1.5, 0.0, 0.0]])
    assert np.array_equal(ref.linear(x, w), [[1.0, -2.0, 0.0]])
    r = ref.relu(np.array([-1.0, 0.0, 2.0, np.nan, -np.inf, np.inf]))
    assert np.array_equal(r, [0.0, 0.0, 2.0, np.nan, 0.0, np.inf], equal_nan=True)
    gb = ref.relu_backward(np.array([1.0, 2.0, 3.0, np.nan]), np.array([1.0, 0.0, np.nan, -1.0]))
    assert np.array_equal(gb, [1.0, 0.0, 0.0, 0.0])


def test_softmax_reference():
    x = np.array([[0.0, math.log(3.0)], [1e4, 1e4], [-1e30, 0.0]])
    s = ref.softmax(x)
    assert np.allclose(s, [[0.25, 0.75], [0.5, 0.5], [0.0, 1.0]], rtol=1e-15, atol=0)
    ls = ref.log_softmax(x)
    assert np.allclose(ls[:2], np.log([[0.25, 0.75], [0.5, 0.5]]), rtol=1e-15, atol=0)
    assert ls[2, 0] == -1e30 and ls[2, 1] == 0.0
    assert np.allclose(ref.softmax(x.T, axis=0), s.T, rtol=1e-15, atol=0)
    with np.errstate(invalid="ignore"):
        assert np.isnan(ref.softmax(np.array([1.0, np.inf]))).all()
        assert np.isnan(ref.softmax(np.array([1.0, np.nan]))).all()
    assert np.array_equal(ref.softmax(np.array([0.0, -np.inf])), [1.0, 0.0])


def test_softmax_backward_reference_matches_jacobian():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(7)
    g = rng.standard_normal(7)
    y = ref.softmax(x)
    jac = np.diag(y) - np.outer(y, y)  # d softmax_i / d x_j
    assert np.allclose(ref.softmax_backward(g, y), jac.T @ g, rtol=1e-13, atol=1e-15)
    # finite differences
    eps = 1e-6
    fd = np.array([(g @ ref.softmax(x + eps * e) - g @ ref.softmax(x - eps * e)) / (2 * eps) for e in np.eye(7)])
    assert np.allclose(ref.softmax_backward(g, y), fd, rtol=1e-6, atol=1e-9)



def test_log_softmax_backward_reference_matches_jacobian():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 7))
    g = rng.standard_normal((3, 7))
    y = ref.log_softmax(x, axis=-1)
    for i in range(3):  # d log_softmax_i / d x_j = delta_ij - softmax_j
        jac = np.eye(7) - np.exp(y[i])[None, :]
        assert np.allclose(ref.log_softmax_backward(g, y)[i], jac.T @ g[i], rtol=1e-13, atol=1e-15)
    assert np.allclose(ref.log_softmax_backward(g.T, y.T, axis=0), ref.log_softmax_backward(g, y).T)

def test_cross_entropy_reference():
    logits = np.array([[0.0, 0.0], [math.log(3.0), 0.0]])
    labels = np.array([1, 0])
    loss, grad = ref.cross_entropy(logits, labels)
    assert isinstance(loss, float)
    assert math.isclose(loss, (math.log(2.0) - math.log(0.75)) / 2, rel_tol=1e-15)
    assert np.allclose(grad, [[0.25, -0.25], [-0.125, 0.125]], rtol=1e-15, atol=1e-17)
    with pytest.raises(ValueError):
        ref.cross_entropy(logits, np.array([0, 2]))
    # gradient by finite differences
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4))
    lab = np.array([3, 0, 2])
    _, grad = ref.cross_entropy(x, lab)
    eps = 1e-6
    fd = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[idx] = eps
        fd[idx] = (ref.cross_entropy(x + d, lab)[0] - ref.cross_entropy(x - d, lab)[0]) / (2 * eps)
    assert np.allclose(grad, fd, rtol=1e-6, atol=1e-9)


def loop_attention(q, k, v, allowed, bias, scale):
    """Attention one query row at a time, straight from the definition."""
    out = np.zeros((q.shape[0], v.shape[1]))
    for i in range(q.shape[0]):
        idx = [j for j in range(k.shape[0]) if allowed[i, j]]
        if not idx:
            continue
        s = np.array([scale * (q[i] @ k[j]) + bias[i, j] for j in idx])
        w = np.exp(s - s.max())
        w /= w.sum()
        out[i] = sum(wj * v[j] for wj, j in zip(w, idx))
    return out


def test_sdpa_reference_against_loops():
    rng = np.random.default_rng(2)
    L, S, E, Ev = 6, 9, 5, 3
    q, k, v = rng.standard_normal((L, E)), rng.standard_normal((S, E)), rng.standard_normal((S, Ev))
    ones, zeros = np.ones((L, S), bool), np.zeros((L, S))
    sc = 1 / math.sqrt(E)
    assert np.allclose(ref.scaled_dot_product_attention(q, k, v), loop_attention(q, k, v, ones, zeros, sc))
    causal = np.tril(ones)
    assert np.allclose(ref.scaled_dot_product_attention(q, k, v, is_causal=True),
                       loop_attention(q, k, v, causal, zeros, sc))
    mask = rng.random((L, S)) < 0.5
    mask[2] = False
    got = ref.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.7)
    assert np.allclose(got, loop_attention(q, k, v, mask, zeros, 0.7))
    assert np.all(got[2] == 0)
    bias = rng.standard_normal((L, S))
    bias[4] = -np.inf
    got = ref.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert np.allclose(got, loop_attention(q, k, v, ~np.isneginf(bias), np.where(np.isneginf(bias), 0, bias), sc))
    assert np.all(got[4] == 0)
    # causal with L > S: rows beyond S see every key
    got = ref.scaled_dot_product_attention(k, q, rng.standard_normal((L, 2)), is_causal=True)
    assert got.shape == (S, 2)
    # GQA: query head h uses key/value head h // (Hq / Hkv)
    q4 = rng.standard_normal((1, 6, L, E))
    k4, v4 = rng.standard_normal((1, 2, S, E)), rng.standard_normal((1, 2, S, Ev))
    got = ref.scaled_dot_product_attention(q4, k4, v4, enable_gqa=True)
    for h in range(6):
        assert np.allclose(got[0, h], loop_attention(q4[0, h], k4[0, h // 3], v4[0, h // 3], ones, zeros, sc))
    with pytest.raises(ValueError):
        ref.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    with pytest.raises(ValueError):
        ref.scaled_dot_product_attention(q, k, v, dropout_p=1.0)


def test_adam_reference_hand_computed():
    p = np.array([1.0, -1.0])
    g = np.array([0.5, 2.0])
    m, v = np.zeros(2), np.zeros(2)
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.999, 1e-8, 0.01
    for step in (1, 2):
        p0, m0, v0 = p.copy(), m.copy(), v.copy()
        ref.adam_update(p, g, m, v, step=step, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd)
        gg = g + wd * p0
        m_exp = b1 * m0 + (1 - b1) * gg
        v_exp = b2 * v0 + (1 - b2) * gg * gg
        m_hat, v_hat = m_exp / (1 - b1 ** step), v_exp / (1 - b2 ** step)
        assert np.allclose(m, m_exp, rtol=1e-14) and np.allclose(v, v_exp, rtol=1e-14)
        assert np.allclose(p, p0 - lr * m_hat / (np.sqrt(v_hat) + eps), rtol=1e-14)
    # AdamW decays the parameter directly; maximize flips the gradient; AMSGrad keeps the running max.
    p, m, v, vmax = np.array([2.0]), np.zeros(1), np.zeros(1), np.array([5.0])
    ref.adam_update(p, np.array([1.0]), m, v, step=1, lr=0.1, weight_decay=0.5, decoupled_weight_decay=True,
                    maximize=True, max_exp_avg_sq=vmax)
    assert vmax[0] == 5.0 and np.isclose(m[0], -0.1)
    denom = math.sqrt(5.0) / math.sqrt(1 - 0.999) + 1e-8
    assert np.isclose(p[0], 2.0 * (1 - 0.05) - 0.1 / 0.1 * (-0.1) / denom, rtol=1e-14)
    with pytest.raises(ValueError):
        ref.adam_update(p, p.copy(), m, v, step=0)
