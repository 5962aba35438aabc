"""Every row of the bench, by op family (one module each); `CASES` lists them in table order."""
from __future__ import annotations

from typing import List

import numpy as np

from ..case import Case
from .attention import sdpa_backward_case, sdpa_case
from .elementwise import relu_backward_case, relu_case, tiny_relu_case
from .matmul import linear_backward_case, linear_case, matmul_case
from .softmax import cross_entropy_case, softmax_backward_case, softmax_case
from .train import adam_case, mlp_step_case
from . import half


CASES: List[Case] = [
    # matmul (M x K @ K x N); the "64x784x128" is M x K x N, so is its "4096x4096x64"
    # (4096x4096 @ 4096x64); the attention-like K = 64 reading (4096x64 @ 64x4096) is timed too.
    matmul_case(1024, 1024, 1024),
    matmul_case(2048, 2048, 2048, only="full"),
    matmul_case(4096, 4096, 4096, only="full"),
    matmul_case(256, 1024, 1024),
    matmul_case(4096, 4096, 64),
    matmul_case(4096, 64, 4096),
    matmul_case(64, 784, 128),
    matmul_case(64, 128, 10),
    matmul_case(128, 64, 128, batch=32),
    matmul_case(1024, 1024, 1024, dtype=np.float64),
    matmul_case(8, 8, 8, alloc=True),
    matmul_case(8, 8, 8, alloc=True, torch_arrays=True),
    linear_case(64, 784, 128),
    tiny_relu_case(16),
    tiny_relu_case(16, torch_arrays=True),
    relu_case(2**20, inplace=False),
    relu_case(2**20, inplace=True),
    relu_case(16 * 2**20, inplace=False),
    relu_case(16 * 2**20, inplace=True),
    relu_case(64 * 2**20, inplace=False, only="full"),
    relu_case(64 * 2**20, inplace=True, only="full"),
    relu_backward_case(16 * 2**20),
    softmax_case(4096, 1024, log=False),
    softmax_case(65536, 128, log=False),
    softmax_case(256, 32768, log=False),
    softmax_case(4096, 1024, log=True),
    softmax_case(256, 32768, log=True),
    softmax_backward_case(4096, 1024),
    softmax_backward_case(4096, 1024, log=True),
    cross_entropy_case(4096, 1000),
    cross_entropy_case(256, 32768),
    # --quick times attention on a quarter of the batch: the float64 oracle and NumPy's dense version
    # of the (4, 8, 1024, 64) rows alone take ~30 s on 2 cores.
    sdpa_case(1, 8, 1024, 64, causal=False, only="quick"),
    sdpa_case(1, 8, 1024, 64, causal=True, only="quick"),
    sdpa_case(4, 8, 1024, 64, causal=False, only="full"),
    sdpa_case(4, 8, 1024, 64, causal=True, only="full"),
    sdpa_case(1, 16, 2048, 64, causal=False, only="full"),
    sdpa_case(1, 16, 2048, 64, causal=True, only="full"),
    sdpa_case(1, 8, 4096, 128, causal=False, only="full"),
    sdpa_case(1, 8, 4096, 128, causal=True, only="full"),
    sdpa_backward_case(1, 8, 1024, 64, causal=False, only="quick"),
    sdpa_backward_case(1, 8, 1024, 64, causal=True, only="quick"),
    sdpa_backward_case(4, 8, 1024, 64, causal=False, only="full"),
    sdpa_backward_case(4, 8, 1024, 64, causal=True, only="full"),
    adam_case(10**6),
    adam_case(10 * 10**6),
    adam_case(50 * 10**6, only="full"),
    linear_backward_case(64, 784, 128),
    mlp_step_case(64),
    mlp_step_case(512),
] + (half.CASES if half.available() else [])  # bfloat16 rows, beside the float32 ones of their ops

OPS = tuple(dict.fromkeys(c.op for c in CASES))


def select(ops=None, quick=False, available=True) -> List[Case]:
    """The cases of the named ops (all when `ops` is empty) for a full or a --quick run; with
    `available`, only those whose fastnn functions exist. An unknown op name is a ValueError."""
    unknown = sorted(set(ops or ()) - set(OPS))
    if unknown:
        raise ValueError(f"unknown op {', '.join(unknown)}; expected one of: {', '.join(OPS)}")
    skip = "full" if quick else "quick"
    return [c for c in CASES if (not ops or c.op in ops) and c.only != skip
            and (c.available() or not available)]
