"""Which training budget brings ppn within the aim of the fine-tuned dense model?

Issue 3's aim: at size 0.5, ppn's perplexity within 1.5x of the dense model
fine-tuned on the same tokens. The rows come from results files of `ppn bench`
(ppn rows with `--plan`, the dense model fine-tuned with the plan's budget or with
`--finetune-steps N`) and of `ppn fit` (ppn rows); they are paired by their number
of training tokens, so a budget's two rows may come from one file or from two:

    python experiments/budget_study.py results/benchmark_quick_trim.json \
        results/benchmark_quick_steps600.json results/fit_full.json \
        results/benchmark_quick_full.json

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


def _tokens(record: dict) -> int:
    """Training tokens of a row: `tokens_used` in bench files, `train_tokens` in fit files."""
    return int(record.get("tokens_used", record.get("train_tokens", 0)))


def _one_per_budget(found: dict[int, list[tuple[str, float]]], what: str) -> dict[int, tuple[str, float]]:
    """Each budget's single perplexity; files that repeat a row must agree on it."""
    out = {}
    for tokens, rows in found.items():
        values = [ppl for _, ppl in rows]
        if max(values) > min(values) * (1 + 1e-3):
            raise ValueError(f"{tokens} training tokens: {what} rows disagree ("
                             + ", ".join(f"{ppl:.4g} in {src}" for src, ppl in rows)
                             + "); pass one run per budget")
        out[tokens] = rows[0]
    return out


def budget_rows(paths: list[str | Path], size: float) -> list[dict]:
    """ppn at `size` against the fine-tuned dense model, one row per budget.

    Every ppn row at `size` needs a fine-tuned dense row with the same number of
    training tokens (an equal budget), in the same file or another."""
    ppn: dict[int, list] = {}
    dense: dict[int, list] = {}
    for path in map(Path, paths):
        for r in json.loads(path.read_text())["records"]:
            if r["method"] == "ppn" and abs(r["size"] - size) < 1e-9:
                ppn.setdefault(_tokens(r), []).append((path.name, r["perplexity"]))
            elif r["method"] == DENSE_TUNED:
                dense.setdefault(_tokens(r), []).append((path.name, r["perplexity"]))
    ppn, dense = _one_per_budget(ppn, f"ppn@{size}"), _one_per_budget(dense, DENSE_TUNED)
    if not ppn:
        raise ValueError(f"no ppn row at size {size} in {', '.join(map(str, paths))} "
                         "(run ppn fit, or ppn bench with the method ppn)")
    rows = []
    for tokens, (source, ppl) in ppn.items():
        if tokens not in dense:
            raise ValueError(f"ppn@{size} in {source} read {tokens} training tokens, but no {DENSE_TUNED!r} row "
                             f"has that budget (found: {sorted(dense) or 'none'}): not an equal budget; run "
                             "ppn bench --methods finetuned with --plan of that fit or --finetune-steps")
        dense_source, dense_ppl = dense[tokens]
        rows.append({"source": source if source == dense_source else f"{source} + {dense_source}",
                     "train_tokens": tokens, "size": size, "ppn_perplexity": ppl,
                     "dense_finetuned_perplexity": dense_ppl, "ratio": ppl / dense_ppl, "kind": "measured"})
    return rows


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
    rows = sorted(budget_rows(paths, size), key=lambda r: r["train_tokens"])
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
    parser.add_argument("results", nargs="+", help="results/*.json files of ppn bench and ppn fit")
    parser.add_argument("--size", type=float, default=0.5)
    parser.add_argument("--aim", type=float, default=1.5)
    parser.add_argument("--out-dir", default="results")
    parser.add_argument("--name", default="budget_study")
    a = parser.parse_args()
    for row in main(a.results, a.size, a.aim, a.out_dir, a.name):
        print(row)
