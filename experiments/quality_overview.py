"""Every quality-study fit in one table and one figure: in-domain (Shakespeare) against
general-English perplexity at 0.5 and 0.3, beside the fair rows of the same budget.

    python experiments/quality_overview.py

Reads `results/quality/<variant>_steps<N>_seed<S>.json` (the quality study's files; a
`..._quick.json` re-evaluation beside one supplies its general-English column when the
fit's own file has none) and the fair rows `results/benchmark/fair_rows_steps150.json`
(dense, one-shot SparseGPT, SparseGPT and FLAP fine-tuned with the fit's tokens). Writes
results/quality/quality_overview.json (+ .md, and .png: one panel per size, each fit a
point, the fair rows as crosses, the general-English aim of 2.5 times dense as a line).
Reads results only, no model.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

from ppn import plots
from ppn.harness.report import write_results

ROOT = Path(__file__).resolve().parents[1]
SIZES = (0.9, 0.7, 0.5, 0.4, 0.3)
PANELS = (0.5, 0.3)
NAME = re.compile(r"^(?P<variant>.+)_steps(?P<steps>\d+)_seed(?P<seed>\d+)$")
GENERAL_AIM = 2.5  # issue "keep what the model knew": general English at 0.5 within 2.5 times dense


def _by_size(records: list[dict], method: str) -> dict[float, dict]:
    return {r["size"]: r for r in records if r["method"] == method}


def fits(folder: Path) -> list[dict]:
    """One row per quality-study fit: variant, steps, seed, commit, and perplexity in
    domain (`ppl_<size>`) and on general English (`general_<size>`, None if unmeasured)."""
    rows = []
    for path in sorted(folder.glob("*.json")):
        match = NAME.match(path.stem)
        if not match:
            continue
        doc = json.loads(path.read_text())
        ppn = _by_size(doc["records"], "ppn")
        quick = path.with_name(f"{path.stem}_quick.json")
        general = _by_size(json.loads(quick.read_text())["records"], "ppn") if quick.exists() else ppn
        unpruned = _by_size(doc["records"], "ppn (fitted weights, unpruned)").get(1.0, {})
        rows.append({"variant": match["variant"], "steps": int(match["steps"]), "seed": int(match["seed"]),
                     "commit": doc["git_commit"][:7], "unpruned": unpruned.get("perplexity"),
                     **{f"ppl_{s}": ppn[s]["perplexity"] for s in SIZES if s in ppn},
                     **{f"general_{s}": general.get(s, {}).get("general_perplexity") for s in SIZES},
                     "fit_seconds": next(iter(ppn.values()), {}).get("fit_seconds")})
    if not rows:
        raise FileNotFoundError(f"no quality-study results (<variant>_steps<N>_seed<S>.json) in {folder}")
    return rows


def references(path: Path) -> list[dict]:
    """The fair rows as points: method, size, in-domain and general-English perplexity, tokens read."""
    doc = json.loads(path.read_text())
    return [{"method": r["method"], "size": r["size"], "ppl": r["perplexity"], "general": r.get("general_perplexity"),
             "tokens": r.get("tokens_used", 0)} for r in doc["records"]]


def figure(rows: list[dict], refs: list[dict], path: Path) -> None:
    """One panel per size in `PANELS`: each fit a numbered point (circles 150 steps,
    squares longer), the fair rows as crosses; a third panel lists the numbers."""
    dense = next(r for r in refs if r["method"] == "dense")
    refs = [r for r in refs if r["general"] is not None and r["method"] != "flap"]  # one-shot FLAP: off the scale
    fig, axes = plt.subplots(1, len(PANELS) + 1, figsize=(14, 4.8), layout="constrained",
                             gridspec_kw={"width_ratios": [1] * len(PANELS) + [0.75]})
    for ax, size in zip(axes, PANELS):
        for i, row in enumerate(rows, 1):
            x, y = row.get(f"ppl_{size}"), row.get(f"general_{size}")
            if x is not None and y is not None:
                ax.scatter(x, y, marker="o" if row["steps"] <= 150 else "s", s=22, zorder=3,
                           color="C0" if row["steps"] <= 150 else "C2")
                ax.annotate(str(i), (x, y), fontsize=7, xytext=(3, 2), textcoords="offset points")
        for ref in refs:
            if ref["size"] in (size, 1.0):
                ax.scatter(ref["ppl"], ref["general"], marker="x", color="C3", s=30, zorder=3)
                label = ref["method"].replace(" (fit budget)", f", {ref['tokens']:,} tokens")
                ax.annotate(label, (ref["ppl"], ref["general"]), fontsize=7, color="C3", xytext=(4, -9),
                            textcoords="offset points")
        if size == 0.5:
            ax.axhline(GENERAL_AIM * dense["general"], color="grey", ls="--", lw=0.8)
            ax.text(0.01, GENERAL_AIM * dense["general"] * 1.05, f"general-English aim: {GENERAL_AIM} x dense",
                    fontsize=7, color="grey", transform=ax.get_yaxis_transform())
        ax.set(xscale="log", yscale="log", xlabel="Shakespeare perplexity (the fitting text)",
               ylabel="general-English perplexity", title=f"size {size}: circles 150 steps, squares 600")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "2345" else ""))
    names = [f"{i}  {r['variant']}, seed {r['seed']}" + ("" if r["steps"] == 150 else f", {r['steps']} steps")
             for i, r in enumerate(rows, 1)]
    axes[-1].axis("off")
    axes[-1].text(0, 1, "\n".join(names), fontsize=7, va="top", family="monospace", transform=axes[-1].transAxes)
    plots.save_figure(fig, path)
    plt.close(fig)


def main(folder: str = "results/quality", fair: str = "results/benchmark/fair_rows_steps150.json") -> list[dict]:
    rows = fits(ROOT / folder)
    refs = references(ROOT / fair)
    columns = ["variant", "steps", "seed", "commit", "unpruned", *(f"ppl_{s}" for s in SIZES),
               *(f"general_{s}" for s in SIZES), "fit_seconds"]
    write_results("quality_overview", rows, columns, out_dir=ROOT / folder, config={"folder": folder, "fair": fair},
                  title="Quality study: every fit's perplexity in domain and on general English")
    figure(rows, refs, ROOT / folder / "quality_overview.png")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="results/quality")
    parser.add_argument("--fair", default="results/benchmark/fair_rows_steps150.json")
    a = parser.parse_args()
    for row in main(a.folder, a.fair):
        print(row["variant"], row["steps"], row["seed"], row.get("ppl_0.5"), row.get("general_0.5"))
