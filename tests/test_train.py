"""fastnn.train: linear_backward against the oracle (dtypes, shapes, layouts, every argument check) and the
Adam optimizer against repeated reference.adam_update and torch.optim.Adam/AdamW, with state_dict round
trips giving bit-identical continuation. Finite-difference checks of the gradients are in test_gradcheck.py."""
import numpy as np
import pytest

import fastnn
from fastnn import reference as ref
from conftest import DTYPES, LAYOUTS, Unchanged, assert_close, f64, make_array


# ---- linear_backward ------------------------------------------------------------------------------

SHAPES = [  # (x shape, out features)
    ((1, 1), 1), ((7, 13), 5), ((64, 128), 10), ((3, 5, 17), 33), ((2, 3, 4, 9), 7), ((13,), 6),
    ((0, 8), 4), ((5, 0), 3), ((4, 6), 0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("xshape,n_out", SHAPES, ids=[f"{s}->{n}" for s, n in SHAPES])
@pytest.mark.parametrize("bias,x_grad", [(True, True), (False, True), (True, False)])
def test_linear_backward_matches_reference(rng, dtype, xshape, n_out, bias, x_grad):
    x = make_array(rng, xshape, dtype)
    w = make_array(rng, (xshape[-1], n_out), dtype)
    g = make_array(rng, xshape[:-1] + (n_out,), dtype)
    keep = Unchanged(g, x, w)
    gx, gw, gb = fastnn.linear_backward(g, x, w, bias=bias, x_grad=x_grad)
    keep.check()
    rx, rw, rb = ref.linear_backward(*f64(g, x, w), bias=bias)
    rows = int(np.prod(xshape[:-1]))
    if x_grad:
        assert_close(gx, rx, dtype, k=n_out)
    else:
        assert gx is None
    assert_close(gw, rw, dtype, k=rows)
    if bias:
        assert_close(gb, rb, dtype, k=rows)
    else:
        assert gb is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_linear_backward_any_layout(isa, rng, dtype, layout):
    # Transposed, Fortran, strided and reversed operands give the same gradients as C-ordered ones.
    x = make_array(rng, (37, 19), dtype, layout)
    w = make_array(rng, (19, 11), dtype, layout)
    g = make_array(rng, (37, 11), dtype, layout)
    got = fastnn.linear_backward(g, x, w)
    for a, b, k in zip(got, ref.linear_backward(*f64(g, x, w)), (11, 37, 37)):
        assert_close(a, b, dtype, k=k)


@pytest.mark.parametrize("layout", ["C", "F"])
def test_linear_backward_copies_no_operand(rng, layout):
    # Both products read the transposed views in place: beyond the three results, nothing the size of an
    # operand is allocated (NumPy reports its allocations to tracemalloc; a transpose copy would be 1.6 MB+).
    import tracemalloc
    x, g, w = (make_array(rng, s, np.float64, layout) for s in ((1000, 300), (1000, 200), (300, 200)))
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out = fastnn.linear_backward(g, x, w)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak - base - sum(o.nbytes for o in out) < 64 * 1024


def test_linear_backward_is_the_gradient_of_linear(rng):
    # Chained with relu_backward it is the backward of linear(..., activation="relu").
    x, w, b = rng.standard_normal((9, 6)), rng.standard_normal((6, 4)), rng.standard_normal(4)
    y = fastnn.linear(x, w, b, activation="relu")
    g = rng.standard_normal(y.shape)
    gx, gw, gb = fastnn.linear_backward(fastnn.relu_backward(g, y), x, w)
    gz = np.where(x @ w + b > 0, g, 0)
    assert_close(gx, gz @ w.T, np.float64, k=4)
    assert_close(gw, x.T @ gz, np.float64, k=9)
    assert_close(gb, gz.sum(0), np.float64, k=9)


def test_linear_backward_errors():
    x, w, g = np.ones((4, 3), np.float32), np.ones((3, 2), np.float32), np.ones((4, 2), np.float32)
    with pytest.raises(TypeError, match="grad_output"):
        fastnn.linear_backward([[1.0]], x, w)
    with pytest.raises(TypeError, match="x: expected a float32, float64, float16 or bfloat16"):
        fastnn.linear_backward(g, x.astype(np.int32), w)
    with pytest.raises(TypeError, match="weight: dtype float64"):
        fastnn.linear_backward(g, x, w.astype(np.float64))
    with pytest.raises(TypeError, match="grad_output: dtype float64"):
        fastnn.linear_backward(g.astype(np.float64), x, w)
    with pytest.raises(TypeError, match="bias: expected a bool"):
        fastnn.linear_backward(g, x, w, bias=np.ones(2, np.float32))
    with pytest.raises(TypeError, match="x_grad: expected a bool"):
        fastnn.linear_backward(g, x, w, x_grad=None)
    with pytest.raises(ValueError, match="weight: expected 2 dimensions"):
        fastnn.linear_backward(g, x, w[:, 0])
    with pytest.raises(ValueError, match="x: expected at least 1 dimension"):
        fastnn.linear_backward(g, np.ones((), np.float32), w)
    with pytest.raises(ValueError, match="x: last dimension 3 does not match weight's first dimension 2"):
        fastnn.linear_backward(g, x, np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"grad_output: expected shape \(4, 2\)"):
        fastnn.linear_backward(g[:3], x, w)
    with pytest.raises(ValueError, match=r"grad_output: expected shape \(4, 2\)"):
        fastnn.linear_backward(g.reshape(2, 2, 2), x, w)


# ---- Adam: helpers --------------------------------------------------------------------------------

def make_params(rng, dtype, shapes=((7, 5), (5,), (3, 4, 2), (1,))):
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def grad_sequence(rng, params, steps):
    return [[rng.standard_normal(p.shape).astype(p.dtype) for p in params] for _ in range(steps)]


def reference_adam(params, grads_seq, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                   decoupled_weight_decay=False, amsgrad=False, maximize=False, lr_at=None):
    """Repeated reference.adam_update in float64; lr_at(step) overrides lr per step."""
    ps = [f64(p) for p in params]
    st = [(np.zeros_like(p), np.zeros_like(p), np.zeros_like(p) if amsgrad else None) for p in ps]
    for step, grads in enumerate(grads_seq, start=1):
        for p, g, (m, v, vmax) in zip(ps, grads, st):
            ref.adam_update(p, f64(g), m, v, step=step, lr=lr_at(step) if lr_at else lr, beta1=betas[0],
                            beta2=betas[1], eps=eps, weight_decay=weight_decay,
                            decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
                            max_exp_avg_sq=vmax)
    return ps


OPTIONS = [dict(), dict(weight_decay=0.1), dict(weight_decay=0.1, decoupled_weight_decay=True),
           dict(amsgrad=True), dict(maximize=True), dict(amsgrad=True, maximize=True, weight_decay=0.05),
           dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6)]
OPTION_IDS = ["plain", "l2", "adamw", "amsgrad", "maximize", "ams-max-l2", "hyper"]


# ---- Adam: arithmetic -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", OPTIONS, ids=OPTION_IDS)
def test_adam_matches_reference(isa, rng, dtype, opts):
    params = make_params(rng, dtype)
    start = [f64(p) for p in params]
    grads_seq = grad_sequence(rng, params, 20)
    opt = fastnn.Adam(params, **opts)
    for grads in grads_seq:
        opt.step(grads)
    want = reference_adam(start, grads_seq, **opts)
    for p, w, s in zip(params, want, start):
        assert p.dtype == np.dtype(dtype)
        assert_close(p, w, dtype, k=20)
        if dtype == np.float64:   # the accumulated update, not just the parameter, must agree
            assert_close(f64(p) - s, w - s, dtype, k=20 * 64)
    assert all(s["step"] == 20 for s in opt.state)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", OPTIONS, ids=OPTION_IDS)
def test_adam_matches_torch(rng, dtype, opts):
    torch = pytest.importorskip("torch")
    params = make_params(rng, dtype)
    grads_seq = grad_sequence(rng, params, 20)
    tparams = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    o = dict(opts)
    decoupled = o.pop("decoupled_weight_decay", False)
    topt = (torch.optim.AdamW if decoupled else torch.optim.Adam)(tparams, **o)
    if decoupled:
        o["decoupled_weight_decay"] = True
    opt = fastnn.Adam(params, **o)
    for grads in grads_seq:
        opt.step(grads)
        for t, g in zip(tparams, grads):
            t.grad = torch.from_numpy(g.copy())
        topt.step()
    for p, t in zip(params, tparams):
        assert_close(p, t.detach().numpy().astype(np.float64), dtype, k=20)


def test_adam_lr_change_between_steps(rng):
    params = make_params(rng, np.float64)
    start = [p.copy() for p in params]
    grads_seq = grad_sequence(rng, params, 10)
    opt = fastnn.Adam(params, lr=1e-2)
    for step, grads in enumerate(grads_seq, start=1):
        if step == 6:
            opt.lr = 1e-4
        opt.step(grads)
    want = reference_adam(start, grads_seq, lr_at=lambda s: 1e-2 if s < 6 else 1e-4)
    for p, w, s in zip(params, want, start):
        assert_close(p - s, w - s, np.float64, k=640)
    torch = pytest.importorskip("torch")
    tparams = [torch.nn.Parameter(torch.from_numpy(s.copy())) for s in start]
    topt = torch.optim.Adam(tparams, lr=1e-2)
    for step, grads in enumerate(grads_seq, start=1):
        if step == 6:
            topt.param_groups[0]["lr"] = 1e-4
        for t, g in zip(tparams, grads):
            t.grad = torch.from_numpy(g.copy())
        topt.step()
    for p, t in zip(params, tparams):
        assert_close(p, t.detach().numpy(), np.float64, k=10)


def test_adam_none_grad_skips_the_parameter(rng):
    params = make_params(rng, np.float32)
    before = [p.copy() for p in params]
    opt = fastnn.Adam(params)
    opt.step([np.ones_like(params[0]), None, np.ones_like(params[2]), None])
    assert [s["step"] for s in opt.state] == [1, 0, 1, 0]
    assert np.array_equal(params[1], before[1]) and np.array_equal(params[3], before[3])
    assert not np.array_equal(params[0], before[0])


# ---- Adam: checkpoints ----------------------------------------------------------------------------

def shifted_copy(a, offset):
    """A C-contiguous, writable copy of `a` starting `offset` elements into a fresh buffer."""
    buf = np.empty(a.size + offset, a.dtype)
    out = buf[offset:].reshape(a.shape)
    out[...] = a
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", [dict(), dict(amsgrad=True, weight_decay=0.1, decoupled_weight_decay=True),
                                  dict(maximize=True, weight_decay=0.01)], ids=["plain", "adamw-ams", "max-l2"])
@pytest.mark.parametrize("via_npz", [False, True], ids=["dict", "npz"])
def test_adam_state_dict_round_trip_is_bit_identical(rng, tmp_path, dtype, opts, via_npz):
    params = make_params(rng, dtype)
    grads_seq = grad_sequence(rng, params, 12)
    opt = fastnn.Adam(params, **opts)
    for grads in grads_seq[:6]:
        opt.step(grads)
    opt.lr = 3e-3   # changed hyper-parameters are part of the checkpoint
    saved_params = [p.copy() for p in params]
    sd = opt.state_dict()
    for v in sd.values():
        assert isinstance(v, (np.ndarray, bool, int, float)), type(v)
    if via_npz:
        np.savez(tmp_path / "opt.npz", **sd)
        sd = np.load(tmp_path / "opt.npz", allow_pickle=False)
    for grads in grads_seq[6:]:
        opt.step(grads)

    # The restored parameters live elsewhere, deliberately at another alignment (as after a reload).
    params2 = [shifted_copy(p, 1) for p in saved_params]
    opt2 = fastnn.Adam(params2)   # default hyper-parameters: all restored from the checkpoint
    opt2.load_state_dict(sd)
    assert opt2.lr == 3e-3 and opt2.amsgrad == opts.get("amsgrad", False)
    for grads in grads_seq[6:]:
        opt2.step(grads)
    for a, b in zip(params, params2):
        assert np.array_equal(a, b), "continuation after load_state_dict is not bit-identical"
    for s, s2 in zip(opt.state, opt2.state):
        assert s.keys() == s2.keys() and s["step"] == s2["step"] == 12
        for k in s:
            if k != "step":
                assert np.array_equal(s[k], s2[k]) and s2[k].dtype == np.dtype(dtype)


def test_adam_state_dict_is_a_copy(rng):
    params = make_params(rng, np.float32)
    opt = fastnn.Adam(params)
    opt.step([np.ones_like(p) for p in params])
    sd = opt.state_dict()
    snap = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in sd.items()}
    opt.step([np.ones_like(p) for p in params])
    for k, v in sd.items():
        assert np.array_equal(v, snap[k])
    opt.load_state_dict(sd)
    sd["state.0.exp_avg"][...] = 123.0   # the loaded state does not alias the dict
    assert not np.any(opt.state[0]["exp_avg"] == 123.0)


def test_adam_load_state_dict_errors_leave_state_unchanged(rng):
    params = make_params(rng, np.float32)
    opt = fastnn.Adam(params, amsgrad=True)
    opt.step([np.ones_like(p) for p in params])
    good = opt.state_dict()
    before = opt.state_dict()

    def broken(**changes):
        d = dict(good)
        for k, v in changes.items():
            if v is None:
                del d[k]
            else:
                d[k] = v
        return d

    cases = [
        (broken(num_params=3), ValueError, "holds state for 3 parameters"),
        (broken(**{"state.1.exp_avg": np.zeros((6,), np.float32)}), ValueError, r"state.1.exp_avg: shape \(6,\)"),
        (broken(**{"state.0.exp_avg_sq": np.zeros((7, 5), np.float64)}), TypeError, "state.0.exp_avg_sq: dtype"),
        (broken(**{"state.2.max_exp_avg_sq": None}), ValueError, "missing key 'state.2.max_exp_avg_sq'"),
        (broken(**{"state.3.step": -1}), ValueError, r"state.3.step: expected an int >= 0"),
        (broken(**{"state.3.step": 1.5}), TypeError, r"state.3.step"),
        (broken(lr=None), ValueError, r"missing keys \['lr'\]"),
        (broken(beta1=1.0), ValueError, r"betas\[0\]"),
        (broken(amsgrad="yes"), TypeError, "amsgrad: expected a bool"),
        ([1, 2], TypeError, "state_dict: expected a mapping"),
    ]
    for d, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            opt.load_state_dict(d)
        after = opt.state_dict()
        assert after.keys() == before.keys()
        for k in before:
            assert np.array_equal(after[k], before[k]), k


# ---- Adam: argument checks ------------------------------------------------------------------------

def test_adam_constructor_errors():
    p = np.zeros((3, 4), np.float32)
    with pytest.raises(TypeError, match="params: expected a list"):
        fastnn.Adam(p)
    with pytest.raises(TypeError, match=r"params\[1\]: expected a float32, float64, float16 or bfloat16"):
        fastnn.Adam([p, np.zeros(3, np.int64)])
    with pytest.raises(TypeError, match=r"params\[0\]: expected an array \(numpy.ndarray, torch.Tensor"):
        fastnn.Adam([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"params\[0\]: must be C-contiguous"):
        fastnn.Adam([p.T])
    ro = np.zeros(3, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"params\[0\]: the array is read-only"):
        fastnn.Adam([ro])
    with pytest.raises(ValueError, match=r"params\[1\]: shares memory with params\[0\]"):
        fastnn.Adam([p, p[1]])
    for kw, exc, msg in [(dict(lr=-1.0), ValueError, "lr: expected a finite number >= 0"),
                         (dict(lr=float("inf")), ValueError, "lr: expected a finite number >= 0"),
                         (dict(lr="0.1"), TypeError, "lr: expected a real number"),
                         (dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\]: expected 0 <= betas\[1\] < 1"),
                         (dict(betas=0.9), TypeError, "betas: expected a pair"),
                         (dict(eps=-1e-8), ValueError, "eps: expected a finite number >= 0"),
                         (dict(weight_decay=-0.1), ValueError, "weight_decay: expected a finite number >= 0"),
                         (dict(amsgrad=1), TypeError, "amsgrad: expected a bool"),
                         (dict(maximize=None), TypeError, "maximize: expected a bool")]:
        with pytest.raises(exc, match=msg):
            fastnn.Adam([p], **kw)


def test_adam_step_errors_touch_nothing(rng):
    params = make_params(rng, np.float32)
    before = [p.copy() for p in params]
    opt = fastnn.Adam(params)
    good = [np.ones_like(p) for p in params]
    for grads, exc, msg in [
        (good[:3], ValueError, "grads: expected 4 gradients"),
        (np.ones(4), TypeError, "grads: expected a list"),
        (good[:2] + [np.ones((3, 4, 3), np.float32)] + good[3:], ValueError, r"grads\[2\]: shape \(3, 4, 3\)"),
        (good[:3] + [np.ones(1, np.float64)], TypeError, r"grads\[3\]: dtype float64 does not match params\[3\]"),
        (good[:1] + [[1.0] * 5] + good[2:], TypeError, r"grads\[1\]: expected an array \(numpy.ndarray"),
    ]:
        with pytest.raises(exc, match=msg):
            opt.step(grads)
    opt.lr = -1.0
    with pytest.raises(ValueError, match="lr: expected a finite number >= 0"):
        opt.step(good)
    opt.lr = 1e-3
    opt.amsgrad = True
    with pytest.raises(ValueError, match="amsgrad: cannot be switched on"):
        opt.step(good)
    for p, b in zip(params, before):
        assert np.array_equal(p, b)
    assert all(s["step"] == 0 for s in opt.state)


def test_adam_repr_and_exports():
    assert "Adam" in fastnn.__all__ and "linear_backward" in fastnn.__all__
    r = repr(fastnn.Adam([np.zeros(2)], lr=0.5))
    assert r.startswith("Adam(1 params, lr=0.5")
