"""Running the bench: check each case against the oracle, time every implementation on each thread count,
then print the report (and write the JSON and the chart)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

import fastnn

from .case import IMPLS, Case
from .cases import select
from .limits import machine_limits
from .isa import FORCED_ENV
from .peers import blas_info, import_torch, torch_kernels
from .plot import plot_roofline
from .report import _plural, format_report, format_seconds
from .timing import Timing, note_threads, settle, time_call


@dataclass
class Row:
    case: Case
    threads: int = 1
    times: Dict[str, Optional[Timing]] = field(default_factory=dict)
    errors: Dict[str, float] = field(default_factory=dict)   # relative error of each result checked
    failures: Dict[str, str] = field(default_factory=dict)   # implementation -> what went wrong
    ok: bool = False                                         # fastnn ran and matched the oracle
    rate: Optional[float] = None                             # GFLOP/s or GB/s of fastnn
    percent_limit: Optional[float] = None

    def speedup(self, other) -> Optional[float]:
        mine, theirs = self.times.get("fastnn"), self.times.get(other)
        return theirs.median / mine.median if mine and theirs else None

    def intensity(self) -> Tuple[Optional[float], Optional[float]]:
        """(flops, bytes) of one call for the roofline: counted, or estimated (est_flops, traffic)."""
        c = self.case
        if c.unit == "flop":
            return c.work, c.traffic
        if c.unit == "byte":
            return c.est_flops, c.work
        return None, None

    def to_dict(self) -> dict:
        c = self.case
        flops, nbytes = self.intensity()
        t = self.times.get("fastnn")
        return {
            "op": c.op, "case": c.label, "threads": self.threads, "work": c.work, "unit": c.unit,
            "formula": c.formula, "limit": c.limit, "notes": c.notes, "ok": self.ok, "tol": c.tol,
            "rel_error": self.errors, "failures": self.failures,
            "seconds": {k: t.median for k, t in self.times.items() if t},
            "best_seconds": {k: t.best for k, t in self.times.items() if t},
            "calls": {k: t.calls for k, t in self.times.items() if t},
            "p90_seconds": {k: t.p90 for k, t in self.times.items() if t and t.p90},
            # implementations whose p90 / median exceeds SPREAD_FLAG: their figures are flagged
            "unreliable": sorted(k for k, t in self.times.items() if t and t.unreliable),
            "rate": self.rate, "rate_unit": {"flop": "GFLOP/s", "byte": "GB/s"}.get(c.unit),
            "percent_limit": self.percent_limit,
            "speedup_vs_numpy": self.speedup("numpy"), "speedup_vs_torch": self.speedup("torch"),
            # roofline: flop / byte, and fastnn's GFLOP/s (estimated flops for the byte rows)
            "flops_estimated": c.unit == "byte",
            "intensity": flops / nbytes if flops and nbytes else None,
            "gflops": flops / t.median / 1e9 if flops and t else None,
        }


def use_threads(threads, torch=None) -> dict:
    """Run fastnn, NumPy's BLAS and PyTorch on `threads` threads; returns blas_info()."""
    fastnn.set_num_threads(threads)
    if torch is not None:
        torch.set_num_threads(threads)
    return blas_info(threads)


def run_case(case: Case, torch=None, quick=False, limits=None, seed=0, inputs=None, want=None,
             threads=None) -> Row:
    """Check fastnn (and the others) against the oracle, then time each implementation side by side,
    on the thread count already set (`threads` records it). `inputs` and `want` (the oracle's result)
    may be given, to share them between thread counts."""
    threads = threads or fastnn.get_num_threads()
    row = Row(case, threads)
    if inputs is None:
        inputs = case.inputs(np.random.default_rng(seed))
    if want is None:
        want = case.expected(inputs)
    budget, min_samples = (0.05, 2) if quick else (0.4, 5)
    for name in IMPLS:
        if name == "torch" and torch is None:
            continue
        settle()
        try:
            fn = case.impls[name](inputs, torch)
            start = time.perf_counter()
            result = fn()                                 # first call: checked, and it warms up
            first = time.perf_counter() - start
        except Exception as exc:
            row.failures[name] = f"{type(exc).__name__}: {exc}"
            note_threads(threads, blas=case.blas)
            continue
        err = case.error(result, want, inputs)
        row.errors[name] = err
        if name == "fastnn":
            row.ok = err <= case.tol
            if not row.ok:
                row.failures[name] = f"relative error {err:.3g} > {case.tol:g}"
        elif not err <= max(case.tol, 1e-4) * 10:
            # The baseline does not compute the same thing: report it, still time it.
            row.failures[name] = f"relative error {err:.3g} against the oracle"
        del result
        note_threads(threads, blas=case.blas and name == "numpy")
        settle()
        row.times[name] = time_call(fn, budget=budget, first=first, warmup=0.0 if quick else 0.3,
                                    min_samples=_samples_for(first, quick, min_samples))
        note_threads(threads, blas=case.blas and name == "numpy")
        del fn
    mine = row.times.get("fastnn")
    if mine and case.unit in ("flop", "byte"):
        row.rate = case.work / mine.median / 1e9
        limit = (limits or {}).get(case.limit)
        if limit:
            row.percent_limit = 100.0 * row.rate / limit
    return row


def _samples_for(first, quick, min_samples) -> int:
    """Fewer samples for slow calls (the first call's seconds), so that a full run fits in minutes: 3
    above 0.25 s, 1 above 1 s (NumPy's dense attention, 4096^3 products on one thread); --quick: 1
    above 0.1 s."""
    if quick:
        return 1 if first > 0.1 else min_samples
    return 1 if first > 1.0 else 3 if first > 0.25 else min_samples


def default_threads() -> List[int]:
    """1 and fastnn's thread count (just 1 when that is 1)."""
    n = fastnn.get_num_threads()
    return [1, n] if n > 1 else [1]


def parse_threads(text) -> List[int]:
    """"1,2" -> [1, 2] (duplicates dropped, order kept); ValueError unless every entry is an int >= 1."""
    counts = []
    for part in str(text).split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise ValueError(f"--threads: expected thread counts >= 1 separated by commas, got {text!r}")
        if int(part) not in counts:
            counts.append(int(part))
    return counts


def run(ops=None, quick=False, threads=None, json_path=None, torch="auto", out=sys.stdout,
        progress=sys.stderr, plot_path=None) -> dict:
    """Run the bench on each thread count of `threads` (an int or a list; default_threads() when None):
    measure each count's limits, then for every selected case make the inputs and the oracle once and
    check + time every implementation on each count. Prints the tables to `out` and the progress to
    `progress`, writes `json_path` and the roofline `plot_path` when given. Returns everything as a dict."""
    if torch == "auto":
        torch = import_torch()
    cases = [c for c in select(ops, quick) if torch is not None or not c.torch_arrays]
    skipped = [(c, f"fastnn.{c.requires} does not exist") for c in select(ops, quick, available=False)
               if not c.available()]
    skipped += [(c, "it calls fastnn on torch tensors, and torch is not used") for c in select(ops, quick)
                if c.torch_arrays and torch is None]
    if threads is None:
        counts = default_threads()
    elif isinstance(threads, int):
        counts = [threads]
    else:
        counts = list(dict.fromkeys(threads))
    for c, why in skipped:
        print(f"skipping {c.op} {c.label}: {why}", file=progress)
    previous_threads = fastnn.get_num_threads()
    runs = {n: {"threads": n, "rows": []} for n in counts}
    try:
        for n in counts:
            runs[n]["blas"] = use_threads(n, torch)
            print(f"measuring machine limits ({_plural(n, 'thread')}) ...", file=progress, flush=True)
            runs[n]["limits"] = machine_limits(n, quick)
            note_threads(n)
        for i, case in enumerate(cases, 1):
            print(f"[{i}/{len(cases)}] {case.op} {case.label} ...", end="", file=progress, flush=True)
            start = time.perf_counter()
            inputs = case.inputs(np.random.default_rng(0))
            want = case.expected(inputs)
            print(f" (inputs + oracle {time.perf_counter() - start:.1f} s)", end="", file=progress)
            note_threads(fastnn.get_num_threads(), blas=case.blas)   # the oracle ran BLAS
            for n in counts:
                use_threads(n, torch)
                row = run_case(case, torch, quick, runs[n]["limits"], inputs=inputs, want=want, threads=n)
                runs[n]["rows"].append(row)
                prefix = f" {n}t: " if len(counts) > 1 else " "
                print(prefix + _progress_summary(row), end=";", file=progress, flush=True)
            print(f" {time.perf_counter() - start:.1f} s", file=progress, flush=True)
            del inputs, want
    finally:
        use_threads(previous_threads, torch)
    blas = runs[counts[0]]["blas"]
    results = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": quick,
        "threads": counts,
        "machine": {"platform": platform.platform(), "processor": _cpu_name(),
                    "cpus": os.cpu_count()},
        "fastnn": _jsonable(fastnn.info()),
        "numpy": np.__version__,
        "blas": blas,
        "torch": getattr(torch, "__version__", None),
        "torch_kernels": torch_kernels(torch),
        "peer_isa": os.environ.get(FORCED_ENV),
        "skipped": [f"{c.op} {c.label}: {why}" for c, why in skipped],
        "runs": [{"threads": n, "blas": runs[n]["blas"], "limits": runs[n]["limits"],
                  "rows": [r.to_dict() for r in runs[n]["rows"]]} for n in counts],
    }
    results["scaling"] = scaling(results)
    print(format_report(results), file=out, flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"wrote {json_path}", file=progress)
    if plot_path:
        plot_roofline(results, plot_path)
        print(f"wrote {plot_path}", file=progress)
    return results


def scaling(results: dict) -> List[dict]:
    """Per row: time on the fewest threads / time on each other count, for every implementation
    (empty when one count ran)."""
    runs = results["runs"]
    if len(runs) < 2:
        return []
    base = min(runs, key=lambda r: r["threads"])
    others = [r for r in runs if r is not base]
    rows = []
    for i, b in enumerate(base["rows"]):
        entry = {"op": b["op"], "case": b["case"], "base_threads": base["threads"], "speedup": {},
                 "unreliable": {}}
        for r in others:
            o = r["rows"][i]
            # a ratio is as shaky as either figure it divides
            entry["unreliable"][r["threads"]] = sorted(set(b.get("unreliable", ())) | set(o.get("unreliable", ())))
            entry["speedup"][r["threads"]] = {
                name: b["seconds"][name] / o["seconds"][name]
                for name in IMPLS if name in b["seconds"] and name in o["seconds"]}
        rows.append(entry)
    return rows


def _progress_summary(row: Row) -> str:
    parts = []
    for name in IMPLS:
        t = row.times.get(name)
        if t:
            parts.append(f"{name} {format_seconds(t.median)}")
        elif name in row.failures:
            parts.append(f"{name} FAILED")
    if row.failures:
        parts.append("; ".join(f"{k}: {v}" for k, v in row.failures.items()))
    return ", ".join(parts)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))
