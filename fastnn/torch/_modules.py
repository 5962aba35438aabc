"""fastnn.torch.Linear: torch.nn.Linear (same parameters, initialization and state_dict) running fastnn's
linear kernel, with an optional fused ReLU."""
from __future__ import annotations

import torch

from ._patch import linear_supported
from ._ops import linear


class Linear(torch.nn.Linear):
    """torch.nn.Linear(in_features, out_features, bias) whose forward is fastnn's linear (the weight
    (out_features, in_features) read transposed in place); activation="relu" fuses relu(x @ W.T + b) into
    the product. Inputs fastnn has no kernel for (another dtype or device) run torch's F.linear (and
    relu)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation=None, device=None,
                 dtype=None):
        if activation not in (None, "relu"):
            raise ValueError(f"activation: expected None or 'relu', got {activation!r}")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.activation = activation

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if linear_supported(input, self.weight, self.bias):
            return linear(input, self.weight, self.bias, activation=self.activation)
        y = torch.nn.functional.linear(input, self.weight, self.bias)
        return torch.relu(y) if self.activation == "relu" else y

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")
