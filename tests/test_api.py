"""The module surface: version, info(), thread-count and ISA controls, the public names, non-array inputs."""
import numpy as np
import pytest

import fastnn
from conftest import supported_isas

PUBLIC = ["matmul", "linear", "relu", "relu_backward", "softmax", "log_softmax", "softmax_backward",
          "cross_entropy", "scaled_dot_product_attention", "adam_update", "set_num_threads",
          "get_num_threads", "info", "cpu_isa", "set_cpu_isa"]


def test_public_names_have_docstrings():
    for name in PUBLIC:
        f = getattr(fastnn, name)
        assert callable(f), name
        assert f.__doc__ and len(f.__doc__.strip()) > 20, f"{name} lacks a docstring"


def test_version():
    assert isinstance(fastnn.__version__, str) and fastnn.__version__
    assert fastnn.info()["version"] == fastnn.__version__


def test_info():
    info = fastnn.info()
    assert isinstance(info, dict)
    supported = info["cpu_isa_supported"]
    assert isinstance(supported, list) and all(isinstance(n, str) for n in supported)
    assert "generic" in supported
    assert set(supported) <= {"generic", "avx2", "avx512", "avx512bf16"}
    assert fastnn.cpu_isa() in supported
    assert isinstance(fastnn.cpu_isa(), str)


def test_info_reports_current_state(restore_threads):
    fastnn.set_num_threads(1)
    assert fastnn.info().get("num_threads", 1) == 1
    assert fastnn.info().get("cpu_isa", fastnn.cpu_isa()) == fastnn.cpu_isa()


def test_set_get_num_threads(restore_threads):
    for n in [1, 2, 3, 8, restore_threads]:
        fastnn.set_num_threads(n)
        assert fastnn.get_num_threads() == n
    assert fastnn.get_num_threads() >= 1


def test_set_num_threads_rejects_non_int(restore_threads):
    with pytest.raises(TypeError):
        fastnn.set_num_threads("4")
    with pytest.raises(TypeError):
        fastnn.set_num_threads(2.5)
    assert fastnn.get_num_threads() == restore_threads


@pytest.mark.parametrize("n", [0, -1])
def test_set_num_threads_rejects_less_than_one(restore_threads, n):
    with pytest.raises(ValueError):
        fastnn.set_num_threads(n)
    assert fastnn.get_num_threads() == restore_threads


def test_set_cpu_isa_roundtrip():
    old = fastnn.cpu_isa()
    try:
        for name in supported_isas():
            fastnn.set_cpu_isa(name)
            assert fastnn.cpu_isa() == name
    finally:
        fastnn.set_cpu_isa(old)
    assert fastnn.cpu_isa() == old


@pytest.mark.parametrize("name", ["bogus", "", "AVX2x", "sse"])
def test_set_cpu_isa_unknown(name):
    old = fastnn.cpu_isa()
    with pytest.raises(ValueError):
        fastnn.set_cpu_isa(name)
    assert fastnn.cpu_isa() == old


def test_set_cpu_isa_unsupported_here():
    unavailable = [n for n in ["generic", "avx2", "avx512", "avx512bf16"] if n not in supported_isas()]
    if not unavailable:
        pytest.skip("every ISA path is usable on this CPU")
    old = fastnn.cpu_isa()
    for name in unavailable:
        with pytest.raises(ValueError):
            fastnn.set_cpu_isa(name)
    assert fastnn.cpu_isa() == old


@pytest.mark.parametrize("call", [
    lambda: fastnn.matmul([[1.0, 2.0]], np.ones((2, 2))),
    lambda: fastnn.relu([1.0, -1.0]),
    lambda: fastnn.softmax(3.0),
    lambda: fastnn.cross_entropy(np.zeros((2, 3)), [0, 1]),
    lambda: fastnn.scaled_dot_product_attention(np.ones((2, 2)), np.ones((2, 2)), None),
])
def test_non_array_inputs(call):
    # Lists and scalars are rejected with a TypeError rather than silently copied (or crashing).
    with pytest.raises(TypeError):
        call()


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix
def test_numpy_subclasses(tmp_path):
    # Read as their base ndarray: plain ndarrays back (np.matrix's 2-D rules would make linear_backward's
    # bias gradient (1, out)); out= writes the subclass's memory and returns it. A masked array is refused
    # (its mask would be ignored).
    g = np.matrix(np.arange(6.0).reshape(2, 3))
    grads = fastnn.linear_backward(g, g, np.ones((3, 3)))
    assert all(type(a) is np.ndarray for a in grads) and grads[2].shape == (3,)
    np.testing.assert_array_equal(grads[2], [3.0, 5.0, 7.0])
    mm = np.memmap(tmp_path / "x.bin", dtype=np.float32, mode="w+", shape=(4,))
    mm[:] = [-1.0, 2.0, -3.0, 4.0]
    assert fastnn.relu(mm, out=mm) is mm
    np.testing.assert_array_equal(mm, [0.0, 2.0, 0.0, 4.0])
    masked = np.ma.array([1.0, -1.0], mask=[False, True])
    with pytest.raises(TypeError, match="masked array"):
        fastnn.relu(masked)
    with pytest.raises(TypeError, match="masked array"):  # out= too (the compiled fast path declines it)
        fastnn.relu(np.ones(2), out=masked)
    with pytest.raises(TypeError, match="masked array"):
        fastnn.matmul(np.ones((2, 2)), np.ones((2, 2)), out=np.ma.array(np.zeros((2, 2)), mask=True))
