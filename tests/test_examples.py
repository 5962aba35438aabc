"""The examples in examples/ run end to end (in a subprocess, as a user runs them) and reach their figures:
train_mlp (>= 97% on digits in 30 epochs, MNIST IDX loading), regression (lstsq to 1e-3, >= 95%) and
attention_layer (gradient checks). Skipped when examples/ is not next to tests/ (an installed package
tested from elsewhere) or scikit-learn is missing (the examples' optional dependency)."""
import gzip
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastnn
from conftest import assert_close

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
pytestmark = pytest.mark.skipif(not EXAMPLES.is_dir(), reason=f"no examples/ directory at {EXAMPLES}")


def run_example(name, *args, timeout=120, path_first=()):
    """Runs examples/<name> with this interpreter and the fastnn the tests import; returns the process."""
    env = dict(os.environ)
    pkg_root = str(Path(fastnn.__file__).resolve().parent.parent)
    paths = [str(p) for p in path_first] + [pkg_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def final_accuracy(stdout):
    m = re.search(r"^final test accuracy ([0-9.]+) \((\d+)/(\d+)\) after (\d+) epochs$", stdout, re.M)
    assert m, f"no final accuracy line in:\n{stdout}"
    return float(m.group(1)), int(m.group(4))


# ---- train_mlp ------------------------------------------------------------------------------------

def test_train_mlp_reaches_97_percent_on_digits():
    pytest.importorskip("sklearn")
    p = run_example("train_mlp.py", "--epochs", 30)
    assert p.returncode == 0, p.stderr
    acc, epochs = final_accuracy(p.stdout)
    assert epochs == 30 and acc >= 0.97, p.stdout
    assert len(re.findall(r"^epoch +\d+/30 +loss [0-9.]+ +test accuracy", p.stdout, re.M)) == 30


def test_train_mlp_compare_numpy_short():
    pytest.importorskip("sklearn")
    p = run_example("train_mlp.py", "--epochs", 2, "--compare-numpy", "--seed", 3)
    assert p.returncode == 0, p.stderr
    acc, epochs = final_accuracy(p.stdout)
    assert epochs == 2 and acc > 0.5
    m = re.search(r"fastnn ([0-9.]+) ms, NumPy ([0-9.]+) ms .* NumPy final test accuracy ([0-9.]+)", p.stdout)
    assert m, p.stdout
    assert float(m.group(3)) == pytest.approx(acc, abs=0.02)   # same model, same batches: same accuracy


def test_train_mlp_plot(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "curves.png"
    p = run_example("train_mlp.py", "--epochs", 1, "--plot", out)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert p.returncode == 2 and "matplotlib" in p.stderr
        return
    assert p.returncode == 0, p.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def test_train_mlp_reads_mnist_idx_files(tmp_path):
    # A tiny stand-in for MNIST in the IDX format (images gzipped, labels not): a learnable rule.
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("t10k", 50)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 40, (n, 6, 6))
        images[np.arange(n), labels // 6, labels % 6] = 255
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte", labels)
    p = run_example("train_mlp.py", "--mnist", tmp_path, "--epochs", 10, "--hidden", 32, "--lr", 0.01)
    assert p.returncode == 0, p.stderr
    assert "MNIST: 200 train / 50 test, 36 features, 10 classes" in p.stdout
    acc, _ = final_accuracy(p.stdout)
    assert acc >= 0.5


def test_train_mlp_missing_mnist_file_is_a_clear_error(tmp_path):
    p = run_example("train_mlp.py", "--mnist", tmp_path, "--epochs", 1)
    assert p.returncode != 0 and "train-images" in p.stderr


def test_mlp_backward_matches_plain_numpy_version():
    # The fastnn model and the NumPy baseline compute the same loss and gradients (float64).
    mod = load_example("train_mlp")
    rng = np.random.default_rng(0)
    params = mod.init_params(rng, 20, 16, 5, dtype=np.float64)
    x, labels = rng.standard_normal((33, 20)), rng.integers(0, 5, 33)
    loss, grads = mod.MLP(params).loss_and_grads(x, labels)
    ref_loss, ref_grads = mod.NumpyMLP(params).loss_and_grads(x, labels)
    assert loss == pytest.approx(ref_loss, rel=1e-13)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, np.float64, k=33)


# ---- regression and attention ---------------------------------------------------------------------

def test_regression_example():
    pytest.importorskip("sklearn")
    p = run_example("regression.py")
    assert p.returncode == 0, p.stdout + p.stderr
    rel = float(re.search(r"weights vs lstsq relative error ([0-9.e+-]+)", p.stdout).group(1))
    acc = float(re.search(r"test accuracy ([0-9.]+)", p.stdout).group(1))
    assert rel <= 1e-3 and acc >= 0.95
    assert p.stdout.rstrip().endswith("all checks passed")


def test_attention_layer_example():
    p = run_example("attention_layer.py", "--length", 6, "--dim", 6, "--heads", 3)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.rstrip().endswith("all gradient checks passed")
    assert len(re.findall(r"finite differences: max relative error .* \[ok", p.stdout)) == 3
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    assert len(re.findall(r"torch.nn.MultiheadAttention: .* \[ok", p.stdout)) == 3


@pytest.mark.parametrize("name", ["train_mlp.py", "regression.py"])
def test_missing_sklearn_is_a_clear_exit_2(tmp_path, name):
    # A stand-in `sklearn` package that fails to import, first on the path.
    (tmp_path / "sklearn").mkdir()
    (tmp_path / "sklearn" / "__init__.py").write_text("raise ImportError('scikit-learn hidden by the test')\n")
    p = run_example(name, "--epochs", 1, path_first=[tmp_path])
    assert p.returncode == 2, p.stdout + p.stderr
    assert "pip install scikit-learn" in p.stderr and "Traceback" not in p.stderr
