"""examples/train_gpt.py on a tiny configuration: the corpus, the stock PyTorch run (loss falls, checkpoint
resume continues exactly, plot and sample), and the fastnn run's loss curve against stock PyTorch's with
dropout 0 (skipped, saying why, when fastnn.torch is not available)."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="examples/train_gpt.py is a PyTorch model")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_gpt.py"
pytestmark = pytest.mark.skipif(not EXAMPLE.is_file(), reason=f"no examples/train_gpt.py at {EXAMPLE}")

TINY = ["--n-layer", "2", "--n-head", "2", "--d-model", "32", "--block-size", "32", "--batch-size", "4",
        "--max-chars", "200000", "--eval-interval", "0", "--log-interval", "1000", "--threads", "1"]


@pytest.fixture(autouse=True)
def keep_thread_counts():
    """The runs set torch's (and fastnn's) thread count to 1: restored for the tests that follow."""
    import fastnn
    n_torch, n_fastnn = torch.get_num_threads(), fastnn.get_num_threads()
    yield
    torch.set_num_threads(n_torch)
    fastnn.set_num_threads(n_fastnn)


@pytest.fixture(scope="module")
def gpt():
    spec = importlib.util.spec_from_file_location("train_gpt", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_corpus(gpt):
    files = gpt.stdlib_files()
    assert files == sorted(files) and all(f.endswith(".py") and "site-packages" not in f for f in files)
    train, val = gpt.load_corpus(100_000)
    assert len(train) == 90_000 and len(val) == 10_000
    assert train.max() < gpt.VOCAB
    # The text decodes back (ASCII round-trips exactly).
    with open(files[0], encoding="utf-8", errors="replace") as f:
        head = f.read(200)
    if head.isascii():
        assert gpt.decode(train[:len(head)]) == head
    assert 2.0 < gpt.unigram_entropy(train) < np.log(gpt.VOCAB)


def test_torch_run_learns_and_resumes_exactly(gpt, tmp_path, capsys):
    const_lr = ["--lr", "3e-3", "--min-lr", "3e-3", "--warmup", "0", "--dropout", "0.1"]
    (_, _, _, full), = gpt.main(TINY + const_lr + ["--steps", "40"])
    assert np.mean(full["loss"][-5:]) < np.mean(full["loss"][:5]) - 0.5, "the loss does not fall"
    ck, png = tmp_path / "gpt.pt", tmp_path / "gpt.png"
    gpt.main(TINY + const_lr + ["--steps", "25", "--save", str(ck)])
    (_, _, _, resumed), = gpt.main(["--resume", str(ck), "--steps", "40", "--plot", str(png), "--sample", "30",
                                    "--eval-interval", "0", "--log-interval", "1000"])
    # Model, optimizer, data order and dropout generator all restored: the same 40 steps bit for bit.
    assert resumed["loss"] == full["loss"]
    assert png.stat().st_size > 1000
    out = capsys.readouterr().out
    assert "sample:\ndef " in out and "tok/s" in out and "ETA" in out


def test_fastnn_curve_matches_torch(gpt):
    ft = pytest.importorskip("fastnn.torch", reason="fastnn.torch (patch, AdamW) is not in this fastnn build")
    assert hasattr(ft, "patched") and hasattr(ft, "AdamW")
    runs = gpt.main(TINY + ["--compare", "--steps", "50", "--dropout", "0"])
    a, b = runs[0][3]["loss"], runs[1][3]["loss"]
    assert len(a) == len(b) == 50
    # Same weights, batches and arithmetic up to float32 rounding: the curves agree to float32 noise, which
    # grows slowly over the steps (the trajectories are chaotic only over much longer runs).
    diff = np.abs(np.array(a) - np.array(b))
    assert diff[:10].max() < 1e-4 and diff.max() < 2e-3, f"largest difference {diff.max():.2e}"


# ---- the gpt_step bench (fastnn/bench/gpt.py) -----------------------------------------------------------

def test_bench_model_is_the_examples(gpt):
    from fastnn.bench import gpt as _gpt_bench
    torch.manual_seed(3)
    a = gpt.GPT(gpt.VOCAB, 32, 2, 2, 32, 0.0)
    torch.manual_seed(3)
    b = _gpt_bench.build_model(torch, n_layer=2, n_head=2, d_model=32, block_size=32, vocab=gpt.VOCAB)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randint(0, gpt.VOCAB, (2, 32))
    assert torch.equal(a(x, x)[1], b(x, x))
    assert _gpt_bench.CONFIG["vocab"] == gpt.VOCAB


def test_bench_measures_and_reports(monkeypatch):
    from fastnn.bench import gpt as _gpt_bench
    monkeypatch.setitem(_gpt_bench.CONFIG, "n_layer", 1)
    monkeypatch.setitem(_gpt_bench.CONFIG, "d_model", 24)
    monkeypatch.setitem(_gpt_bench.CONFIG, "n_head", 2)
    monkeypatch.setitem(_gpt_bench.CONFIG, "block_size", 16)
    res = _gpt_bench.measure("torch", 1, steps=3, warmup=1)
    assert res["tokens_per_s"] > 0 and np.isfinite(res["loss_last"])
    rows = [dict(impl="torch", threads=1, **res), dict(impl="fastnn", threads=1, error="fastnn.torch unavailable")]
    text = _gpt_bench.report(rows)
    assert "1.00x" in text and "fastnn.torch unavailable" in text


def test_bench_profile_parts(monkeypatch):
    """`python -m fastnn.bench.gpt --profile`: both implementations profiled on a tiny model, fastnn's kernels
    counted in their parts."""
    from fastnn.bench import gpt as _gpt_bench
    for key, value in dict(n_layer=1, d_model=24, n_head=2, block_size=16, batch_size=2).items():
        monkeypatch.setitem(_gpt_bench.CONFIG, key, value)
    results = {impl: _gpt_bench.profile(impl, 1, steps=1, warmup=1) for impl in ("torch", "fastnn")}
    for impl, r in results.items():
        assert "error" not in r, r
        assert r["parts"]["matmul / linear"] > 0 and r["parts"]["attention"] > 0, (impl, r["parts"])
    assert any(name.startswith("fastnn.") for name, _ in results["fastnn"]["top"])
    text = _gpt_bench.profile_report(results, 1)
    assert "matmul / linear" in text and "fastnn ms" in text
