"""The report: Markdown tables of the rows of each thread count, the scaling table, how figures are counted."""
from __future__ import annotations

from typing import List, Optional

from .case import IMPLS
from .limits import FMA_PIPES, LANES_F32, LIMIT_NAMES, implied_clock_ghz
from .timing import SPREAD_FLAG


def format_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


# Marks a figure whose samples spread too much to be trusted (timing.SPREAD_FLAG), see the footnote.
FLAG = " (!)"


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
        shaky = set(r.get("unreliable", ()))
        mark = lambda *names: FLAG if shaky & set(names) else ""
        line = [r["op"], r["case"],
                format_seconds(sec["fastnn"]) + mark("fastnn") if "fastnn" in sec else "—",
                f"{r['rate']:.1f} {r['rate_unit']}" + mark("fastnn") if r["rate"] is not None else "—",
                limit,
                format_seconds(sec["numpy"]) + mark("numpy") if "numpy" in sec else "—",
                _ratio(r["speedup_vs_numpy"]) + mark("fastnn", "numpy")]
        if with_torch:
            line += [format_seconds(sec["torch"]) + mark("torch") if "torch" in sec else "n/a",
                     _ratio(r["speedup_vs_torch"]) + mark("fastnn", "torch")]
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
            shaky = set(e.get("unreliable", {}).get(n, ()))
            line += [_ratio(e["speedup"][n].get(name)) + (FLAG if name in shaky else "") for name in names]
        lines.append(line)
    return _markdown(lines)


def _plural(n, word) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _torch_kernels(results: dict) -> str:
    kernels = results.get("torch_kernels") or {}
    names = {"aten": "ATen", "mkl": "MKL", "onednn": "oneDNN"}
    return f" ({', '.join(f'{names[k]} {v}' for k, v in kernels.items())})" if kernels else ""


def _bf16_peak(lim: dict) -> str:
    """The bf16 dot product's peak, where the path has one (older result files lack the key)."""
    bf16 = lim.get("peak_gflops_bf16")
    return f", {bf16:.0f} bfloat16 dot product" if bf16 and bf16 != lim["peak_gflops_f32"] else ""


def _limits_line(lim: dict) -> str:
    model, isa = lim.get("model_peak_gflops_f32"), lim.get("isa")
    clock = implied_clock_ghz(lim["peak_gflops_f32"] / lim["threads"], isa) if isa else None
    if model:
        model = f" (model from the clock: {model:.0f})"
    elif clock:
        model = f" (= {lim['threads']} x {FMA_PIPES} FMA pipes x {LANES_F32[isa]} lanes x 2 at {clock:.2f} GHz)"
    else:
        model = ""
    return (f"limits ({_plural(lim['threads'], 'thread')}): FMA peak {lim['peak_gflops_f32']:.0f} GFLOP/s "
            f"float32{model}, {lim['peak_gflops_f64']:.0f} float64{_bf16_peak(lim)}; memory: copy {lim['mem_copy_gbs']:.1f} GB/s, "
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
        f"{info.get('thread_pool', '?')}; threads: {counts}" + (" (quick run)" if results["quick"] else ""),
        f"NumPy {results['numpy']} ({blas.get('library')} {blas.get('core') or ''}); "
        f"PyTorch {torch if torch else 'not importable'}{_torch_kernels(results)}; "
        f"CPU: {results['machine']['processor']}",
    ]
    env = blas.get("env")
    if results.get("peer_isa"):
        lines.append(f"peers forced to the {results['peer_isa']} path (--isa) through OPENBLAS_CORETYPE, "
                     "ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS and ONEDNN_MAX_CPU_ISA; the line above "
                     "gives the kernels they report")
    elif env:
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
                 "call (call overhead) counts; in the \"torch.Tensor\" ones fastnn is called on torch CPU tensors "
                 "(numpy and torch columns as in the row above it), so the difference between the two "
                 "fastnn times is what taking a tensor in and giving one back costs. % limit: of the FMA peak (float32, or float64 for "
                 "peak64), or of the copy / in-place / Adam-pattern bandwidth, all measured by the native "
                 "probes at start for each thread count (memory on 256 MiB; arrays of 64 MiB, twice a "
                 "32 MiB L3, partly stay in cache and can pass 100%). vs numpy / vs torch: their time / "
                 "fastnn's (> 1: fastnn faster). check: fastnn's relative error against the float64 oracle "
                 "(mlp_step: of each parameter's first Adam update).")
    flagged = sum(bool(r.get("unreliable")) for run in results["runs"] for r in run["rows"])
    if flagged:
        lines.append(f"(!) {_plural(flagged, 'row')}: the 90th-percentile sample is over {SPREAD_FLAG}x the "
                     "median, so another process or a thread pool disturbed the timing: the figure (and "
                     "ratios and scaling built on it) is not to be trusted; run again on a quiet machine. In "
                     "the scaling table (!) marks a ratio built on such a figure, as two-thread rows on a "
                     "shared machine often are.")
    for run in results["runs"]:
        for r in run["rows"]:
            for name, why in r["failures"].items():
                lines.append(f"{r['op']} {r['case']} ({_plural(run['threads'], 'thread')}): {name}: {why}")
    return "\n".join(lines)
