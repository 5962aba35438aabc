"""The roofline chart of a bench run (needs matplotlib: the `plot` extra)."""
from __future__ import annotations

import math

import numpy as np

from .report import _plural


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except Exception:
        return False


PLOT_CAPTION = (
    "Filled markers: counted flops (matmul 2MNK, sdpa 4BHLSE, backward 10BHLSE, ...) over the bytes every "
    "input must be read and every output written once. Hollow markers: memory-bound rows, which have no "
    "flop count: placed at an ESTIMATED flop count (per element: relu 1, softmax/log_softmax 14 and "
    "cross_entropy 15 with an exp as 10, softmax_backward 4, log_softmax_backward 13; Adam 12 per parameter), "
    "so their height below the bandwidth roof is the fraction of bandwidth reached. Tiny-call rows are not "
    "drawn. Roofs: the native probes' FMA peak and copy / in-place bandwidth for that thread count.")


def plot_roofline(results: dict, path: str) -> None:
    """A log-log roofline chart (flop/byte vs GFLOP/s) of fastnn's rows, one panel per thread count."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(7 * len(runs) + 2.5, 7.5), squeeze=False, sharey=True)
    ops = list(dict.fromkeys(r["op"] for run in runs for r in run["rows"]))
    colors = {op: plt.get_cmap("tab20")(i % 20) for i, op in enumerate(ops)}
    markers = "osD^v<>pPXh*"
    drawn = [r for run in runs for r in run["rows"] if r["intensity"] and r["gflops"]]
    xmin = min([r["intensity"] for r in drawn] + [0.05]) / 2
    xmax = max([r["intensity"] for r in drawn] + [100]) * 2
    handles = {}
    for ax, run in zip(axes[0], runs):
        lim = run["limits"]
        x = np.logspace(math.log10(xmin), math.log10(xmax), 200)
        peak = lim["peak_gflops_f32"]
        for bw, style, name in ((lim["mem_copy_gbs"], "-", "copy"), (lim["mem_rw_gbs"], "--", "in place")):
            ax.plot(x, np.minimum(peak, bw * x), style, color="black", lw=1.2,
                    label=f"{peak:.0f} GFLOP/s f32 peak, {name} {bw:.0f} GB/s")
        if any(r["limit"] == "peak_gflops_f64" for r in run["rows"]):
            ax.axhline(lim["peak_gflops_f64"], ls=":", color="grey", lw=1,
                       label=f"{lim['peak_gflops_f64']:.0f} GFLOP/s f64 peak")
        for r in run["rows"]:
            if not (r["intensity"] and r["gflops"]):
                continue
            op = r["op"]
            h = ax.scatter(r["intensity"], r["gflops"], marker=markers[ops.index(op) % len(markers)], s=40,
                           zorder=3, facecolors="none" if r["flops_estimated"] else colors[op],
                           edgecolors=colors[op])
            handles.setdefault(op, h)
            ax.annotate(r["case"].replace(" @ ", "@"), (r["intensity"], r["gflops"]), fontsize=5.5,
                        xytext=(4, 2), textcoords="offset points", color="dimgray")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(xmin, xmax)
        ax.grid(True, which="both", lw=0.3, alpha=0.5)
        ax.set_xlabel("arithmetic intensity (flop / byte)")
        ax.set_title(f"{_plural(run['threads'], 'thread')}" + (" (quick run)" if results["quick"] else ""))
        ax.legend(fontsize=7, loc="upper left", title="roofs", title_fontsize=7)
    axes[0][0].set_ylabel("GFLOP/s (fastnn)")
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=8,
               title="op (hollow: estimated flops)", title_fontsize=8)
    width, height = fig.get_size_inches()
    caption = textwrap.wrap(PLOT_CAPTION, int(width * 15))        # ~15 characters an inch at 7 pt
    fig.text(0.01, 0.01, "\n".join(caption), fontsize=7, va="bottom")
    fig.suptitle(f"fastnn roofline: {results['machine']['processor']}, ISA {results['fastnn'].get('cpu_isa')}, "
                 f"{results['date'][:10]}")
    bottom = (len(caption) * 7 * 1.25 / 72 + 0.1) / height
    fig.tight_layout(rect=(0, bottom, 1 - 2.3 / width, 1))
    fig.savefig(path, dpi=150)
    plt.close(fig)
