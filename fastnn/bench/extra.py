"""Op families that are not rows of the case table and bring their own runner and report (for instance
a bench of fastnn interleaved with other libraries' thread pools). `fastnn bench --op NAME` runs one;
the full bench runs none of them unless named.

To add one, a module defines `bench(args) -> int` (args: the parsed `fastnn bench` options: quick,
threads, json, no_torch; returns the exit status, printing its tables to stdout) and is named in
EXTRA_MODULES, imported only when its family runs (so that listing the families imports no torch); or
code calls `register("name", run, "one line of help")`.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Tuple

# name -> (module with a bench(args) function, one line of help)
EXTRA_MODULES: Dict[str, Tuple[str, str]] = {
    "coexist": ("fastnn.bench.coexist", "each fastnn op right after a NumPy BLAS / PyTorch call, against the two "
                "alone (thread-pool interference)"),
    "torch": ("fastnn.bench.torch_ops", "fastnn.torch's ops forward and backward, AdamW and the call overhead "
              "against the torch functions they replace (needs torch)"),
    "gpt_step": ("fastnn.bench.gpt", "tokens/s of a GPT training step (6 layers, d_model 384, context 256) under "
                 "fastnn.torch against stock PyTorch (needs torch)"),
}

_REGISTRY: Dict[str, Tuple[Callable[..., int], str]] = {}


def register(name: str, run: Callable[..., int], help: str = "") -> None:
    """Add an op family: `fastnn bench --op name` calls run(args)."""
    _REGISTRY[name] = (run, help)


def _lazy(module: str) -> Callable[..., int]:
    return lambda args: importlib.import_module(module).bench(args)


def extra_ops() -> Dict[str, Tuple[Callable[..., int], str]]:
    """name -> (run, help) of every family: EXTRA_MODULES (imported when run) and the registered ones."""
    return {**{name: (_lazy(module), text) for name, (module, text) in EXTRA_MODULES.items()}, **_REGISTRY}
