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
    # (without torch, the rows that call fastnn on torch tensors are skipped)
    want = [c for c in bench.select(["relu"], quick=True) if not c.torch_arrays]
    assert len(rows) == len(want) and all("| ok" in r for r in rows), p.stdout
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


def test_bench_isa_forces_fastnn_and_numpy_onto_the_path(tmp_path):
    """`--isa avx2` runs the bench in a child with fastnn on its AVX2 path and NumPy's OpenBLAS on its
    Haswell (AVX2) kernels, and the header says which kernels ran."""
    if "avx2" not in fastnn.info()["cpu_isa_supported"]:
        pytest.skip("this CPU has no AVX2")
    out = tmp_path / "r.json"
    p = run_bench("--isa", "avx2", "--op", "relu", "--quick", "--threads", "1", "--no-torch", "--json", str(out),
                  tmp_path=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "## ISA path avx2" in p.stdout and "ISA avx2 (supported" in p.stdout, p.stdout
    result = json.loads(out.read_text())
    assert result["fastnn"]["cpu_isa"] == "avx2" and result["peer_isa"] == "avx2"
    if result["blas"].get("library") == "openblas" and result["blas"].get("core"):
        assert result["blas"]["core"] == "Haswell", result["blas"]
        assert "(openblas Haswell)" in p.stdout


def test_bench_isa_rejects_a_path_this_machine_lacks(tmp_path):
    missing = [p for p in bench.isa.PATHS if p not in fastnn.info()["cpu_isa_supported"]]
    if not missing:
        pytest.skip("this CPU supports every path")
    p = run_bench("--isa", missing[0], "--op", "relu", tmp_path=tmp_path)
    assert p.returncode == 2 and "not available" in p.stderr


def test_spread_flags_in_tables():
    """A figure whose p90 exceeds SPREAD_FLAG x its median is marked (!) with what is built on it, and a
    footnote explains it; in the scaling table a ratio built on a flagged figure is marked too."""
    from fastnn.bench.timing import Timing

    steady, shaky = Timing(1e-3, 1e-3, 10, 1.05e-3), Timing(1e-3, 1e-3, 10, 2e-3)
    assert not steady.unreliable and shaky.unreliable and Timing(1e-3, 1e-3, 3).spread is None
    case = bench.select(["relu"], quick=True)[0]
    rows = {}
    for n, numpy_t in ((1, steady), (2, shaky)):
        row = bench.Row(case, n, times={"fastnn": steady, "numpy": numpy_t}, ok=True)
        rows[n] = row.to_dict()
    assert rows[1]["unreliable"] == [] and rows[2]["unreliable"] == ["numpy"]
    table = bench.format_table([rows[2]], with_torch=False)
    line = [x for x in table.splitlines() if x.startswith("| relu")][0]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert not cells[2].endswith("(!)") and cells[5].endswith("(!)") and cells[6].endswith("(!)"), cells
    results = {"runs": [{"threads": 1, "rows": [rows[1]]}, {"threads": 2, "rows": [rows[2]]}], "torch": None}
    results["scaling"] = bench.scaling(results)
    scaling = bench.format_scaling(results)
    line = [x for x in scaling.splitlines() if x.startswith("| relu")][0]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert not cells[2].endswith("(!)") and cells[3].endswith("(!)"), cells


def test_wait_quiet_waits_for_busy_threads():
    """wait_quiet() returns at once when no other thread runs, and only after a busy thread stops."""
    import threading
    import time

    from fastnn.bench import timing

    if timing.wait_quiet(timeout=1.0) is None:
        pytest.skip("threads' CPU time cannot be read here (no /proc)")
    assert timing.wait_quiet(timeout=1.0) < 0.5
    stop = time.perf_counter() + 0.3

    def spin():
        while time.perf_counter() < stop:
            pass

    t = threading.Thread(target=spin)
    t.start()
    waited = timing.wait_quiet(timeout=2.0)
    t.join()
    assert waited >= 0.2, waited


def test_extra_op_family_runs_through_the_cli(monkeypatch, capsys):
    """An op family registered with fastnn.bench.extra is accepted by --op and its run(args) is called
    with the parsed options; the case table is not run when only extra families are named."""
    from fastnn import __main__ as cli

    calls = []
    monkeypatch.setattr(bench.extra, "_REGISTRY", {})
    bench.extra.register("demo", lambda args: calls.append(args) or 0, "a test family")
    assert cli.main(["bench", "--op", "demo", "--quick"]) == 0
    assert len(calls) == 1 and calls[0].quick


def test_cuda_event_timer_flushes_l2_before_each_repetition():
    """The GPU timer (bench/gpu_bench.py's) on a stand-in cupy: warm-up calls untimed, then per repetition an
    L2 flush, the events around the call, and the median of the event times (ms) in seconds."""
    from types import SimpleNamespace
    log = []

    class Event:
        def record(self):
            log.append("event")

        def synchronize(self):
            pass

    ms = iter([3.0, 1.0, 2.0, 5.0, 4.0])
    fake = SimpleNamespace(uint8="uint8", empty=lambda n, dtype: SimpleNamespace(fill=lambda v: log.append("flush")),
                           cuda=SimpleNamespace(Event=Event, get_elapsed_time=lambda a, b: next(ms)))
    t = bench.CudaEvents(fake)(lambda: log.append("call"), reps=5, warmup=2)
    assert log == ["call"] * 2 + ["flush", "event", "call", "event"] * 5
    assert (t.median, t.best, t.calls) == (3e-3, 1e-3, 5)

