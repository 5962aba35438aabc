"""The report: Markdown tables of the rows of each thread count, the scaling table, how figures are counted."""
from __future__ import annotations

from typing import List, Optional

from .case import IMPLS
from .limits import LIMIT_NAMES


def format_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def _ratio(x: Optional[float]) -> str:
    return f"{x:.2f}x" if x is not None else "—"


def _markdown(lines: List[list]) -> str:
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(lines[0]))]
    fmt = lambda row: "| " + " | ".join(str(v).ljust(w) for v, w in zip(row, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(lines[0]), rule] + [fmt(row) for row in lines[1:]])


def format_table(rows: List[dict], with_torch: bool) -> str:
    """The rows of one thread count (as dicts) as a Markdown table."""
    head = ["op", "case", "fastnn", "rate", "% limit", "numpy", "vs numpy"]
    if with_torch:
        head += ["torch", "vs torch"]
    head.append("check")
    lines = [head]
    for r in rows:
        sec = r["seconds"]
        limit = (f"{r['percent_limit']:.0f}% {LIMIT_NAMES.get(r['limit'], r['limit'])}"
                 if r["percent_limit"] is not None else "—")
        line = [r["op"], r["case"],
                format_seconds(sec["fastnn"]) if "fastnn" in sec else "—",
                f"{r['rate']:.1f} {r['rate_unit']}" if r["rate"] is not None else "—",
                limit,
                format_seconds(sec["numpy"]) if "numpy" in sec else "—",
                _ratio(r["speedup_vs_numpy"])]
        if with_torch:
            line += [format_seconds(sec["torch"]) if "torch" in sec else "n/a",
                     _ratio(r["speedup_vs_torch"])]
        err = r["rel_error"].get("fastnn")
        line.append(("ok" if r["ok"] else "FAIL") + (f" ({err:.0e})" if err else ""))
        lines.append(line)
    return _markdown(lines)


def format_scaling(results: dict) -> str:
    """The scaling table: time on the fewest threads / time on each other count."""
    entries = results["scaling"]
    counts = [r["threads"] for r in results["runs"] if r["threads"] != entries[0]["base_threads"]]
    names = [n for n in IMPLS if n != "torch" or results["torch"]]
    base = entries[0]["base_threads"]
    head = ["op", "case"] + [f"{name} {base}->{n}t" for n in counts for name in names]
    lines = [head]
    for e in entries:
        line = [e["op"], e["case"]]
        for n in counts:
            line += [_ratio(e["speedup"][n].get(name)) for name in names]
        lines.append(line)
    return _markdown(lines)


def _plural(n, word) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _limits_line(lim: dict) -> str:
    return (f"limits ({_plural(lim['threads'], 'thread')}): FMA peak {lim['peak_gflops_f32']:.0f} GFLOP/s "
            f"float32, {lim['peak_gflops_f64']:.0f} float64; memory: copy {lim['mem_copy_gbs']:.1f} GB/s, "
            f"in place {lim['mem_rw_gbs']:.1f} GB/s, Adam 4r/3w {lim['mem_adam_gbs']:.1f} GB/s")


def format_report(results: dict) -> str:
    """Header (versions), per thread count its limits and table, the scaling table, and how the
    figures are counted."""
    info, blas = results["fastnn"], results["blas"]
    isa = info.get("cpu_isa", "?")
    supported = info.get("cpu_isa_supported")
    if isinstance(supported, (list, tuple)):
        supported = ", ".join(map(str, supported))
    torch = results["torch"]
    counts = ", ".join(map(str, results["threads"]))
    lines = [
        f"fastnn {info.get('version', '?')}: ISA {isa} (supported: {supported}), "
        f"OpenMP {info.get('openmp', '?')}; threads: {counts}" + (" (quick run)" if results["quick"] else ""),
        f"NumPy {results['numpy']} ({blas.get('library')} {blas.get('core') or ''}); "
        f"PyTorch {torch if torch else 'not importable'}; CPU: {results['machine']['processor']}",
    ]
    env = blas.get("env")
    if env:
        lines.append(f"note: {', '.join(f'{k}={v}' for k, v in env.items())} is set: NumPy's OpenBLAS "
                     "may not run its best kernel; unset both for this command to compare against it")
    for note in results.get("skipped", []):
        lines.append(f"skipped: {note}")
    for run in results["runs"]:
        n = run["threads"]
        lines += ["", f"### {_plural(n, 'thread')} for fastnn, PyTorch and NumPy's BLAS (it reports "
                      f"{run['blas'].get('threads')})", _limits_line(run["limits"]), "",
                  format_table(run["rows"], with_torch=bool(torch))]
    if results.get("scaling"):
        lines += ["", "### Scaling: time on the fewest threads / time on more (> 1: faster with more)", "",
                  format_scaling(results)]
    lines.append("")
    lines.append("Times are medians per call. GFLOP/s: matmul and linear 2*B*M*N*K; sdpa 4*B*H*L*S*E, its "
                 "backward 10*B*H*L*S*E (causal: L*S -> L*(L+1)/2); linear_backward 4*M*N*K; mlp_step "
                 "its matmul flops. GB/s: bytes read + written once. \"tiny call\" rows: only the time per "
                 "call (call overhead) counts. % limit: of the FMA peak (float32, or float64 for "
                 "peak64), or of the copy / in-place / Adam-pattern bandwidth, all measured by the native "
                 "probes at start for each thread count (memory on 256 MiB; arrays of 64 MiB, twice a "
                 "32 MiB L3, partly stay in cache and can pass 100%). vs numpy / vs torch: their time / "
                 "fastnn's (> 1: fastnn faster). check: fastnn's relative error against the float64 oracle "
                 "(mlp_step: of each parameter's first Adam update).")
    for run in results["runs"]:
        for r in run["rows"]:
            for name, why in r["failures"].items():
                lines.append(f"{r['op']} {r['case']} ({_plural(run['threads'], 'thread')}): {name}: {why}")
    return "\n".join(lines)
