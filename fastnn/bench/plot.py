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
    """A log-log roofline chart (flop/byte vs GFLOP/s) of fastnn's rows, one panel per thread count,
    saved to `path`."""
    import matplotlib.pyplot as plt

    fig = roofline_figure(results)
    fig.savefig(path, dpi=150)
    plt.close(fig)


# Where a point's label may go, in points from the point, tried in order: beside it, then above or below
# at growing distances (with a leader line), so the labels of a cluster of points spread out instead of
# overlapping.
_LABEL_OFFSETS = [(5, 0), (-5, 0), (5, 7), (5, -7), (-5, 7), (-5, -7)] + [
    (dx, sign * dy) for dy in range(13, 200, 6) for sign in (1, -1) for dx in (10, -10, 45, -45)]


def place_labels(ax, points, fontsize=5.5, color="dimgray"):
    """Annotates each (x, y, text) of `points` on `ax` at the first offset of _LABEL_OFFSETS where its box
    overlaps no label placed before and no marker (points placed from the top right, the densest corner
    of a roofline, down), with a leader line when it sits away from its point. Call it once the axes'
    limits and the figure layout are final. Returns the annotations."""
    from matplotlib.text import Text

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    axes_box = ax.get_window_extent(renderer)
    markers = [ax.transData.transform((x, y)) for x, y, _ in points]
    pad = fontsize * fig.dpi / 72 * 0.6                      # a marker's half-width, in pixels
    taken = [legend.get_window_extent(renderer) for legend in [ax.get_legend()] if legend is not None]
    annotations = []
    for x, y, text in sorted(points, key=lambda p: (-p[1], -p[0])):
        # (the label's own marker is in `markers` too, but no offset puts the text on it)
        chosen = None
        for dx, dy in _LABEL_OFFSETS:
            far = abs(dy) > 7
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                              color=color, ha="left" if dx > 0 else "right", va="center",
                              arrowprops=dict(arrowstyle="-", lw=0.4, color="lightgray") if far else None)
            ann.update_positions(renderer)
            box = Text.get_window_extent(ann, renderer)        # the text alone, not its leader line
            inside = (box.x0 >= axes_box.x0 and box.x1 <= axes_box.x1 and box.y0 >= axes_box.y0
                      and box.y1 <= axes_box.y1)
            clear = not any(box.overlaps(other) for other in taken) and not any(
                box.x0 - pad < mx < box.x1 + pad and box.y0 - pad < my < box.y1 + pad for mx, my in markers)
            if inside and clear:
                chosen = ann
                break
            ann.remove()
        if chosen is None:                                  # nowhere free: beside the point
            chosen = ax.annotate(text, (x, y), xytext=(5, 0), textcoords="offset points", fontsize=fontsize,
                                 color=color, va="center")
        chosen.update_positions(renderer)
        taken.append(Text.get_window_extent(chosen, renderer))
        annotations.append(chosen)
    return annotations


def roofline_figure(results: dict):
    """The roofline chart as a matplotlib figure (see plot_roofline)."""
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
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(xmin, xmax)
        ax.set_ylim(top=3 * max([lim["peak_gflops_f32"]] + [r["gflops"] for r in drawn]))  # room for labels
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
    for ax, run in zip(axes[0], runs):
        place_labels(ax, [(r["intensity"], r["gflops"], r["case"].replace(" @ ", "@"))
                          for r in run["rows"] if r["intensity"] and r["gflops"]])
    return fig
