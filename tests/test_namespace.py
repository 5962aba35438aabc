"""fastnn's public namespace holds the API and nothing else: no names leaked from imports (such as
`annotations` from `from __future__ import annotations`), and `__all__` lists exactly the public functions."""
import types

import fastnn

PUBLIC = {
    "Adam", "adam_update", "cpu_isa", "cross_entropy", "cuda_is_available", "get_num_threads", "info",
    "linear", "linear_backward", "log_softmax", "log_softmax_backward", "matmul", "relu", "relu_backward",
    "scaled_dot_product_attention", "scaled_dot_product_attention_backward", "set_cpu_isa",
    "set_num_threads", "softmax", "softmax_backward",
}
# Public submodules: the oracles, the PyTorch integration, and what `python -m fastnn` and the package's
# own imports load.
SUBMODULES = {"reference", "bench", "train", "torch"}  # torch: fastnn.torch, once imported


def test_public_names_are_exactly_the_api():
    names = {n for n in dir(fastnn) if not n.startswith("_")}
    modules = {n for n in names if isinstance(getattr(fastnn, n), types.ModuleType)}
    assert names - modules == PUBLIC
    assert modules <= SUBMODULES, modules - SUBMODULES


def test_all_lists_the_api():
    assert set(fastnn.__all__) == PUBLIC | {"__version__"}
    assert len(fastnn.__all__) == len(set(fastnn.__all__))
