"""cross_entropy: loss and gradient against the oracle, label dtypes and views, large logits, NaN, errors."""
import math

import numpy as np
import pytest

import fastnn
from fastnn import reference as ref
from conftest import DTYPES, LAYOUTS, Unchanged, assert_close, f64, make_array
from gpu_helpers import GPU_DTYPES, GPU_TOL, gpu, gpu_check, needs_gpu, rand

SHAPES = [(1, 1), (1, 7), (7, 1), (13, 31), (16, 17), (17, 16), (64, 10), (33, 65), (255, 3),
          (127, 1000), (5, 1025)]


def check_ce(rng, n, c, dtype, label_dtype=np.int64, layout="C", scale=1.0, logits=None):
    if logits is None:
        logits = make_array(rng, (n, c), dtype, layout, scale)
    labels = rng.integers(0, c, size=n).astype(label_dtype)
    keep = Unchanged(logits, labels)
    loss, grad = fastnn.cross_entropy(logits, labels)
    keep.check()
    ref_loss, ref_grad = ref.cross_entropy(f64(logits), labels)
    assert isinstance(loss, float), f"loss should be a Python float, got {type(loss)}"
    assert_close(np.asarray(loss), np.asarray(ref_loss), dtype, k=c, check_dtype=False)
    assert_close(grad, ref_grad, dtype, k=c)
    return loss, grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("n,c", SHAPES)
def test_cross_entropy_shapes(rng, dtype, label_dtype, n, c):
    loss, grad = check_ce(rng, n, c, dtype, label_dtype)
    # Each gradient row sums to zero: softmax sums to 1, the one-hot too.
    assert np.allclose(grad.sum(axis=1), 0, atol=10 * c * np.finfo(dtype).eps / n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_core_every_isa(isa, rng, dtype):
    for n, c in [(1, 1), (3, 7), (5, 16), (4, 17), (9, 33), (2, 65), (3, 1025)]:
        check_ce(rng, n, c, dtype, np.int32)
        check_ce(rng, n, c, dtype, np.int64)
    check_ce(rng, 7, 31, dtype, layout="T")
    check_ce(rng, 7, 31, dtype, scale=1e4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cross_entropy_layouts(rng, dtype, layout):
    check_ce(rng, 23, 37, dtype, layout=layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_dtype", [np.int32, np.int64])
def test_cross_entropy_label_views(rng, dtype, label_dtype):
    logits = make_array(rng, (19, 11), dtype)
    labels = rng.integers(0, 11, size=38).astype(label_dtype)[::-2]
    keep = Unchanged(logits, labels)
    loss, grad = fastnn.cross_entropy(logits, labels)
    keep.check()
    ref_loss, ref_grad = ref.cross_entropy(f64(logits), labels)
    assert_close(np.asarray(loss), np.asarray(ref_loss), dtype, k=11, check_dtype=False)
    assert_close(grad, ref_grad, dtype, k=11)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_known_value(dtype):
    # Uniform logits over C classes: loss = log(C), grad = (1/C - onehot) / N.
    logits = np.zeros((4, 5), dtype)
    labels = np.array([0, 4, 2, 2])
    loss, grad = fastnn.cross_entropy(logits, labels)
    assert abs(loss - np.log(5)) <= 1e-6 * np.log(5)
    expected = np.full((4, 5), 0.2 / 4)
    expected[np.arange(4), labels] -= 0.25
    assert_close(grad, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1e2, 1e4, 1e30])
def test_cross_entropy_large_logits(rng, dtype, scale):
    loss, grad = check_ce(rng, 17, 29, dtype, scale=scale)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_nan(rng, dtype):
    logits = make_array(rng, (6, 9), dtype)
    logits[2, 4] = np.nan
    labels = rng.integers(0, 9, size=6)
    loss, grad = fastnn.cross_entropy(logits, labels)
    ref_loss, ref_grad = ref.cross_entropy(f64(logits), labels)
    assert np.isnan(loss) and np.isnan(ref_loss)
    assert_close(grad, ref_grad, dtype, k=9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_empty_batch(dtype):
    # N = 0: the mean is undefined: NaN (as torch's mean reduction over no rows), with an empty gradient.
    loss, grad = fastnn.cross_entropy(np.ones((0, 4), dtype), np.zeros(0, np.int64))
    assert isinstance(loss, float) and np.isnan(loss)
    assert grad.shape == (0, 4) and grad.dtype == np.dtype(dtype)


@pytest.mark.parametrize("label_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("bad_label", [-1, 5, 1000, -2**31])
def test_cross_entropy_label_out_of_range(label_dtype, bad_label):
    logits = np.zeros((3, 5), np.float32)
    labels = np.array([0, bad_label, 1], label_dtype)
    with pytest.raises(ValueError, match="label"):
        fastnn.cross_entropy(logits, labels)


def test_cross_entropy_errors():
    logits = np.zeros((3, 5), np.float32)
    labels = np.array([0, 1, 2])
    with pytest.raises(ValueError, match="labels"):
        fastnn.cross_entropy(logits, labels[:2])
    with pytest.raises(ValueError, match="labels"):
        fastnn.cross_entropy(logits, labels.reshape(3, 1))
    with pytest.raises(ValueError, match="logits"):
        fastnn.cross_entropy(np.zeros(5, np.float32), labels[:1])
    with pytest.raises(ValueError, match="logits"):
        fastnn.cross_entropy(np.zeros((3, 5, 2), np.float32), labels)
    with pytest.raises(TypeError, match="labels"):
        fastnn.cross_entropy(logits, labels.astype(np.float32))
    with pytest.raises(TypeError, match="labels"):
        fastnn.cross_entropy(logits, labels.astype(np.bool_))
    with pytest.raises(TypeError, match="logits"):
        fastnn.cross_entropy(logits.astype(np.int32), labels)
    with pytest.raises(TypeError, match="logits"):
        fastnn.cross_entropy(logits.astype(np.int16), labels)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 0, 3])
@pytest.mark.parametrize("n,c", [(1, 1), (7, 5), (33, 65), (255, 3), (5, 1025)])
def test_cross_entropy_reduction_ignore_index(rng, dtype, reduction, ignore_index, n, c):
    logits = make_array(rng, (n, c), dtype)
    labels = rng.integers(0, c, size=n)
    labels[rng.random(n) < 0.3] = ignore_index
    keep = Unchanged(logits, labels)
    loss, grad = fastnn.cross_entropy(logits, labels, reduction=reduction, ignore_index=ignore_index)
    keep.check()
    ref_loss, ref_grad = ref.cross_entropy(f64(logits), labels, reduction=reduction, ignore_index=ignore_index)
    if reduction == "none":
        assert loss.dtype == dtype and loss.shape == (n,)
    else:
        assert isinstance(loss, float)
    np.testing.assert_allclose(np.asarray(loss), np.asarray(ref_loss), rtol=50 * c * np.finfo(dtype).eps,
                               atol=50 * c * np.finfo(dtype).eps)
    assert_close(grad, ref_grad, dtype, k=c)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_all_ignored(dtype):
    logits = np.ones((3, 4), dtype)
    labels = np.full(3, -100, np.int64)
    loss, grad = fastnn.cross_entropy(logits, labels)  # torch: NaN (0 / 0) and a zero gradient
    assert np.isnan(loss) and not grad.any()
    assert fastnn.cross_entropy(logits, labels, reduction="sum")[0] == 0.0
    row, grad = fastnn.cross_entropy(logits, labels, reduction="none")
    assert not row.any() and not grad.any()
    # C == 0 is valid when every row is ignored
    loss, grad = fastnn.cross_entropy(np.ones((2, 0), dtype), np.full(2, 7), ignore_index=7, reduction="sum")
    assert loss == 0.0 and grad.shape == (2, 0)


def test_cross_entropy_reduction_errors():
    logits, labels = np.zeros((2, 3), np.float32), np.zeros(2, np.int64)
    with pytest.raises(ValueError, match="reduction"):
        fastnn.cross_entropy(logits, labels, reduction="avg")
    with pytest.raises(TypeError, match="ignore_index"):
        fastnn.cross_entropy(logits, labels, ignore_index=1.5)
    with pytest.raises(ValueError, match="ignore_index=-1"):
        fastnn.cross_entropy(logits, np.array([0, -2]), ignore_index=-1)


# ---- on the GPU: cupy arrays, fast and plain kernels, float32 and float16 (skipped, with the reason, without a usable GPU) ----

@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 10), (33, 1000), (4, 1025), (3, 5000)])
@pytest.mark.parametrize("label_dtype", [np.int32, np.int64])
def test_cross_entropy_gpu(rng, variant, dtype, shape, label_dtype):
    x = rand(rng, shape, dtype, scale=2.0)
    labels = rng.integers(0, shape[1], shape[0]).astype(label_dtype)
    loss, grad = fastnn.cross_entropy(gpu(x), gpu(labels))
    want_loss, want_grad = ref.cross_entropy(f64(x), labels)
    assert isinstance(loss, float)
    assert abs(loss - want_loss) <= GPU_TOL[dtype] * max(abs(want_loss), 1.0)
    gpu_check(grad, want_grad, dtype)


@needs_gpu
def test_cross_entropy_errors_gpu():
    x = gpu(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="labels"):
        fastnn.cross_entropy(x, gpu(np.array([0, 4, 1])))
    with pytest.raises(TypeError, match="labels"):
        fastnn.cross_entropy(x, np.array([0, 1, 1]))          # host labels with GPU logits
    loss, grad = fastnn.cross_entropy(gpu(np.zeros((0, 4), np.float32)), gpu(np.zeros(0, np.int64)))
    assert math.isnan(loss) and grad.shape == (0, 4)
