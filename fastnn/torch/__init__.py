"""fastnn inside PyTorch: custom ops, torch.nn.functional-style functions, a Linear module, Adam/AdamW
optimizers and a drop-in patch of torch.nn.functional (needs torch >= 2.4: pip install "fastnn[torch]").

Every op is a torch.library custom op (torch.ops.fastnn.*) with a fake implementation and an autograd
formula, so models using them train and compile with torch.compile(fullgraph=True). Importing fastnn
never imports torch; importing fastnn.torch does.
"""
from __future__ import annotations

try:
    import torch as _torch
except ImportError as _e:  # pragma: no cover - depends on the environment
    raise ImportError('fastnn.torch needs PyTorch >= 2.4: pip install "fastnn[torch]"') from _e

from ._ops import (
    CUSTOM_OPS,
    cross_entropy,
    linear,
    log_softmax,
    matmul,
    relu,
    scaled_dot_product_attention,
    softmax,
)
from ._patch import is_patched, patch, patched, unpatch
from ._modules import Linear
from ._optim import Adam, AdamW

__all__ = ["CUSTOM_OPS", "linear", "matmul", "relu", "softmax", "log_softmax", "cross_entropy",
           "scaled_dot_product_attention", "Linear", "Adam", "AdamW", "patch", "unpatch", "patched", "is_patched"]
