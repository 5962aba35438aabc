"""The Adam optimizer over arrays of any family fastnn takes (numpy, torch, cupy, ...): its state lives in
the backend's native arrays and each step runs the one checked `adam_update` kernel call per parameter."""
from __future__ import annotations

import numbers
from typing import List, Sequence

import numpy as np

from ._backend import adopt
from ._ops import _count, _flag, _floats, _in_place, _same_dtype, adam_hyper, adam_step

__all__ = ["Adam"]


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
            raise TypeError(f"params: expected a list of arrays, got {type(params).__name__}")
        self.params: List = list(params)
        bk, natives = self._adopt(())
        for i, p in enumerate(natives):
            name = f"params[{i}]"
            _floats(bk, p, name)
            _in_place(bk, p, name)
            for j in range(i):
                if p.size and bk.xp.may_share_memory(p, natives[j]):
                    raise ValueError(f"{name}: shares memory with params[{j}]; each parameter must be "
                                     "updated once per step")
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.decoupled_weight_decay, self.amsgrad, self.maximize = decoupled_weight_decay, amsgrad, maximize
        self._hyper()
        self._bk, self._natives = bk, natives
        with bk.scope():
            self.state = [self._fresh_state(p) for p in natives]

    def _adopt(self, grads):
        """(backend, native params + native grads) of the params and the non-None grads: one array family."""
        arrays = {f"params[{i}]": p for i, p in enumerate(self.params)}
        arrays.update((f"grads[{i}]", g) for i, g in enumerate(grads) if g is not None)
        return adopt("Adam", arrays, tuple(arrays)[:len(self.params)])

    def _zeros(self, p):
        return self._bk.xp.zeros(p.shape, self._bk.moment_dtype(p.dtype))

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
        _flag(_scalar(self.amsgrad), "amsgrad")
        return adam_hyper(_scalar(self.lr), _scalar(betas[0]), _scalar(betas[1]), _scalar(self.eps),
                          _scalar(self.weight_decay), _scalar(self.decoupled_weight_decay), _scalar(self.maximize),
                          names=("lr", "betas[0]", "betas[1]", "eps", "weight_decay"))

    def step(self, grads: Sequence) -> None:
        """One update of every parameter: grads[i] (same shape and dtype as params[i], any layout, the same
        array type) is its gradient; None skips that parameter (its step count does not advance, as in
        torch). Everything is checked before any parameter is touched."""
        if isinstance(grads, np.ndarray) or not isinstance(grads, (list, tuple)):
            raise TypeError(f"grads: expected a list of arrays (one per param), got {type(grads).__name__}")
        if len(grads) != len(self.params):
            raise ValueError(f"grads: expected {len(self.params)} gradients (one per param), got {len(grads)}")
        h = self._hyper()
        amsgrad = bool(self.amsgrad)
        if amsgrad and any("max_exp_avg_sq" not in s for s in self.state):
            raise ValueError("amsgrad: cannot be switched on after construction (there is no max_exp_avg_sq "
                             "state); make a new Adam")
        bk, natives = self._adopt(grads)
        params, rest = natives[:len(self.params)], iter(natives[len(self.params):])
        pairs = []
        for i, g in enumerate(grads):
            if g is None:
                continue
            p, g, name = params[i], next(rest), f"grads[{i}]"
            _floats(bk, g, name)
            _same_dtype(p, f"params[{i}]", g, name)
            if g.shape != p.shape:
                raise ValueError(f"{name}: shape {g.shape} does not match params[{i}]'s shape {p.shape}")
            pairs.append((p, g, self.state[i]))
        with bk.scope():
            for p, g, s in pairs:
                s["step"] += 1
                adam_step(bk, p, g, s["exp_avg"], s["exp_avg_sq"], s["max_exp_avg_sq"] if amsgrad else None,
                          s["step"], h, (p,))

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
                    d[f"state.{i}.{k}"] = v.copy() if isinstance(v, np.ndarray) else v.get()
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
        for i, p in enumerate(self._natives):
            key = f"state.{i}.step"
            if key not in d:
                raise ValueError(f"state_dict: missing key {key!r}")
            s = {"step": _count(_scalar(d[key]), key, 0)}
            for a in arrays:
                key = f"state.{i}.{a}"
                if key not in d:
                    raise ValueError(f"state_dict: missing key {key!r}")
                v = d[key]
                if not isinstance(v, np.ndarray) and hasattr(v, "__cuda_array_interface__") and hasattr(v, "get"):
                    v = v.get()  # a GPU (cupy) array
                if not isinstance(v, np.ndarray):
                    raise TypeError(f"{key}: expected a numpy.ndarray, got {type(v).__name__}")
                want = self._bk.moment_dtype(p.dtype)
                if v.dtype != want:
                    raise TypeError(f"{key}: dtype {v.dtype} does not match the state's dtype {want}")
                if v.shape != p.shape:
                    raise ValueError(f"{key}: shape {v.shape} does not match params[{i}]'s shape {p.shape}")
                with self._bk.scope():
                    s[a] = self._bk.xp.array(v, order="C", copy=True)
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
