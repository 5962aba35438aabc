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
