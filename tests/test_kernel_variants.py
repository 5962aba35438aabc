"""The plain kernels kept beside the fast ones agree with them and with the oracle (STYLE: keep the simple
version). fastnn._C.gemm(..., naive=True) is the triple loop; naive=False the packed GEMM."""
import numpy as np
import pytest

from fastnn import _C
from conftest import DTYPES, assert_close


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (7, 13, 5), (17, 33, 257), (64, 10, 128), (9, 65, 31)])
@pytest.mark.parametrize("bias,relu", [(False, False), (True, True)])
def test_gemm_naive_and_packed_agree(isa, rng, dtype, m, n, k, bias, relu):
    a = rng.standard_normal((k, m)).astype(dtype).T          # transposed view: strides (1, m)
    b = rng.standard_normal((k, n)).astype(dtype)
    bv = rng.standard_normal(n).astype(dtype) if bias else None
    outs = []
    for naive in (True, False):
        c = np.full((m, n), np.nan, dtype)
        z = np.zeros(1, np.int64)
        _C.gemm(a, b, c, z, z, m, n, k, 1, m, n, 1, bv, relu, naive)
        outs.append(c)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    if bias:
        ref = ref + bv
    if relu:
        ref = np.maximum(ref, 0)
    for c in outs:
        assert_close(c, ref, dtype, k=k)
    assert_close(outs[1], outs[0].astype(np.float64), dtype, k=k)
