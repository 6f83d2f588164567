"""Which training budget brings ppn within the aim of the fine-tuned dense model?

Issue 3's aim: at size 0.5, ppn's perplexity within 1.5x of the dense model
fine-tuned on the same tokens. Each benchmark file (`ppn bench --plan R/plan.json`)
holds ppn's rows and the dense model fine-tuned with that plan's exact budget;
this script puts several budgets side by side:

    python experiments/budget_study.py results/benchmark_quick_trim.json \\
        results/benchmark_quick_steps600.json

Per budget: training tokens, ppn's and the fine-tuned dense model's perplexity,
and their ratio. The smallest measured budget that meets the aim is named; if
none does, the straight line in log(ratio) against log(tokens) through the two
largest budgets is followed to the aim, and that budget is reported, marked as an
extrapolation, not a measurement. Writes results/budget_study.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from ppn.benchmark import DENSE_FINETUNED as DENSE_TUNED  # noqa: E402
from ppn.report import write_results  # noqa: E402
COLUMNS = ["source", "train_tokens", "size", "ppn_perplexity", "dense_finetuned_perplexity", "ratio",
           "meets_aim", "kind"]


def budget_row(path: str | Path, size: float) -> dict:
    """ppn at `size` against the fine-tuned dense model, from one benchmark file."""
    path = Path(path)
    records = json.loads(path.read_text())["records"]
    ppn = [r for r in records if r["method"] == "ppn" and abs(r["size"] - size) < 1e-9]
    dense = [r for r in records if r["method"] == DENSE_TUNED]
    if not ppn or not dense:
        raise ValueError(f"{path} needs a ppn row at size {size} and a {DENSE_TUNED!r} row "
                         f"(run ppn bench with the methods ppn and finetuned)")
    tokens = ppn[0]["tokens_used"]
    if dense[0]["tokens_used"] != tokens:
        raise ValueError(f"{path}: the fine-tuned dense model read {dense[0]['tokens_used']} tokens, "
                         f"ppn {tokens}: not an equal budget")
    return {"source": path.name, "train_tokens": tokens, "size": size, "ppn_perplexity": ppn[0]["perplexity"],
            "dense_finetuned_perplexity": dense[0]["perplexity"],
            "ratio": ppn[0]["perplexity"] / dense[0]["perplexity"], "kind": "measured"}


def crossing(tokens: np.ndarray, ratio: np.ndarray, aim: float) -> float | None:
    """Tokens where the log-log line through the two largest budgets reaches `aim`.

    `tokens` ascending. The line follows the latest trend, not a least-squares fit
    through every budget: returns diminish with the budget, so the early, steep
    part of the curve would overstate the fall ahead. None when the ratio does not
    fall between the two largest budgets (no crossing ahead)."""
    (t0, t1), (r0, r1) = np.log(tokens[-2:]), np.log(ratio[-2:])
    slope = (r1 - r0) / (t1 - t0)
    if slope >= 0:
        return None
    return float(np.exp(t1 + (np.log(aim) - r1) / slope))


def study(paths: list[str | Path], size: float = 0.5, aim: float = 1.5) -> list[dict]:
    """The measured rows, sorted by budget, and (if none meets the aim) one extrapolated row."""
    rows = sorted((budget_row(p, size) for p in paths), key=lambda r: r["train_tokens"])
    if len({r["train_tokens"] for r in rows}) != len(rows):
        raise ValueError("two benchmark files have the same budget; give one per budget")
    for r in rows:
        r["meets_aim"] = r["ratio"] <= aim
    if any(r["meets_aim"] for r in rows) or len(rows) < 2:
        return rows
    tokens = crossing(np.array([r["train_tokens"] for r in rows], float), np.array([r["ratio"] for r in rows]), aim)
    rows.append({"source": "log-log line through the two largest budgets", "train_tokens": tokens, "size": size,
                 "ratio": aim if tokens else None, "meets_aim": None, "kind": "extrapolated"})
    return rows


def plot(rows: list[dict], aim: float, path: Path) -> None:
    measured = [r for r in rows if r["kind"] == "measured"]
    tokens = [r["train_tokens"] for r in measured]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.plot(tokens, [r["ppn_perplexity"] for r in measured], "o-", label=f"ppn at {measured[0]['size']}")
    left.plot(tokens, [r["dense_finetuned_perplexity"] for r in measured], "s-", label="dense fine-tuned")
    left.set(xscale="log", yscale="log", xlabel="training tokens", ylabel="validation perplexity (quick)")
    left.legend()
    right.plot(tokens, [r["ratio"] for r in measured], "o-", label="measured")
    ahead = [r for r in rows if r["kind"] == "extrapolated" and r["train_tokens"]]
    if ahead:
        right.plot([tokens[-1], ahead[0]["train_tokens"]], [measured[-1]["ratio"], aim], "k:",
                   label="extrapolated (log-log line)")
    right.axhline(aim, color="C3", lw=0.8, label=f"aim {aim}×")
    right.set(xscale="log", xlabel="training tokens", ylabel="ppn / dense fine-tuned")
    right.legend()
    ticks = tokens + [r["train_tokens"] for r in ahead]
    for ax in (left, right):  # the budgets themselves as ticks: log-axis defaults overlap or vanish
        ax.set_xticks(ticks, [f"{t / 1e6:.2g}M" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(paths: list[str], size: float = 0.5, aim: float = 1.5, out_dir: str = "results",
         name: str = "budget_study") -> list[dict]:
    rows = study(paths, size, aim)
    write_results(name, rows, COLUMNS, out_dir=out_dir,
                  title=f"ppn at size {size} against the dense model fine-tuned with the same tokens (aim {aim}×)")
    plot(rows, aim, Path(out_dir) / f"{name}.png")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmarks", nargs="+", help="results/*.json files of ppn bench, one per budget")
    parser.add_argument("--size", type=float, default=0.5)
    parser.add_argument("--aim", type=float, default=1.5)
    parser.add_argument("--out-dir", default="results")
    parser.add_argument("--name", default="budget_study")
    a = parser.parse_args()
    for row in main(a.benchmarks, a.size, a.aim, a.out_dir, a.name):
        print(row)
