"""The benchmark figure: perplexity against kept fraction per method, and speed.

One colour per method in every figure (`METHOD_COLOURS`), ppn emphasised,
unstructured rows dashed, the axis capped where the methods still differ.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from ppn.plots import save_figure

METHOD_COLOURS = {
    "ppn": "#d62728",
    "dense": "#000000",
    "magnitude": "#8c564b",
    "wanda": "#1f77b4",
    "sparsegpt": "#2ca02c",
    "block_influence": "#9467bd",
    "flap": "#ff7f0e",
    "wanda_structured": "#17becf",
    "random": "#7f7f7f",
}
"""One colour per method in every benchmark figure, so a method looks the same in all of them."""

_SPARE_COLOURS = ("#e377c2", "#bcbd22", "#393b79", "#637939", "#843c39")
FINETUNED = " fine-tuned"
"""How a fine-tuned row's method name continues after its base method's name."""

DENSE_MULTIPLE = 10.0
"""The benchmark figure's perplexity axis ends at this multiple of the dense model's."""


def method_colour(method: str) -> str:
    """The colour of a benchmark method; a fine-tuned row takes its base method's.

    Methods outside `METHOD_COLOURS` get a spare colour picked by a hash of the name,
    the same in every figure."""
    base = method.split(FINETUNED)[0]
    return METHOD_COLOURS.get(base) or _SPARE_COLOURS[zlib.crc32(base.encode()) % len(_SPARE_COLOURS)]


def is_unstructured(row: dict) -> bool:
    """Whether a benchmark row zeroes single weights (unstructured or N:M) rather than cutting units."""
    return row.get("pattern") not in ("structured", "dense")


def edge_markers(ax, points: list[tuple[float, str, int]], top: float, label: str) -> None:
    """Triangles on the top edge for points beyond it, side by side where several share a
    size, and one grey triangle in the legend saying what they mean (`label`)."""
    ax.plot([], [], ls="none", marker=6, ms=7, color="0.4", label=label)
    xs = [x for x, _, _ in points]
    step = 0.02 * ((max(xs) - min(xs)) or 1.0)
    at: dict[float, list] = {}
    for p in points:
        at.setdefault(round(p[0], 3), []).append(p)
    for group in at.values():
        for i, (x, colour, zorder) in enumerate(group):
            # On the edge itself: clip_on=False keeps the whole marker, not its lower half.
            ax.plot(x + (i - (len(group) - 1) / 2) * step, top, ls="none", marker=6, ms=7, color=colour,
                    clip_on=False, zorder=zorder)


def benchmark_figure(rows: Sequence[dict], path=None):
    """The benchmark: perplexity against kept fraction per method, and the structured
    models' prefill and decode speed against dense.

    ppn is drawn thickest and on top; unstructured and N:M rows dashed, in their
    method's colour (`method_colour`); the dense model and the dense model fine-tuned
    with the fit's budget as horizontal lines. The perplexity axis is logarithmic and
    ends at `DENSE_MULTIPLE` times the dense model's perplexity, where the methods
    still differ: a point above it is a triangle on the top edge.

    Args:
        rows: records of `ppn.harness.benchmark.run` (method, pattern, kept_fraction,
            perplexity, and prefill_ratio / decode_ratio on structured rows).
        path: where to save the PNG, if anywhere.
    """
    fig, (ax, sp) = plt.subplots(1, 2, figsize=(12, 4.8))
    series: dict[str, list[dict]] = {}
    references = []
    for r in rows:
        if r["pattern"] == "dense":
            references.append(r)
        else:
            nm = is_unstructured(r) and r["pattern"] != "unstructured"
            series.setdefault(f"{r['method']} ({r['pattern']})" if nm else r["method"], []).append(r)
    dense = [r["perplexity"] for r in references if r["method"] == "dense"]
    top = DENSE_MULTIPLE * dense[0] if dense else None
    bottom = min(r["perplexity"] for r in rows) / 1.25

    for r in references:
        ax.axhline(r["perplexity"], color=method_colour(r["method"]), lw=1.2,
                   ls=":" if r["method"] == "dense" else "-.", label=r["method"], zorder=1)
    above = []  # (x, colour, zorder) of the points beyond the top
    for label, rs in series.items():
        rs = sorted(rs, key=lambda r: r["kept_fraction"])
        x, y = [r["kept_fraction"] for r in rs], [r["perplexity"] for r in rs]
        first = rs[0]
        style = dict(color=method_colour(first["method"]), ls="--" if is_unstructured(first) else "-",
                     lw=1.3, marker="o", ms=4, zorder=3)
        if label == "ppn":
            style.update(lw=3.0, ms=6, zorder=10)
        elif FINETUNED in label:
            style.update(marker="*", ms=13)
        elif first["pattern"] not in ("structured", "unstructured"):  # N:M: one point per pattern
            style.update(marker="^" if first["pattern"] == "2:4" else "v", ms=7, mfc="none")
        ax.plot(x, y, label=label, **style)
        above += [(xi, style["color"], style["zorder"]) for xi, yi in zip(x, y) if top is not None and yi > top]
    if above:
        edge_markers(ax, above, top, f"above {top:.0f} ({DENSE_MULTIPLE:g}\u00d7 dense)")
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    # Plain numbers at 1, 2 and 5 times powers of ten: perplexities, not exponents.
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="kept fraction of prunable parameters", ylabel="validation perplexity (log)", title="Quality")

    timed = False
    for label, rs in series.items():
        rs = sorted((r for r in rs if r.get("prefill_ratio")), key=lambda r: r["kept_fraction"])
        if rs:
            timed = True
            colour, wide = method_colour(rs[0]["method"]), label == "ppn"
            x = [r["kept_fraction"] for r in rs]
            sp.plot(x, [r["prefill_ratio"] for r in rs], "o-", color=colour, lw=2.5 if wide else 1.2, ms=4,
                    zorder=10 if wide else 3)
            sp.plot(x, [r["decode_ratio"] for r in rs], "x:", color=colour, lw=2.5 if wide else 1.2,
                    zorder=10 if wide else 3)
    sp.axhline(1.0, color="k", ls=":", lw=1)
    sp.set(xlabel="kept fraction of prunable parameters", ylabel="throughput / dense", title="Speed (structured)")
    if timed:
        sp.legend([Line2D([], [], color="k", marker="o", ls="-"), Line2D([], [], color="k", marker="x", ls=":")],
                  ["prefill", "decode"], fontsize=8, loc="upper right")
    fig.legend(*ax.get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8,
               frameon=False)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path, bbox_inches="tight")
    return fig
