"""`fastnn bench` runs end to end on a small selection and prints its table (the figures are not checked:
timings never decide a test)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fastnn
from fastnn import bench

PKG_ROOT = str(Path(fastnn.__file__).resolve().parent.parent)


def run_bench(*args, tmp_path):
    p = subprocess.run([sys.executable, "-m", "fastnn", "bench", *args], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": PKG_ROOT})
    return p


def test_bench_relu_quick_prints_a_checked_table(tmp_path):
    out = tmp_path / "r.json"
    p = run_bench("--op", "relu", "--quick", "--threads", "1", "--no-torch", "--json", str(out), tmp_path=tmp_path)
    assert p.returncode == 0, p.stderr
    assert re.search(r"^\| op +\| case +\| fastnn .*\| check +\|$", p.stdout, re.M), p.stdout
    rows = [line for line in p.stdout.splitlines() if line.startswith("| relu ")]
    assert len(rows) == len(bench.select(["relu"], quick=True)) and all("| ok" in r for r in rows), p.stdout
    result = json.loads(out.read_text())
    assert [r["threads"] for r in result["runs"]] == [1]


def test_bench_list_names_every_case(tmp_path):
    p = run_bench("--list", tmp_path=tmp_path)
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) == len(bench.select(available=False))


@pytest.mark.parametrize("bad", ["0", "a", "1,,2"])
def test_bench_threads_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="--threads"):
        bench.parse_threads(bad)


def test_roofline_labels_do_not_overlap():
    """A dense cluster of points near the roof (as a bench's matmul and attention rows are) gets labels
    whose boxes do not overlap."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    from matplotlib.text import Annotation, Text

    from fastnn.bench import plot

    rng = __import__("numpy").random.default_rng(0)
    rows = [{"op": "matmul" if i % 2 else "sdpa", "case": f"{64 * i}x{64 * i}@{64 * i}x{64 * i}",
             "intensity": float(10 ** rng.uniform(1, 3)), "gflops": float(rng.uniform(150, 250)),
             "flops_estimated": False, "limit": "peak_gflops_f32"} for i in range(1, 25)]
    rows += [{"op": "relu", "case": f"{n}M out=y", "intensity": 0.125, "gflops": 8.0 + n,
              "flops_estimated": True, "limit": "mem_copy_gbs"} for n in range(4)]
    limits = {"peak_gflops_f32": 265.0, "peak_gflops_f64": 132.0, "mem_copy_gbs": 41.0, "mem_rw_gbs": 60.0}
    results = {"runs": [{"threads": 1, "limits": limits, "rows": rows}], "quick": False, "date": "2026-01-01",
               "machine": {"processor": "test"}, "fastnn": {"cpu_isa": "avx2"}}
    fig = plot.roofline_figure(results)
    try:
        renderer = fig.canvas.get_renderer()
        labels = [a for a in fig.axes[0].texts if isinstance(a, Annotation)]
        assert len(labels) == len(rows)
        boxes = []
        for a in labels:
            a.update_positions(renderer)
            boxes.append(Text.get_window_extent(a, renderer))
        overlaps = [(labels[i].get_text(), labels[j].get_text()) for i in range(len(boxes))
                    for j in range(i) if boxes[i].overlaps(boxes[j])]
        assert not overlaps, overlaps
    finally:
        plt.close(fig)
