"""Op families that are not rows of the case table and bring their own runner and report (for instance
a bench of fastnn interleaved with other libraries' thread pools). `fastnn bench --op NAME` runs one;
the full bench runs none of them unless named.

To add one, a module defines `run(args) -> int` (args: the parsed `fastnn bench` options: quick,
threads, json, no_torch; returns the exit status, printing its tables to stdout) and is named in
EXTRA_MODULES, or calls `register("name", run, "one line of help")` itself when imported.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Tuple

# Modules imported to register their op family; a module that is absent is skipped.
EXTRA_MODULES: Tuple[str, ...] = ("fastnn.bench.coexist",)

_REGISTRY: Dict[str, Tuple[Callable[..., int], str]] = {}


def register(name: str, run: Callable[..., int], help: str = "") -> None:
    """Add an op family: `fastnn bench --op name` calls run(args)."""
    _REGISTRY[name] = (run, help)


def extra_ops() -> Dict[str, Tuple[Callable[..., int], str]]:
    """name -> (run, help) of every registered family (importing EXTRA_MODULES first)."""
    for module in EXTRA_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            continue
    return dict(_REGISTRY)
