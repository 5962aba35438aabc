"""Every op on every array type available: numpy always; torch CPU tensors and JAX arrays when importable;
cupy arrays and torch CUDA tensors when a GPU is usable (skipped with the reason otherwise). Results come
back in the caller's type and match the float64 oracle; in-place ops write the caller's arrays (JAX's are
read-only: a ValueError); mixing array types is a TypeError naming both. The shared checks also run
against a stand-in GPU backend (numpy underneath), which must reject exactly what the CPU path rejects,
with the same messages."""
import subprocess
import sys

import numpy as np
import pytest

import fastnn
from fastnn import _backend
from fastnn import reference as ref
from conftest import assert_close, f64, pkg_env, tolerance
from op_table import OP_IDS, OPS


# ---- array types ----------------------------------------------------------------------------------------

def _gpu_reason():
    if not fastnn.cuda_is_available():
        return fastnn.info().get("cuda_unavailable_reason") or "no usable GPU"
    return None


class ArrayType:
    """How a test makes arrays of one type from numpy arrays, and reads results back."""

    def __init__(self, name, to, is_mine, to_numpy, dtypes, tol16=None):
        self.name, self.to, self.is_mine, self.to_numpy, self.dtypes = name, to, is_mine, to_numpy, dtypes


def _numpy():
    return ArrayType("numpy", lambda a: a, lambda r: type(r) is np.ndarray, np.asarray,
                     [np.float32, np.float64])


def _torch(cuda):
    torch = pytest.importorskip("torch")
    dev = "cuda" if cuda else "cpu"
    return ArrayType("torch_cuda" if cuda else "torch", lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev),
                     lambda r: isinstance(r, torch.Tensor) and r.device.type == dev,
                     lambda r: r.detach().cpu().numpy(), [np.float32] if cuda else [np.float32, np.float64])


def _jax():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)  # float64 arrays (off by default in JAX)
    import jax.numpy as jnp
    return ArrayType("jax", lambda a: jnp.asarray(a), lambda r: isinstance(r, jax.Array), np.asarray,
                     [np.float32, np.float64])


def _cupy():
    cp = pytest.importorskip("cupy")
    return ArrayType("cupy", cp.asarray, lambda r: isinstance(r, cp.ndarray), cp.asnumpy, [np.float32])


_MAKERS = {"numpy": _numpy, "torch": lambda: _torch(False), "jax": _jax, "cupy": _cupy,
           "torch_cuda": lambda: _torch(True)}


@pytest.fixture(params=list(_MAKERS))
def array_type(request):
    """Runs a test once per array type; GPU types skip (with the reason) without a usable GPU."""
    if request.param in ("cupy", "torch_cuda"):
        reason = _gpu_reason()
        if reason:
            pytest.skip(f"{request.param}: {reason}")
    return _MAKERS[request.param]()


def _convert(at, args):
    return tuple(at.to(a) if isinstance(a, np.ndarray) else a for a in args)


def _check(at, got, want, dtype, k):
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want):
            _check(at, g, w, dtype, k)
        return
    if want is None:
        assert got is None
        return
    if np.ndim(want) == 0 and not at.is_mine(got):  # cross_entropy's loss: a Python float
        assert isinstance(got, float)
        assert abs(got - float(want)) <= tolerance(dtype, k) * max(1.0, abs(float(want)))
        return
    assert at.is_mine(got), f"expected a {at.name} result, got {type(got)}"
    assert_close(at.to_numpy(got), want, dtype, k=k)


# ---- every op on every array type ------------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_op_on_every_array_type(rng, array_type, op):
    for dtype in array_type.dtypes:
        args, kw = op.build(rng, dtype)
        want = op.oracle(*(f64(a) if a.dtype.kind == "f" else a for a in args), **kw)
        before = [a.copy() for a in args]
        got = getattr(fastnn, op.name)(*_convert(array_type, args), **kw)
        _check(array_type, got, want, dtype, op.k)
        for a, b in zip(args, before):
            assert np.array_equal(a, b)


@pytest.mark.parametrize("op", [op for op in OPS if op.out], ids=[op.name for op in OPS if op.out])
def test_out_is_written_in_the_callers_array(rng, array_type, op):
    dtype = np.float32
    args, kw = op.build(rng, dtype)
    want = op.oracle(*(f64(a) for a in args), **kw)
    out = array_type.to(np.full(np.shape(want), np.nan, dtype))
    call = lambda: getattr(fastnn, op.name)(*_convert(array_type, args), out=out, **kw)
    if array_type.name == "jax":
        with pytest.raises(ValueError, match="^out: jax.Arrays are read-only"):
            call()
        return
    assert call() is out
    assert_close(array_type.to_numpy(out), want, dtype, k=op.k)


def test_relu_in_place_on_the_callers_array(rng, array_type):
    x_np = rng.standard_normal((5, 7)).astype(np.float32)
    x = array_type.to(x_np)
    if array_type.name == "jax":
        with pytest.raises(ValueError, match="read-only"):
            fastnn.relu(x, out=x)
        assert np.array_equal(np.asarray(x), x_np)  # never written
        return
    assert fastnn.relu(x, out=x) is x
    assert np.array_equal(array_type.to_numpy(x), np.maximum(x_np, 0))


def test_adam_update_on_the_callers_arrays(rng, array_type):
    p, g = (rng.standard_normal(37).astype(np.float32) for _ in range(2))
    m, v = np.zeros(37, np.float32), np.zeros(37, np.float32)
    rp, rm, rv = f64(p, m, v)
    arrays = [array_type.to(a) for a in (p, g, m, v)]
    if array_type.name == "jax":
        with pytest.raises(ValueError, match="^param: jax.Arrays are read-only, and adam_update writes param"):
            fastnn.adam_update(*arrays, step=1)
        return
    fastnn.adam_update(*arrays, step=1, lr=1e-2)
    ref.adam_update(rp, f64(g), rm, rv, step=1, lr=1e-2)
    assert_close(array_type.to_numpy(arrays[0]), rp, np.float32)
    assert_close(array_type.to_numpy(arrays[2]), rm, np.float32)


def test_adam_optimizer_on_the_callers_arrays(rng, array_type):
    shapes = [(4, 3), (3,)]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    mine = [array_type.to(p) for p in params]
    if array_type.name == "jax":
        with pytest.raises(ValueError, match=r"params\[0\]: jax.Arrays are read-only"):
            fastnn.Adam(mine)
        return
    opt, want = fastnn.Adam(mine, lr=1e-2), fastnn.Adam([p.copy() for p in params], lr=1e-2)
    for _ in range(3):
        grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        opt.step([array_type.to(g) for g in grads])
        want.step(grads)
    for got, w in zip(opt.params, want.params):
        assert np.array_equal(array_type.to_numpy(got), w)
    assert all(type(v) is np.ndarray for k, v in opt.state_dict().items() if k.startswith("state.") and
               not k.endswith("step"))


# ---- torch specifics ------------------------------------------------------------------------------------

def test_torch_strided_views_are_read_in_place(rng):
    torch = pytest.importorskip("torch")
    a = torch.from_numpy(rng.standard_normal((9, 12))).float()
    for view in (a.T, a[::2, 1::3], a.flip(0)[:, 2:]):
        assert_close(fastnn.relu(view).numpy(), ref.relu(f64(view.numpy())), np.float32)
        assert_close(fastnn.softmax(view, axis=0).numpy(), ref.softmax(f64(view.numpy()), axis=0), np.float32,
                     k=view.shape[0])
    b = torch.from_numpy(rng.standard_normal((12, 5))).float()
    assert_close(fastnn.matmul(a, b.T.contiguous().T).numpy(), f64(a.numpy()) @ f64(b.numpy()), np.float32, k=12)


def test_torch_requires_grad_is_read_as_data(rng):
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 6, requires_grad=True)
    y = fastnn.relu(x)
    assert isinstance(y, torch.Tensor) and not y.requires_grad
    assert torch.equal(y, torch.relu(x.detach()))


def test_torch_tiny_call_path(rng):
    """The ops' torch fast path (Tensor.numpy() in, torch.from_numpy out) gives fresh torch tensors equal to
    the numpy results, and declines what it must not read as plain data, which the general path handles."""
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(rng.standard_normal((6, 8)).astype(np.float32))
    w = torch.from_numpy(rng.standard_normal((8, 3)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal(3).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 8, 6))
    cases = [(fastnn.relu, (x,)), (fastnn.relu_backward, (x, x.T.contiguous().T)), (fastnn.softmax, (x,)),
             (fastnn.log_softmax, (x.T,)), (fastnn.matmul, (x, w)), (fastnn.matmul, (w.T, x.T)),
             (fastnn.linear, (x, w)), (fastnn.linear, (x, w, b))]
    for f, args in cases:
        got = f(*args)
        assert type(got) is torch.Tensor and all(got.data_ptr() != a.data_ptr() for a in args)
        assert np.array_equal(got.numpy(), f(*(a.numpy() for a in args))), f.__name__
    loss, grad = fastnn.cross_entropy(x, labels)
    assert isinstance(loss, float) and type(grad) is torch.Tensor
    y = fastnn.linear(x, torch.nn.Parameter(w), torch.nn.Parameter(b))  # parameters are read detached
    assert type(y) is torch.Tensor and not y.requires_grad and torch.equal(y, fastnn.linear(x, w, b))
    with pytest.raises(TypeError, match=r"^bias: got a numpy.ndarray in a call whose x is a torch.Tensor"):
        fastnn.linear(x, w, b.numpy())
    with pytest.raises(TypeError, match="^x: this torch.Tensor .CPU. cannot be viewed as a CPU array: .*negative bit"):
        fastnn.relu(x._neg_view())


def test_torch_unsupported_dtype_is_a_type_error():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="^x: "):
        fastnn.relu(torch.ones(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="^x: expected a float32, float64, float16 or bfloat16 array, got dtype int64"):
        fastnn.relu(torch.ones(3, dtype=torch.int64))


# ---- mixing and non-arrays ------------------------------------------------------------------------------

def test_mixing_array_types_is_a_type_error_naming_both():
    torch = pytest.importorskip("torch")
    a = np.ones((2, 2), np.float32)
    with pytest.raises(TypeError, match=r"^b: got a torch.Tensor \(CPU\) in a call whose a is a numpy.ndarray"):
        fastnn.matmul(a, torch.ones(2, 2))
    with pytest.raises(TypeError, match=r"^out: got a numpy.ndarray in a call whose x is a torch.Tensor"):
        fastnn.relu(torch.ones(2), out=np.ones(2, np.float32))


@pytest.mark.parametrize("junk", [[1.0, 2.0], 3.0, None, "x"])
def test_non_arrays_name_the_accepted_types(junk):
    with pytest.raises(TypeError, match=r"^x: expected an array \(numpy.ndarray, torch.Tensor, jax.Array, "
                                        r"cupy.ndarray"):
        fastnn.relu(junk)


def test_import_does_not_import_torch_jax_or_cupy(tmp_path):
    code = ("import sys, numpy as np, fastnn\n"
            "fastnn.relu(np.ones(3)); fastnn.info()\n"
            "print(sorted(m for m in ('torch', 'jax', 'cupy') if m in sys.modules))\n")
    # (run outside the source tree: `python -c` puts the working directory first on sys.path)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=pkg_env(), cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


# ---- the GPU path's checks, without a GPU ----------------------------------------------------------------

class _Boxed:
    """An array of a family fastnn does not know, whose backend is the stand-in GPU one below."""

    def __init__(self, a):
        self.a = a


class _FakeGpu(_backend.Cpu):
    """A stand-in GPU backend: the numpy CPU backend's kernels behind the GPU backend's role (claims its
    arrays, no compiled fast paths)."""
    kind = "GPU"

    def __init__(self, family):
        super().__init__(family)
        self.fast = False
        self.claimed = []

    def claim(self, a, name):
        self.claimed.append(name)
        return a


class _BoxedFamily(_backend.Family):
    def backend(self, op):
        return _FakeGpu(self)

    def native(self, x):
        return x.a

    def back(self, a):
        return _Boxed(a)


def _bad_calls(rng):
    """(name, call(box)) pairs: calls every backend must reject; box() makes an array of the tested type."""
    x = rng.standard_normal((4, 6)).astype(np.float32)
    w = rng.standard_normal((6, 3)).astype(np.float32)
    q = rng.standard_normal((2, 5, 8)).astype(np.float32)
    p, z = np.ones(5, np.float32), np.zeros(5, np.float32)
    overlapping = np.lib.stride_tricks.as_strided(np.zeros(8, np.float32), (4, 6), (4, 4))
    F = fastnn
    return [
        ("dtype", lambda b: F.relu(b(x.astype(np.int32)))),
        ("byteswapped", lambda b: F.relu(b(x.astype(">f4")))),
        ("out self-overlap", lambda b: F.relu(b(x), out=b(overlapping))),
        ("out shape", lambda b: F.relu(b(x), out=b(x[:2]))),
        ("out read-only", lambda b: F.relu(b(x), out=b(np.broadcast_to(x[:1], x.shape)))),
        ("matmul 0-d", lambda b: F.matmul(b(np.ones((), np.float32)), b(w))),
        ("matmul inner", lambda b: F.matmul(b(x), b(x))),
        ("matmul dtypes", lambda b: F.matmul(b(x), b(w.astype(np.float64)))),
        ("linear shape", lambda b: F.linear(b(x), b(w.T.copy()))),
        ("linear activation", lambda b: F.linear(b(x), b(w), activation="gelu")),
        ("linear bias", lambda b: F.linear(b(x), b(w), b(np.ones(4, np.float32)))),
        ("linear_backward shape", lambda b: F.linear_backward(b(x), b(x), b(w))),
        ("softmax axis", lambda b: F.softmax(b(x), axis=2)),
        ("softmax axis type", lambda b: F.softmax(b(x), axis=1.0)),
        ("softmax_backward shape", lambda b: F.softmax_backward(b(x), b(x[:2]))),
        ("cross_entropy label", lambda b: F.cross_entropy(b(x), b(np.array([0, 1, 2, 6])))),
        ("cross_entropy labels dtype", lambda b: F.cross_entropy(b(x), b(np.zeros(4, np.float32)))),
        ("sdpa scale inf", lambda b: F.scaled_dot_product_attention(b(q), b(q), b(q), scale=float("inf"))),
        ("sdpa scale nan", lambda b: F.scaled_dot_product_attention(b(q), b(q), b(q), scale=float("nan"))),
        ("sdpa dropout", lambda b: F.scaled_dot_product_attention(b(q), b(q), b(q), dropout_p=1.0)),
        ("sdpa mask dtype", lambda b: F.scaled_dot_product_attention(b(q), b(q), b(q),
                                                                     attn_mask=b(np.ones((5, 5), np.int8)))),
        ("sdpa mask+causal", lambda b: F.scaled_dot_product_attention(b(q), b(q), b(q), b(np.ones((5, 5), bool)),
                                                                      is_causal=True)),
        ("sdpa gqa", lambda b: F.scaled_dot_product_attention(b(q[None]), b(q[None, :1]), b(q[None]),
                                                              enable_gqa=True)),
        ("sdpa_backward lse", lambda b: F.scaled_dot_product_attention_backward(b(q), b(q), b(q), b(q), b(q),
                                                                                b(q))),
        ("adam lr inf", lambda b: F.adam_update(b(p), b(z), b(z.copy()), b(z.copy()), step=1, lr=float("inf"))),
        ("adam eps inf", lambda b: F.adam_update(b(p), b(z), b(z.copy()), b(z.copy()), step=1, eps=float("inf"))),
        ("adam wd inf", lambda b: F.adam_update(b(p), b(z), b(z.copy()), b(z.copy()), step=1,
                                                weight_decay=float("inf"))),
        ("adam beta", lambda b: F.adam_update(b(p), b(z), b(z.copy()), b(z.copy()), step=1, beta1=1.0)),
        ("adam step", lambda b: F.adam_update(b(p), b(z), b(z.copy()), b(z.copy()), step=0)),
        ("adam shared state", lambda b: F.adam_update(b(p), b(z), b(z), b(z), step=1)),
        ("adam not contiguous", lambda b: F.adam_update(b(np.ones((4, 4), np.float32).T), b(z), b(z), b(z), step=1)),
    ]


def test_gpu_backend_rejects_what_the_cpu_rejects_with_the_same_message(rng, monkeypatch):
    family = _BoxedFamily("boxed array", gpu=True)
    real = _backend.family_of
    monkeypatch.setattr(_backend, "family_of", lambda x: family if isinstance(x, _Boxed) else real(x))
    for name, call in _bad_calls(rng):
        with pytest.raises((TypeError, ValueError)) as on_cpu:
            call(lambda a: a)
        with pytest.raises((TypeError, ValueError)) as on_gpu:
            call(_Boxed)
        assert (type(on_gpu.value), str(on_gpu.value)) == (type(on_cpu.value), str(on_cpu.value)), name
    # and a good call runs on the stand-in backend, results boxed
    y = fastnn.relu(_Boxed(np.array([-1.0, 2.0], np.float32)))
    assert isinstance(y, _Boxed) and np.array_equal(y.a, [0.0, 2.0])
