"""Training pieces built on the kernels: the backward of `linear` and an Adam optimizer over numpy arrays.

linear_backward runs both products on the matmul kernel with transposed *views* (the packing reads any
strides, so no transpose is copied); Adam keeps its state in numpy arrays and updates each parameter with
one fused `adam_update` call.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import List, Optional, Sequence, Tuple

import numpy as np

from . import _C
from ._ops import _array, _flag, _real, _same_dtype, adam_scalars, linear_shapes, matmul

__all__ = ["linear_backward", "Adam"]


def linear_backward_shapes(g, x, weight) -> Tuple[int, int, int]:
    """(rows, in, out) of a linear_backward call, or a ValueError naming the argument whose shape is wrong;
    shared by the CPU and GPU functions."""
    n_in, n_out = linear_shapes(x, weight)
    want = x.shape[:-1] + (n_out,)
    if g.shape != want:
        raise ValueError(f"grad_output: expected shape {want} (x's leading dimensions + weight's out), "
                         f"got {g.shape}")
    return math.prod(x.shape[:-1]), n_in, n_out


def linear_backward(grad_output, x, weight, *, bias=True,
                    x_grad=True) -> Tuple[Optional[np.ndarray], np.ndarray, Optional[np.ndarray]]:
    """Gradients of y = x @ weight + bias with respect to x, weight and bias.

    grad_output: (..., out), the gradient of the loss with respect to y; x: (..., in); weight: (in, out);
    one float dtype. bias: whether the forward had a bias (then its gradient is returned, else None).
    x_grad: whether to compute grad_x; pass False for a first layer, whose input needs no gradient (it
    saves one of the two products), and None is returned in its place.
    For `linear(..., activation="relu")` pass `relu_backward(grad, y)` as grad_output.
    Returns (grad_x (..., in) or None, grad_weight (in, out), grad_bias (out,) or None), new arrays in
    x's dtype: grad_x = grad_output @ weight.T, grad_weight = x2.T @ g2 and grad_bias = g2.sum(0), with
    x2, g2 the 2-D (rows, features) views. Both products run on the matmul kernel reading the transposes
    in place.
    Raises TypeError for non-arrays and non-float or mixed dtypes, ValueError for mismatched shapes.
    """
    g = _array(grad_output, "grad_output")
    x = _array(x, "x")
    weight = _array(weight, "weight")
    _same_dtype(x, "x", weight, "weight")
    _same_dtype(x, "x", g, "grad_output")
    bias = _flag(bias, "bias")
    x_grad = _flag(x_grad, "x_grad")
    rows, n_in, n_out = linear_backward_shapes(g, x, weight)
    x2 = x.reshape(rows, n_in)
    g2 = g.reshape(rows, n_out)
    # matmul's 2-D path packs the transposed views directly (no transpose is copied).
    grad_x = matmul(g2, weight.T).reshape(x.shape) if x_grad else None   # (rows, out) @ (out, in)
    grad_w = matmul(x2.T, g2)                  # (in, rows) @ (rows, out); rows == 0 gives zeros
    grad_b = g2.sum(axis=0) if bias else None  # sum of a 0-row array is zeros, in g's dtype
    return grad_x, grad_w, grad_b


def _on_gpu(a) -> bool:
    return type(a) is not np.ndarray and hasattr(a, "__cuda_array_interface__")


def _scalar(v):
    """A 0-d array (as np.load gives back) as its Python scalar; anything else unchanged."""
    if isinstance(v, np.ndarray) and v.ndim == 0:
        return v.item()
    return v


class Adam:
    """Adam / AdamW / AMSGrad over a list of numpy (or GPU) arrays, with torch.optim.Adam's arithmetic.

    params: a list of float32/float64 arrays, C-contiguous, writable and not sharing memory; they are
    held by reference and updated in place by step(). GPU arrays (cupy; all params on the GPU, float32 or
    float16) are updated by the CUDA adam_update, with float32 moments; their state_dict() holds numpy
    copies, and load_state_dict() moves the arrays back to each parameter's device. Hyper-parameters have torch.optim.Adam's names and
    defaults: lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0 (L2 added to the gradient, or
    decoupled as in AdamW with decoupled_weight_decay=True), amsgrad=False, maximize=False. They are plain
    attributes and may be changed between steps (`opt.lr = 1e-4`); every parameter uses the same ones (no
    parameter groups: make one Adam per group). `amsgrad` can be switched off later, not on (its
    max_exp_avg_sq state exists only when it was on at construction or in a loaded state_dict).

    State per parameter: exp_avg, exp_avg_sq (and max_exp_avg_sq with amsgrad) arrays of the parameter's
    shape and dtype, zero at the start, and its step count (0 before its first step; the first update
    uses step 1). Raises TypeError / ValueError naming the argument for bad params or hyper-parameters.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False, amsgrad=False, maximize=False):
        if isinstance(params, np.ndarray) or not isinstance(params, (list, tuple)):
            raise TypeError(f"params: expected a list of numpy arrays, got {type(params).__name__}")
        self.params: List[np.ndarray] = list(params)
        self._cp = None  # cupy, when the params are GPU arrays
        if any(_on_gpu(p) for p in self.params):
            self._check_gpu_params()
        else:
            for i, p in enumerate(self.params):
                name = f"params[{i}]"
                _array(p, name)
                if not p.flags.c_contiguous:
                    raise ValueError(f"{name}: must be C-contiguous (it is updated in place; a copy would be "
                                     "silently lost)")
                if not p.flags.writeable:
                    raise ValueError(f"{name}: the array is read-only (it is updated in place)")
                for j in range(i):
                    if p.size and np.may_share_memory(p, self.params[j]):
                        raise ValueError(f"{name}: shares memory with params[{j}]; each parameter must be "
                                         "updated once per step")
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.decoupled_weight_decay, self.amsgrad, self.maximize = decoupled_weight_decay, amsgrad, maximize
        self._hyper()
        self.state = [self._fresh_state(p) for p in self.params]

    def _check_gpu_params(self) -> None:
        from . import _gpu  # imported here: fastnn._gpu imports this module
        c = _gpu._Call("Adam")
        self._cp = c.cp
        for i, p in enumerate(self.params):
            name = f"params[{i}]"
            if not _on_gpu(p):
                raise TypeError(f"{name}: expected a GPU array like params[0]: all params of one Adam must be on "
                                f"one side, got {type(p).__name__}")
            if not isinstance(p, c.cp.ndarray):
                raise TypeError(f"{name}: expected a cupy.ndarray (updated in place), got {type(p).__name__}")
            c.array(p, name)
            if not p.flags.c_contiguous:
                raise ValueError(f"{name}: must be C-contiguous (it is updated in place; a copy would be "
                                 "silently lost)")
            for j in range(i):
                if p.size and c.cp.may_share_memory(p, self.params[j]):
                    raise ValueError(f"{name}: shares memory with params[{j}]; each parameter must be "
                                     "updated once per step")

    def _state_dtype(self, p):
        """The moments' dtype: the parameter's on the CPU, float32 on the GPU (see adam_update)."""
        return np.dtype(np.float32) if self._cp is not None else p.dtype

    def _zeros(self, p):
        if self._cp is None:
            return np.zeros_like(p)
        with p.device:
            return self._cp.zeros(p.shape, self._cp.float32)

    def _fresh_state(self, p) -> dict:
        s = {"step": 0, "exp_avg": self._zeros(p), "exp_avg_sq": self._zeros(p)}
        if self.amsgrad:
            s["max_exp_avg_sq"] = self._zeros(p)
        return s

    def _hyper(self) -> dict:
        """The current hyper-parameters, checked (they are attributes a user may have changed)."""
        betas = self.betas
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise TypeError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
        h = dict(lr=_real(_scalar(self.lr), "lr"), beta1=_real(_scalar(betas[0]), "betas[0]"),
                 beta2=_real(_scalar(betas[1]), "betas[1]"), eps=_real(_scalar(self.eps), "eps"),
                 weight_decay=_real(_scalar(self.weight_decay), "weight_decay"),
                 decoupled_weight_decay=_flag(_scalar(self.decoupled_weight_decay), "decoupled_weight_decay"),
                 maximize=_flag(_scalar(self.maximize), "maximize"))
        _flag(_scalar(self.amsgrad), "amsgrad")
        # Finite, as adam_update requires: an infinite lr, eps or weight decay only makes inf/NaN parameters.
        for k in ("lr", "eps", "weight_decay"):
            if not 0 <= h[k] < math.inf:
                raise ValueError(f"{k}: expected a finite number >= 0, got {h[k]}")
        for k, name in (("beta1", "betas[0]"), ("beta2", "betas[1]")):
            if not 0 <= h[k] < 1:
                raise ValueError(f"{name}: expected 0 <= beta < 1, got {h[k]}")
        return h

    def step(self, grads: Sequence[Optional[np.ndarray]]) -> None:
        """One update of every parameter: grads[i] (same shape and dtype as params[i], any layout) is its
        gradient; None skips that parameter (its step count does not advance, as in torch).
        Everything is checked before any parameter is touched."""
        if isinstance(grads, np.ndarray) or not isinstance(grads, (list, tuple)):
            raise TypeError(f"grads: expected a list of numpy arrays (one per param), got {type(grads).__name__}")
        if len(grads) != len(self.params):
            raise ValueError(f"grads: expected {len(self.params)} gradients (one per param), got {len(grads)}")
        h = self._hyper()
        amsgrad = bool(self.amsgrad)
        if amsgrad and any("max_exp_avg_sq" not in s for s in self.state):
            raise ValueError("amsgrad: cannot be switched on after construction (there is no max_exp_avg_sq "
                             "state); make a new Adam")
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if g is None:
                continue
            name = f"grads[{i}]"
            if self._cp is None:
                _array(g, name)
            elif not _on_gpu(g):
                raise TypeError(f"{name}: expected a GPU array (the params are on the GPU), got {type(g).__name__}")
            _same_dtype(p, f"params[{i}]", g, name)
            if g.shape != p.shape:
                raise ValueError(f"{name}: shape {g.shape} does not match params[{i}]'s shape {p.shape}")
        if self._cp is not None:
            from . import _gpu
            for p, g, s in zip(self.params, grads, self.state):
                if g is not None:
                    s["step"] += 1
                    _gpu.adam_update(p, g, s["exp_avg"], s["exp_avg_sq"], step=s["step"],
                                     max_exp_avg_sq=s["max_exp_avg_sq"] if amsgrad else None, **h)
            return
        lr, beta1, beta2, eps, wd = h["lr"], h["beta1"], h["beta2"], h["eps"], h["weight_decay"]
        decoupled, maximize = h["decoupled_weight_decay"], h["maximize"]
        for p, g, s in zip(self.params, grads, self.state):
            if g is None:
                continue
            # Everything adam_update checks holds here (params and state were checked when they were set;
            # the kernel entry re-checks sizes and layouts), so the kernel is called directly: a step over
            # many small parameters is dominated by per-call overhead.
            if not (g.flags.c_contiguous and g.flags.aligned) or (g.size and np.may_share_memory(g, p)):
                g = np.array(g, order="C", copy=True)
            s["step"] += 1
            _C.adam(p, g, s["exp_avg"], s["exp_avg_sq"], s["max_exp_avg_sq"] if amsgrad else None, lr, beta1, beta2,
                    eps, wd, *adam_scalars(lr, beta1, beta2, s["step"]), decoupled, maximize)

    # ---- checkpoints: a flat dict of numpy arrays and Python scalars ----------------------------------

    _KEYS = ("lr", "beta1", "beta2", "eps", "weight_decay", "decoupled_weight_decay", "amsgrad", "maximize")

    def state_dict(self) -> dict:
        """A snapshot (copies): the hyper-parameters as Python floats/bools, `num_params`, and per parameter
        i `state.{i}.step` (int) and `state.{i}.exp_avg`, `.exp_avg_sq` (and `.max_exp_avg_sq`) arrays.
        The parameters themselves are not included (save them with the model). Flat, so
        `np.savez(f, **opt.state_dict())` and `opt.load_state_dict(np.load(f))` round-trip without pickle."""
        h = self._hyper()
        d = {"lr": h["lr"], "beta1": h["beta1"], "beta2": h["beta2"], "eps": h["eps"],
             "weight_decay": h["weight_decay"], "decoupled_weight_decay": h["decoupled_weight_decay"],
             "amsgrad": bool(self.amsgrad), "maximize": h["maximize"], "num_params": len(self.params)}
        for i, s in enumerate(self.state):
            for k, v in s.items():
                if isinstance(v, int):
                    d[f"state.{i}.{k}"] = int(v)
                else:  # a numpy copy (GPU state too: np.savez needs host arrays)
                    d[f"state.{i}.{k}"] = v.copy() if self._cp is None else self._cp.asnumpy(v)
        return d

    def load_state_dict(self, state_dict) -> None:
        """Restores a state_dict() (or np.load of its np.savez) exactly: hyper-parameters, step counts and
        state arrays (copied). It must match this optimizer's parameters in number, shapes and dtypes;
        everything is checked before anything changes. Continuing after a round trip is bit-identical."""
        if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
            raise TypeError(f"state_dict: expected a mapping, got {type(state_dict).__name__}")
        d = {k: state_dict[k] for k in state_dict.keys()}
        missing = [k for k in self._KEYS + ("num_params",) if k not in d]
        if missing:
            raise ValueError(f"state_dict: missing keys {missing}")
        hyper = {k: _scalar(d[k]) for k in self._KEYS}
        for k in ("decoupled_weight_decay", "amsgrad", "maximize"):
            hyper[k] = _flag(hyper[k], k)
        n = _scalar(d["num_params"])
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"num_params: expected an int, got {type(n).__name__}")
        if n != len(self.params):
            raise ValueError(f"state_dict: holds state for {n} parameters, this optimizer has {len(self.params)}")
        arrays = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hyper["amsgrad"] else ())
        new_state = []
        for i, p in enumerate(self.params):
            key = f"state.{i}.step"
            if key not in d:
                raise ValueError(f"state_dict: missing key {key!r}")
            step = _scalar(d[key])
            if isinstance(step, (bool, np.bool_)):
                raise TypeError(f"{key}: expected an int >= 0, got bool")
            try:
                step = operator.index(step)
            except TypeError:
                raise TypeError(f"{key}: expected an int >= 0, got {type(step).__name__}") from None
            if step < 0:
                raise ValueError(f"{key}: expected an int >= 0, got {step}")
            s = {"step": int(step)}
            for a in arrays:
                key = f"state.{i}.{a}"
                if key not in d:
                    raise ValueError(f"state_dict: missing key {key!r}")
                v = d[key]
                if self._cp is not None and _on_gpu(v):
                    v = self._cp.asnumpy(v)
                v = _array(v, key)
                want = self._state_dtype(p)
                if v.dtype != want:
                    raise TypeError(f"{key}: dtype {v.dtype} does not match the state's dtype {want}")
                if v.shape != p.shape:
                    raise ValueError(f"{key}: shape {v.shape} does not match params[{i}]'s shape {p.shape}")
                if self._cp is None:
                    s[a] = np.array(v, order="C", copy=True)
                else:
                    with p.device:
                        s[a] = self._cp.array(v, order="C", copy=True)
            new_state.append(s)
        old = {k: getattr(self, k) for k in ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay",
                                             "amsgrad", "maximize")}
        self.lr, self.betas, self.eps = hyper["lr"], (hyper["beta1"], hyper["beta2"]), hyper["eps"]
        self.weight_decay, self.decoupled_weight_decay = hyper["weight_decay"], hyper["decoupled_weight_decay"]
        self.amsgrad, self.maximize = hyper["amsgrad"], hyper["maximize"]
        try:
            self._hyper()
        except (TypeError, ValueError):
            for k, v in old.items():
                setattr(self, k, v)
            raise
        self.state = new_state

    def __repr__(self) -> str:
        return (f"Adam({len(self.params)} params, lr={self.lr}, betas={tuple(self.betas)}, eps={self.eps}, "
                f"weight_decay={self.weight_decay}, decoupled_weight_decay={self.decoupled_weight_decay}, "
                f"amsgrad={self.amsgrad}, maximize={self.maximize})")
