"""Adam and AdamW as torch.optim.Optimizer subclasses running fastnn's fused Adam kernel: each step makes
one multi-tensor kernel call per parameter group (per dtype), as torch.optim.Adam(fused=True) does, so a
model of many small tensors does not pay one Python call per tensor. The state (keys 'step', 'exp_avg',
'exp_avg_sq', 'max_exp_avg_sq'; step a float32 scalar tensor) is torch's, so state_dict() loads into
torch.optim.Adam / AdamW and back."""
from __future__ import annotations


import torch

import fastnn
from fastnn import _C
from fastnn._ops import adam_scalars


def _views(tensors):
    """numpy views of CPU tensors (the multi-tensor kernel's arguments): detached, zero-copy."""
    return None if tensors is None else [t.detach().numpy() for t in tensors]


_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class Adam(torch.optim.Optimizer):
    """torch.optim.Adam's algorithm and constructor (params or param groups, lr, betas, eps, weight_decay,
    amsgrad, maximize) on fastnn's fused kernel. Parameters: float32/float64 on the CPU (float32 on CUDA,
    where each tensor is one kernel launch), and bfloat16/float16 on the CPU (one half-width call per
    tensor, moments of the parameters' dtype as torch keeps them); a sparse gradient is a RuntimeError,
    another dtype a TypeError. Works with torch.optim.lr_scheduler (it reads and sets each group's 'lr')."""

    _decoupled = False  # AdamW: decoupled weight decay

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 maximize=False):
        if not 0.0 <= float(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            for p in group["params"]:
                s = self.state.get(p, {})
                if s and not torch.is_tensor(s["step"]):  # an old-style float step, as torch converts it
                    s["step"] = torch.tensor(float(s["step"]), dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        """One step over every parameter with a gradient; returns closure()'s loss when a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group) -> None:
        amsgrad = group["amsgrad"]
        buckets = {}  # (device, dtype) -> lists for one kernel call
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Adam does not support sparse gradients")
            ok = _CPU_DTYPES if p.device.type == "cpu" else (torch.float32,)
            if p.dtype not in ok or p.device.type not in ("cpu", "cuda"):
                raise TypeError(f"fastnn.torch.{type(self).__name__}: no kernel for {p.dtype} parameters on "
                                f"{p.device.type} (float32/float64/bfloat16/float16 on the CPU, float32 on CUDA); "
                                "use torch.optim")
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            b = buckets.setdefault((p.device, p.dtype), ([], [], [], [], [], []))
            for lst, t in zip(b, (p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                                  state.get("max_exp_avg_sq") if amsgrad else None, state["step"])):
                lst.append(t)
        for (device, _), (params, grads, exp_avgs, exp_avg_sqs, vmaxs, steps) in buckets.items():
            self._update(group, device, params, grads, exp_avgs, exp_avg_sqs, vmaxs if amsgrad else None, steps)

    def _update(self, group, device, params, grads, exp_avgs, exp_avg_sqs, vmaxs, steps) -> None:
        lr = float(group["lr"])
        beta1, beta2 = (float(b) for b in group["betas"])
        eps, wd, maximize = float(group["eps"]), float(group["weight_decay"]), bool(group["maximize"])
        torch._foreach_add_(steps, 1)
        scalars = {}
        step_sizes, bc2s = [], []
        for n in torch.stack(steps).tolist():  # one read of all the step counts
            if n not in scalars:
                scalars[n] = adam_scalars(lr, beta1, beta2, n)
            step_sizes.append(scalars[n][0])
            bc2s.append(scalars[n][1])
        if device.type == "cuda":  # one launch per tensor through fastnn's GPU adam_update
            for i, p in enumerate(params):
                fastnn.adam_update(p, grads[i], exp_avgs[i], exp_avg_sqs[i], step=int(steps[i].item()), lr=lr,
                                   beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd,
                                   decoupled_weight_decay=self._decoupled, maximize=maximize,
                                   max_exp_avg_sq=None if vmaxs is None else vmaxs[i])
            return
        # The kernel updates contiguous memory in place: a non-contiguous tensor (rare) is updated through a
        # contiguous copy written back afterwards.
        updated = [params, exp_avgs, exp_avg_sqs] + ([vmaxs] if vmaxs is not None else [])
        write_back = []
        for lst in updated:
            for i, t in enumerate(lst):
                if not t.is_contiguous():
                    lst[i] = t.contiguous()
                    write_back.append((t, lst[i]))
        grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
        if params[0].dtype in (torch.bfloat16, torch.float16):
            # half-precision parameters: one half-width fused call per tensor; the moments have the
            # parameters' dtype, as torch.optim.Adam keeps them (the arithmetic is float32)
            for i, p in enumerate(params):
                fastnn.adam_update(p, grads[i], exp_avgs[i], exp_avg_sqs[i], step=int(steps[i].item()),
                                   lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd,
                                   decoupled_weight_decay=self._decoupled, maximize=maximize,
                                   max_exp_avg_sq=None if vmaxs is None else vmaxs[i])
        else:
            _C.adam_multi(_views(params), _views(grads), _views(exp_avgs), _views(exp_avg_sqs), _views(vmaxs), lr,
                          beta1, beta2, eps, wd, step_sizes, bc2s, self._decoupled, maximize)
        for t, c in write_back:
            t.copy_(c)


class AdamW(Adam):
    """torch.optim.AdamW (decoupled weight decay, default 1e-2) on fastnn's fused kernel; see Adam."""

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize)
