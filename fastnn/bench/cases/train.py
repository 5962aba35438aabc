"""Training: the Adam update, and one full training step of an MLP (forward, loss, backward, Adam)."""
from __future__ import annotations

import math

import numpy as np

import fastnn
from fastnn import reference

from ..case import EST_FLOPS, F32, Case, _max_error, _np, _randn, _tensor, rel_error


ADAM = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)


def torch_adam_step(torch, param, grad):
    """The timed call of torch.optim.Adam (fused where this torch has it, else foreach) with ADAM's
    hyper-parameters on one parameter: param() and grad() make its initial value and gradient as tensors.
    Each call is one step; it returns (param, exp_avg, exp_avg_sq)."""
    hyper = dict(lr=ADAM["lr"], betas=(ADAM["beta1"], ADAM["beta2"]), eps=ADAM["eps"])
    p = torch.nn.Parameter(param())
    p.grad = grad()
    try:
        opt = torch.optim.Adam([p], fused=True, **hyper)
        opt.step()
    except Exception:  # fused Adam on CPU needs torch >= 2.4
        p = torch.nn.Parameter(param())
        p.grad = grad()
        opt = torch.optim.Adam([p], foreach=True, **hyper)
    else:  # start again from the initial values, so the first call is a first step
        p.data.copy_(param())
        opt.state.clear()

    def call():
        opt.step()
        state = opt.state[p]
        return p.detach(), state["exp_avg"], state["exp_avg_sq"]
    return call


def adam_case(n, only="") -> Case:
    """One Adam step on n float32 parameters, in place; every implementation updates its own copies
    of param and state. Timing repeats step 1, which costs the same as any later step."""
    def inputs(rng):
        return {"param": _randn(rng, (n,)), "grad": _randn(rng, (n,)),
                "exp_avg": np.zeros(n, F32), "exp_avg_sq": np.zeros(n, F32)}

    def copies(x):
        return [x[k].copy() for k in ("param", "grad", "exp_avg", "exp_avg_sq")]

    def fastnn_impl(x, torch):
        p, g, m, v = copies(x)

        def call():
            fastnn.adam_update(p, g, m, v, step=1, **ADAM)
            return p, m, v
        return call

    def numpy_impl(x, torch):
        p, g, m, v = copies(x)

        def call():
            reference.adam_update(p, g, m, v, step=1, **ADAM)
            return p, m, v
        return call

    def torch_impl(x, torch):
        return torch_adam_step(torch, lambda: _tensor(torch, x["param"]), lambda: _tensor(torch, x["grad"]))

    def expected(x):
        p, g, m, v = (np.asarray(a, np.float64) for a in copies(x))
        reference.adam_update(p, g, m, v, step=1, **ADAM)
        return p, m, v

    def error(result, want, inputs):
        # Compare the update param - param0 rather than param: the step is ~lr, far below |param|.
        p0 = inputs["param"].astype(np.float64)
        got = [r.detach().numpy() if hasattr(r, "detach") else r for r in result]
        return max(rel_error(np.asarray(got[0], np.float64) - p0, want[0] - p0),
                   rel_error(got[1], want[1]), rel_error(got[2], want[2]))

    return Case(
        "adam", f"{n // 10**6}M params" if n % 10**6 == 0 else f"{n} params", inputs=inputs,
        impls={"fastnn": fastnn_impl, "numpy": numpy_impl, "torch": torch_impl},
        expected=expected, error=error, tol=1e-3,
        work=7.0 * 4 * n, unit="byte", limit="mem_adam_gbs",
        formula="4 arrays read + 3 written, 4 bytes each", notes="in place", only=only,
        est_flops=EST_FLOPS["adam"] * n)


# ---- one training step of the MLP 784 -> 128 relu -> 10, cross-entropy, Adam -------------------------

MLP_PARAMS = ("w1", "b1", "w2", "b2")


def _mlp_params(rng, sizes):
    """torch.nn.Linear's default initialisation, weights stored (in, out) as fastnn.linear takes them."""
    params = {}
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:]), 1):
        bound = 1.0 / math.sqrt(n_in)
        params[f"w{i}"] = rng.uniform(-bound, bound, (n_in, n_out)).astype(F32)
        params[f"b{i}"] = rng.uniform(-bound, bound, (n_out,)).astype(F32)
    return params


def numpy_mlp_step(params, state, x, labels, step):
    """One training step in plain NumPy, in the dtype of its arrays: forward, mean cross-entropy,
    backward, then reference.adam_update on each of params [w1, b1, w2, b2] (updated in place, with
    state [(exp_avg, exp_avg_sq), ...]). Returns the loss."""
    w1, b1, w2, b2 = params
    n = x.shape[0]
    h = x @ w1
    h += b1
    np.maximum(h, 0, out=h)
    logits = h @ w2
    logits += b2
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    rows = np.arange(n)
    loss = -float(np.mean(np.log(p[rows, labels])))
    p[rows, labels] -= 1                                 # p becomes dL/dlogits * n
    p /= n
    dw2, db2 = h.T @ p, p.sum(axis=0)
    dh = p @ w2.T
    np.multiply(dh, h > 0, out=dh)
    dw1, db1 = x.T @ dh, dh.sum(axis=0)
    for param, grad, (m, v) in zip(params, (dw1, db1, dw2, db2), state):
        reference.adam_update(param, grad, m, v, step=step, **ADAM)
    return loss


def _fastnn_linear_backward(g, x, w, x_grad=True):
    if hasattr(fastnn, "linear_backward"):
        return fastnn.linear_backward(g, x, w, x_grad=x_grad)
    return fastnn.matmul(g, w.T) if x_grad else None, fastnn.matmul(x.T, g), g.sum(axis=0)


def mlp_step_case(batch, sizes=(784, 128, 10)) -> Case:
    """One full training step (forward, cross-entropy, backward, Adam) of Dense(128) relu -> Dense(10)
    from the same initial parameters and batch; each implementation owns its model and optimizer and
    every call is one more step on the same batch. The first step of each is checked against the
    NumPy step run in float64: the update (param - param0) of every parameter."""
    n_in, hidden, n_out = sizes
    p1, p2 = n_in * hidden, hidden * n_out

    def inputs(rng):
        x = {"x": rng.random((batch, n_in), dtype=F32), "labels": rng.integers(0, n_out, batch)}
        x.update(_mlp_params(rng, sizes))
        return x

    def fastnn_impl(x, torch):
        params = [x[k].copy() for k in MLP_PARAMS]
        data, labels = x["x"], x["labels"]
        if hasattr(fastnn, "Adam"):
            opt = fastnn.Adam(params, lr=ADAM["lr"], betas=(ADAM["beta1"], ADAM["beta2"]), eps=ADAM["eps"])
            update = opt.step
        else:
            state = [(np.zeros_like(p), np.zeros_like(p)) for p in params]
            steps = [0]

            def update(grads):
                steps[0] += 1
                for p, g, (m, v) in zip(params, grads, state):
                    fastnn.adam_update(p, g, m, v, step=steps[0], **ADAM)

        def call():
            w1, b1, w2, b2 = params
            h = fastnn.linear(data, w1, b1, activation="relu")
            logits = fastnn.linear(h, w2, b2)
            loss, g = fastnn.cross_entropy(logits, labels)
            dh, dw2, db2 = _fastnn_linear_backward(g, h, w2)
            fastnn.relu_backward(dh, h, out=dh)            # h > 0 exactly where the pre-activation is
            _, dw1, db1 = _fastnn_linear_backward(dh, data, w1, x_grad=False)  # the input needs none
            update([dw1, db1, dw2, db2])
            return params
        return call

    def numpy_impl(x, torch):
        params = [x[k].copy() for k in MLP_PARAMS]
        state = [(np.zeros_like(p), np.zeros_like(p)) for p in params]
        steps = [0]

        def call():
            steps[0] += 1
            numpy_mlp_step(params, state, x["x"], x["labels"], steps[0])
            return params
        return call

    def torch_impl(x, torch):
        import torch.nn.functional as F
        nn = torch.nn
        model = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))
        with torch.no_grad():
            for layer, i in ((model[0], 1), (model[2], 2)):
                layer.weight.copy_(torch.from_numpy(x[f"w{i}"].T.copy()))   # torch stores (out, in)
                layer.bias.copy_(torch.from_numpy(x[f"b{i}"]))
        opt = torch.optim.Adam(model.parameters(), lr=ADAM["lr"], betas=(ADAM["beta1"], ADAM["beta2"]),
                               eps=ADAM["eps"])
        data, labels = _tensor(torch, x["x"]), torch.from_numpy(x["labels"].astype(np.int64))

        def call():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(data), labels).backward()
            opt.step()
            return [model[0].weight.T, model[0].bias, model[2].weight.T, model[2].bias]
        return call

    def expected(x):
        params = [x[k].astype(np.float64) for k in MLP_PARAMS]
        state = [(np.zeros_like(p), np.zeros_like(p)) for p in params]
        numpy_mlp_step(params, state, x["x"].astype(np.float64), x["labels"], 1)
        return params

    def error(result, want, inputs):
        # The first Adam step moves every weight by about lr: compare the updates, not the weights.
        p0 = [inputs[k].astype(np.float64) for k in MLP_PARAMS]
        if len(result) != len(p0):
            return math.inf
        return _max_error((np.asarray(_np(r), np.float64) - a, w - a) for r, w, a in zip(result, want, p0))

    n_params = p1 + hidden + p2 + n_out
    return Case(
        "mlp_step", f"batch {batch}, {n_in}-{hidden} relu-{n_out}, CE, Adam", inputs=inputs,
        impls={"fastnn": fastnn_impl, "numpy": numpy_impl, "torch": torch_impl},
        expected=expected, error=error, tol=1e-3,
        work=2.0 * batch * (2 * p1 + 3 * p2), unit="flop", limit="peak_gflops_f32",
        formula="matmul flops: forward 2*B*(784*128 + 128*10), weight grads the same, hidden grad "
                "2*B*128*10",
        notes="fastnn.Adam / NumPy adam / torch.optim.Adam defaults; torch: nn.Sequential + autograd",
        blas=True, traffic=4.0 * (batch * n_in + 7 * n_params))
