"""Big arrays: element counts and byte offsets are 64-bit. relu and softmax over more than 2^31 float32
elements (8.6 GB, computed in place so one array suffices), checked at sampled positions on both sides
of element 2^31. Slow and memory-hungry: runs only with `-m slow` or FASTNN_TEST_BIG=1, and skips when
/proc/meminfo's MemAvailable is below what it needs."""
import os

import numpy as np
import pytest

import fastnn

N_BIG = 2**31 + 2**16 + 3          # elements: past 2^31, with a ragged tail
NEED = N_BIG * 4 + (1 << 30)       # one float32 array + 1 GB of headroom


def mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 0


@pytest.fixture(autouse=True)
def big_enabled(request):
    if not (os.environ.get("FASTNN_TEST_BIG") or "slow" in (request.config.getoption("-m") or "")):
        pytest.skip("big-array tests run with `-m slow` or FASTNN_TEST_BIG=1")
    if os.environ.get("FASTNN_SANITIZED"):
        pytest.skip("not under the sanitizers (shadow memory)")
    if mem_available() < NEED:
        pytest.skip(f"needs {NEED / 2**30:.1f} GiB available, have {mem_available() / 2**30:.1f} GiB")


pytestmark = pytest.mark.slow


def samples(n, rng):
    """Positions to check: both ends, around 2^31 (and 2^31 / 4 B = 2^29 * 4 bytes), the tail, random."""
    picks = [0, 1, 2**29 - 1, 2**29, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1, n - 17, n - 2, n - 1]
    return np.unique(np.concatenate([np.array([p for p in picks if 0 <= p < n]), rng.integers(0, n, 64)]))


def test_relu_past_2_31_elements():
    rng = np.random.default_rng(0)
    x = np.empty(N_BIG, np.float32)
    x.fill(-1.0)
    idx = samples(N_BIG, rng)
    vals = rng.standard_normal(idx.size).astype(np.float32)
    vals[::5] = np.nan
    x[idx] = vals
    assert fastnn.relu(x, out=x) is x
    expected = np.where(np.isnan(vals), vals, np.maximum(vals, 0))
    assert np.array_equal(x[idx], expected, equal_nan=True)
    # Every other element was -1 and is now 0: the count of nonzeros is that of the positive / NaN samples.
    assert np.count_nonzero(x) == int(np.count_nonzero(expected))


def test_softmax_rows_past_2_31_elements():
    rng = np.random.default_rng(1)
    cols = 2**16 + 1
    rows = N_BIG // cols + 1  # rows * cols > 2^31: later rows start past element 2^31
    x = np.zeros((rows, cols), np.float32)
    check_rows = np.unique(np.array([0, 1, (2**31) // cols - 1, (2**31) // cols, (2**31) // cols + 1,
                                     rows - 2, rows - 1, *rng.integers(0, rows, 8)]))
    bumps = rng.standard_normal((check_rows.size, 4)) * 3
    cidx = rng.integers(0, cols, (check_rows.size, 4))
    for r, c, b in zip(check_rows, cidx, bumps):
        x[r, c] = b
    expected = []
    for r in check_rows:
        e = np.exp(x[r].astype(np.float64) - x[r].max())
        expected.append(e / e.sum())
    assert fastnn.softmax(x, out=x) is x
    for r, e in zip(check_rows, expected):
        err = np.abs(x[r] - e).max() / e.max()
        assert err < 1e-4, f"row {r}: relative error {err:.2e}"  # float32 sums over 65537 terms
    # Untouched rows (all zeros) are uniform.
    assert np.allclose(x[rows // 3], 1.0 / cols, rtol=1e-4)
