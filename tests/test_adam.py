"""adam_update: several steps against the oracle for every option (weight decay, AdamW, maximize, AMSGrad),
in-place semantics, and every argument check."""
import itertools

import numpy as np
import pytest

import fastnn
from fastnn import reference as ref
from conftest import DTYPES, Unchanged, assert_close, f64
from gpu_helpers import GPU_DTYPES, GPU_TOL, cp, gpu, gpu_check, needs_gpu, rand

OPTIONS = list(itertools.product([0.0, 0.1], [False, True], [False, True], [False, True]))
OPTION_IDS = [f"wd{wd}-{'adamw' if dec else 'l2'}-{'max' if mx else 'min'}-{'ams' if ams else 'plain'}"
              for wd, dec, mx, ams in OPTIONS]


def make_state(rng, shape, dtype, amsgrad):
    param = rng.standard_normal(shape).astype(dtype)
    exp_avg = (0.1 * rng.standard_normal(shape)).astype(dtype)
    exp_avg_sq = (0.01 * rng.random(shape)).astype(dtype)
    max_sq = (exp_avg_sq * rng.uniform(0.5, 2.0, shape)).astype(dtype) if amsgrad else None
    return param, exp_avg, exp_avg_sq, max_sq


def random_grad(rng, shape, dtype):
    g = rng.standard_normal(shape)
    g[rng.random(shape) < 0.1] *= 1e-9   # tiny gradients: eps in the denominator matters
    return g.astype(dtype)


def run_steps(rng, shape, dtype, steps=5, lr=1e-3, weight_decay=0.0, decoupled=False, maximize=False,
              amsgrad=False, first_step=1, grad_layout=None):
    state = make_state(rng, shape, dtype, amsgrad)
    ref_state = [None if a is None else f64(a) for a in state]
    param, exp_avg, exp_avg_sq, max_sq = state
    hyper = dict(lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay,
                 decoupled_weight_decay=decoupled, maximize=maximize)
    for step in range(first_step, first_step + steps):
        grad = random_grad(rng, shape, dtype)
        if grad_layout == "neg":
            grad = grad[::-1].copy()[::-1]
        before = f64(param)
        keep = Unchanged(grad)
        fastnn.adam_update(param, grad, exp_avg, exp_avg_sq, step=step, max_exp_avg_sq=max_sq, **hyper)
        keep.check()
        rp, rm, rv, rmax = ref_state
        ref.adam_update(rp, f64(grad), rm, rv, step=step, max_exp_avg_sq=rmax, **hyper)
        # The arrays passed in are the ones updated, in place, with unchanged shape and dtype.
        assert param.dtype == np.dtype(dtype) and param.shape == tuple(shape)
        assert_close(param, rp, dtype)
        assert_close(exp_avg, rm, dtype)
        assert_close(exp_avg_sq, rv, dtype)
        if amsgrad:
            assert_close(max_sq, rmax, dtype)
        if dtype == np.float64 and param.size:
            # The update itself (tiny next to param) must match too, not just param.
            assert_close(f64(param) - before, rp - before, dtype, k=64)
        if param.size:
            rp[...] = param   # resync so float32 rounding does not compound across steps
            rm[...] = exp_avg
            rv[...] = exp_avg_sq
            if amsgrad:
                rmax[...] = max_sq


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("wd,decoupled,maximize,amsgrad", OPTIONS, ids=OPTION_IDS)
def test_adam_options(rng, dtype, wd, decoupled, maximize, amsgrad):
    run_steps(rng, (37, 29), dtype, weight_decay=wd, decoupled=decoupled, maximize=maximize, amsgrad=amsgrad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (15,), (16,), (17,), (31,), (33,), (63,), (65,), (127,),
                                   (1000,), (100003,), (3, 0), (13, 31), (2, 3, 61)])
def test_adam_shapes(rng, dtype, shape):
    run_steps(rng, shape, dtype, steps=3, weight_decay=0.01, amsgrad=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lr,beta1,beta2,eps", [(0.1, 0.5, 0.9, 1e-3), (1.0, 0.0, 0.0, 1e-8), (1e-4, 0.99, 0.9999, 1e-12)])
def test_adam_hyperparameters(rng, dtype, lr, beta1, beta2, eps):
    param = rng.standard_normal(50).astype(dtype)
    state = [param, np.zeros(50, dtype), np.zeros(50, dtype)]
    ref_state = [f64(a) for a in state]
    for step in range(1, 6):
        grad = random_grad(rng, 50, dtype)
        kw = dict(step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=0.05)
        fastnn.adam_update(state[0], grad, state[1], state[2], **kw)
        ref.adam_update(ref_state[0], f64(grad), ref_state[1], ref_state[2], **kw)
        for got, expected in zip(state, ref_state):
            assert_close(got, expected, dtype, k=step)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step", [1, 2, 10, 1000, 10**6])
def test_adam_late_steps(rng, dtype, step):
    # Bias corrections at large step counts (beta2**step underflows gracefully).
    run_steps(rng, (41,), dtype, steps=2, first_step=step, lr=0.01, amsgrad=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_grad_view(rng, dtype):
    # grad is read only: any layout is accepted.
    run_steps(rng, (257,), dtype, steps=2, grad_layout="neg")
    param = np.ones((6, 5), dtype)
    m, v = np.zeros_like(param), np.zeros_like(param)
    grad = rng.standard_normal((5, 6)).astype(dtype).T
    rp, rm, rv = f64(param, m, v)
    fastnn.adam_update(param, grad, m, v, step=1)
    ref.adam_update(rp, f64(grad), rm, rv, step=1)
    assert_close(param, rp, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_known_first_step(dtype):
    # Step 1 from zero state with eps = 0: update = lr * g / |g| = lr * sign(g).
    param = np.array([1.0, 2.0, -3.0, 0.5], dtype)
    grad = np.array([0.5, -2.0, 4.0, 1e-3], dtype)
    m, v = np.zeros_like(param), np.zeros_like(param)
    fastnn.adam_update(param, grad, m, v, step=1, lr=0.1, eps=0.0)
    assert_close(param, np.array([0.9, 2.1, -3.1, 0.4]), dtype, k=4)
    assert_close(m, 0.1 * grad.astype(np.float64), dtype)
    assert_close(v, 0.001 * grad.astype(np.float64) ** 2, dtype)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the oracle on NaN
@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_nan_grad(rng, dtype):
    param = rng.standard_normal(20).astype(dtype)
    grad = rng.standard_normal(20).astype(dtype)
    grad[3] = np.nan
    grad[7] = np.inf
    m, v = np.zeros_like(param), np.zeros_like(param)
    rp, rm, rv = f64(param, m, v)
    fastnn.adam_update(param, grad, m, v, step=1)
    ref.adam_update(rp, f64(grad), rm, rv, step=1)
    for got, expected in [(param, rp), (m, rm), (v, rv)]:
        assert_close(got, expected, dtype)
    assert np.isnan(param[3]) and np.isfinite(param[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_core_every_isa(isa, rng, dtype):
    for shape in [(1,), (7,), (16,), (17,), (33,), (1031,)]:
        run_steps(rng, shape, dtype, steps=3)
    for wd, decoupled, maximize, amsgrad in OPTIONS[::3]:
        run_steps(rng, (67,), dtype, steps=3, weight_decay=wd, decoupled=decoupled, maximize=maximize,
                  amsgrad=amsgrad)


def _state(shape=(4, 5), dtype=np.float32):
    return [np.zeros(shape, dtype) for _ in range(4)]


@pytest.mark.parametrize("step", [0, -1])
def test_adam_bad_step(step):
    p, g, m, v = _state()
    with pytest.raises(ValueError, match="step"):
        fastnn.adam_update(p, g, m, v, step=step)


def test_adam_step_is_keyword_only_and_required():
    p, g, m, v = _state()
    with pytest.raises(TypeError):
        fastnn.adam_update(p, g, m, v)
    with pytest.raises(TypeError):
        fastnn.adam_update(p, g, m, v, 1)


@pytest.mark.parametrize("which", ["param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
def test_adam_shape_mismatch(which):
    arrays = dict(zip(["param", "grad", "exp_avg", "exp_avg_sq"], _state()))
    arrays["max_exp_avg_sq"] = np.zeros((4, 5), np.float32)
    arrays[which] = np.zeros((5, 4), np.float32)
    keep = Unchanged(*arrays.values())
    with pytest.raises(ValueError, match=which if which != "param" else "param|grad|exp_avg"):
        fastnn.adam_update(arrays["param"], arrays["grad"], arrays["exp_avg"], arrays["exp_avg_sq"], step=1,
                           max_exp_avg_sq=arrays["max_exp_avg_sq"])
    keep.check()


@pytest.mark.parametrize("which", ["param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
def test_adam_dtype_mismatch(which):
    arrays = dict(zip(["param", "grad", "exp_avg", "exp_avg_sq"], _state()))
    arrays["max_exp_avg_sq"] = np.zeros((4, 5), np.float32)
    arrays[which] = np.zeros((4, 5), np.float64)
    with pytest.raises(TypeError):
        fastnn.adam_update(arrays["param"], arrays["grad"], arrays["exp_avg"], arrays["exp_avg_sq"], step=1,
                           max_exp_avg_sq=arrays["max_exp_avg_sq"])


@pytest.mark.parametrize("bad", [np.int32, np.int16, np.complex64, np.bool_])
def test_adam_bad_dtype(bad):
    p, g, m, v = [np.zeros((4, 5), bad) for _ in range(4)]
    with pytest.raises(TypeError):
        fastnn.adam_update(p, g, m, v, step=1)


@pytest.mark.parametrize("which", ["param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
@pytest.mark.parametrize("problem", ["strided", "fortran", "readonly"])
def test_adam_state_must_be_contiguous_and_writable(which, problem):
    arrays = dict(zip(["param", "grad", "exp_avg", "exp_avg_sq"], _state((6, 8))))
    arrays["max_exp_avg_sq"] = np.zeros((6, 8), np.float32)
    if problem == "strided":
        arrays[which] = np.zeros((6, 16), np.float32)[:, ::2]
    elif problem == "fortran":
        arrays[which] = np.zeros((6, 8), np.float32, order="F")
    else:
        arrays[which].flags.writeable = False
    keep = Unchanged(*arrays.values())
    with pytest.raises(ValueError, match=which):
        fastnn.adam_update(arrays["param"], arrays["grad"], arrays["exp_avg"], arrays["exp_avg_sq"], step=1,
                           lr=0.1, max_exp_avg_sq=arrays["max_exp_avg_sq"])
    keep.check()


def test_adam_rejects_non_arrays():
    p, g, m, v = _state()
    with pytest.raises((TypeError, ValueError)):
        fastnn.adam_update(p.tolist(), g, m, v, step=1)


@pytest.mark.parametrize("nan_in", ["grad", "max_exp_avg_sq"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_amsgrad_maximum_propagates_nan(isa, dtype, nan_in):
    # np.maximum / torch.maximum: a NaN on either side of the running maximum is the result.
    p = np.array([0.5, -1, 2, 0.25], dtype)
    m, v, vmax = np.zeros(4, dtype), np.zeros(4, dtype), np.zeros(4, dtype)
    fastnn.adam_update(p, np.array([0.1, -0.2, 0.3, 0.4], dtype), m, v, step=1, lr=1e-2, max_exp_avg_sq=vmax)
    g = np.array([0.1, -0.2, 0.3, -0.4], dtype)
    if nan_in == "grad":
        g[1] = np.nan
    else:
        vmax[1] = np.nan
    fastnn.adam_update(p, g, m, v, step=2, lr=1e-2, max_exp_avg_sq=vmax)
    assert np.isnan(vmax[1]) and np.isnan(p[1])
    assert np.isfinite(np.delete(vmax, 1)).all() and np.isfinite(np.delete(p, 1)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("wd,decoupled,maximize,amsgrad", OPTIONS, ids=OPTION_IDS)
def test_adam_multi_equals_per_tensor(rng, dtype, threads, wd, decoupled, maximize, amsgrad):
    """The multi-tensor binding (fastnn.torch's optimizers) is the same arithmetic as adam_update on each
    tensor, bit for bit: sizes around the 32768-element chunk, empty, odd; one step count per tensor."""
    from fastnn import _C
    from fastnn._ops import adam_scalars
    sizes, steps = [0, 1, 17, 32767, 32768, 32769, 100_003], [1, 2, 3, 5, 8, 13, 21]
    multi = [make_state(rng, (n,), dtype, amsgrad) for n in sizes]
    single = [tuple(None if a is None else a.copy() for a in s) for s in multi]
    grads = [random_grad(rng, (n,), dtype) for n in sizes]
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    for (p, m, v, vmax), g, step in zip(single, grads, steps):
        fastnn.adam_update(p, g, m, v, step=step, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd,
                           decoupled_weight_decay=decoupled, maximize=maximize, max_exp_avg_sq=vmax)
    scal = [adam_scalars(lr, b1, b2, s) for s in steps]
    before = fastnn.get_num_threads()
    fastnn.set_num_threads(threads)
    try:
        _C.adam_multi([s[0] for s in multi], grads, [s[1] for s in multi], [s[2] for s in multi],
                      [s[3] for s in multi] if amsgrad else None, lr, b1, b2, eps, wd, [c[0] for c in scal],
                      [c[1] for c in scal], decoupled, maximize)
    finally:
        fastnn.set_num_threads(before)
    for got, want in zip(multi, single):
        for a, b in zip(got, want):
            if b is not None:
                np.testing.assert_array_equal(a, b)


def test_adam_multi_checks():
    from fastnn import _C
    p = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="one entry per param"):
        _C.adam_multi([p], [p.copy()], [p.copy()], [], None, 1e-3, 0.9, 0.999, 1e-8, 0.0, [1.0], [1.0], False, False)
    with pytest.raises(TypeError):
        _C.adam_multi([p], [np.zeros(4)], [p.copy()], [p.copy()], None, 1e-3, 0.9, 0.999, 1e-8, 0.0, [1.0], [1.0],
                      False, False)
    with pytest.raises(ValueError, match="elements"):
        _C.adam_multi([p], [np.zeros(3, np.float32)], [p.copy()], [p.copy()], None, 1e-3, 0.9, 0.999, 1e-8, 0.0,
                      [1.0], [1.0], False, False)


# ---- on the GPU: cupy arrays, fast and plain kernels, float32 and float16 (skipped, with the reason, without a usable GPU) ----

@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_adam_optimizer_on_gpu_arrays_gpu(rng, dtype):
    shapes = [(5, 3), (3,), (17,)]
    host = [rand(rng, s, dtype) for s in shapes]
    params = [gpu(p) for p in host]
    ref_params = [f64(p) for p in host]
    opt = fastnn.Adam(params, lr=1e-2, amsgrad=True, weight_decay=0.01)
    ref_state = [(np.zeros(s), np.zeros(s), np.zeros(s)) for s in shapes]
    for step in range(1, 4):
        grads = [rand(rng, s, dtype) for s in shapes]
        opt.step([gpu(g) for g in grads])
        for p, g, (m, v, vmax) in zip(ref_params, grads, ref_state):
            ref.adam_update(p, f64(g), m, v, step=step, lr=1e-2, weight_decay=0.01, max_exp_avg_sq=vmax)
    for p, r in zip(params, ref_params):
        gpu_check(p, r, dtype)
    sd = opt.state_dict()
    assert all(isinstance(v, (int, float, bool)) or type(v) is np.ndarray for v in sd.values())
    other = fastnn.Adam([p.copy() for p in params], lr=1e-2, amsgrad=True, weight_decay=0.01)
    other.load_state_dict(sd)
    grads = [gpu(rand(rng, s, dtype)) for s in shapes]
    opt.step(grads)
    other.step(grads)
    for a, b in zip(opt.params, other.params):
        assert cp.array_equal(a, b)
    with pytest.raises(TypeError, match=r"grads\[0\]: got a numpy.ndarray in a call whose params\[0\] is a cupy"):
        opt.step([np.zeros(s, dtype) for s in shapes])
    with pytest.raises(TypeError, match=r"params\[1\]: got a numpy.ndarray in a call whose params\[0\] is a cupy"):
        fastnn.Adam([params[0], host[1]])


@needs_gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("n", [1, 3, 4, 5, 1000, 100003])
@pytest.mark.parametrize("opts", [{}, {"weight_decay": 0.1}, {"weight_decay": 0.1, "decoupled_weight_decay": True},
                                  {"maximize": True}, {"amsgrad": True}], ids=str)
def test_adam_several_steps_gpu(rng, variant, dtype, n, opts):
    opts = dict(opts)
    ams = opts.pop("amsgrad", False)
    p = rand(rng, n, dtype)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    vmax = np.zeros(n, np.float32) if ams else None
    gp, gm, gv = gpu(p), gpu(m), gpu(v)
    gvmax = gpu(vmax) if ams else None
    rp, rm, rv = f64(p, m, v)
    rvmax = f64(vmax) if ams else None
    for step in range(1, 6):
        g = rand(rng, n, dtype)
        fastnn.adam_update(gp, gpu(g), gm, gv, step=step, lr=1e-2, max_exp_avg_sq=gvmax, **opts)
        ref.adam_update(rp, f64(g), rm, rv, step=step, lr=1e-2, max_exp_avg_sq=rvmax, **opts)
    gpu_check(gp, rp, dtype)
    gpu_check(gm, rm, np.float32, tol=GPU_TOL[dtype])
    gpu_check(gv, rv, np.float32, tol=GPU_TOL[dtype])


@needs_gpu
def test_adam_errors_gpu():
    p = gpu(np.zeros(8, np.float16))
    with pytest.raises(TypeError, match="exp_avg: expected a float32"):
        fastnn.adam_update(p, p, p, p, step=1)             # float16 moments are not accepted
    s = gpu(np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="exp_avg_sq: shares memory"):
        fastnn.adam_update(p, p, s, s, step=1)
    with pytest.raises(TypeError, match="^grad: got a numpy.ndarray"):
        fastnn.adam_update(s, np.zeros(8, np.float32), gpu(np.zeros(8, np.float32)), gpu(np.zeros(8, np.float32)),
                           step=1)
