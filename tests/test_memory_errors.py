"""An allocation that cannot be satisfied raises MemoryError (and the process goes on), not a crash:
outputs allocated by NumPy (in the Python layer or the bindings) and the kernels' own C++ workspaces
(operator new -> std::bad_alloc, translated by pybind11), the latter under an address-space limit in a
subprocess."""
import os
import subprocess
import sys

import numpy as np
import pytest

import fastnn

SANITIZED = bool(os.environ.get("FASTNN_SANITIZED"))


def huge_operands(dtype, batch=()):
    # Zero-stride operands take no memory; the product would be 2^48 elements (a petabyte).
    a = np.broadcast_to(np.ones((), dtype), batch + (2**24, 3))
    b = np.broadcast_to(np.ones((), dtype), batch + (3, 2**24))
    return a, b


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch", [(), (2,)])  # the 2-D fast path (bindings) and the general path (Python)
def test_petabyte_output_is_memory_error(dtype, batch):
    a, b = huge_operands(dtype, batch)
    with pytest.raises(MemoryError):
        fastnn.matmul(a, b)
    with pytest.raises(MemoryError):
        fastnn.linear(a, *huge_operands(dtype)[1:])
    x = np.broadcast_to(np.ones((), dtype), (2**25, 2**25))
    for f in (fastnn.relu, fastnn.softmax):
        with pytest.raises(MemoryError):
            f(x)
    # ...and the process goes on.
    assert fastnn.matmul(np.ones((2, 3), dtype), np.ones((3, 2), dtype)).sum() == 12


CHILD = r"""
import resource, sys
import numpy as np
import fastnn
fastnn.set_num_threads(1)  # no thread creation under the limit
with open("/proc/self/status") as f:
    vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
fastnn.matmul(np.ones((64, 64), np.float32), np.ones((64, 64), np.float32))  # warm
resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), resource.RLIM_INFINITY))
results = []
# matmul: the output is 16 MB, but the packing workspace for A (2^22 rows x 256) needs 4 GB.
a = np.broadcast_to(np.ones((), np.float32), (2**22, 256))
try:
    fastnn.matmul(a, np.ones((256, 1), np.float32))
    results.append("gemm: no error")
except MemoryError:
    results.append("gemm: MemoryError")
# attention: 16 MB operands, but the per-thread tiles of E = 2^22 features need 1 GB or more on every
# ISA path (the tile sizes follow the vector width).
q = np.ones((1, 1, 2**22), np.float32)
try:
    fastnn.scaled_dot_product_attention(q, q, np.ones((1, 1, 1), np.float32))
    results.append("sdpa: no error")
except MemoryError:
    results.append("sdpa: MemoryError")
# The process is fine afterwards.
ok = fastnn.matmul(np.ones((8, 8), np.float32), np.ones((8, 8), np.float32)).sum() == 512
print(";".join(results), "after:", ok, flush=True)
"""


@pytest.mark.skipif(SANITIZED, reason="ASan reserves terabytes of address space (RLIMIT_AS cannot be used) and "
                    "reports a failed operator new as fatal")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc")
def test_cpp_workspace_bad_alloc_is_memory_error():
    parent = os.path.dirname(os.path.dirname(os.path.abspath(fastnn.__file__)))
    env = dict(os.environ, PYTHONPATH=parent + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # cwd: not the repository root, whose fastnn/ (the sources) would shadow the installed package.
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, env=env,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr[-2000:])
    assert r.stdout.strip() == "gemm: MemoryError;sdpa: MemoryError after: True", r.stdout
