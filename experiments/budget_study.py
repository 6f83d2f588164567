"""Which training budget brings ppn within the aim of the fine-tuned dense model?

Issue 3's aim: at size 0.5, ppn's perplexity within 1.5x of the dense model
fine-tuned on the same tokens. The rows come from results files of `ppn bench`
(ppn rows with `--plan`, the dense model fine-tuned with the plan's budget or with
`--finetune-steps N`) and of `ppn fit` (ppn rows); they are paired by their number
of training tokens, so a budget's two rows may come from one file or from two:

    python experiments/budget_study.py results/benchmark/benchmark_quick_trim.json \
        results/benchmark/benchmark_quick_steps600.json results/budget/fit_full.json \
        results/benchmark/benchmark_quick_full.json
    python experiments/budget_study.py results/quality/<fit>_steps600_seed0.json \
        --dense results/benchmark/benchmark_quick_steps600.json    # only its dense fine-tuned row

`--dense FILE` reads only the fine-tuned dense rows of FILE, so a bench file whose
ppn rows come from another fit can still give a budget's dense row.

Per budget: training tokens, ppn's and the fine-tuned dense model's perplexity,
their ratio, and whether it meets the aim. Measured budgets only: a line drawn
beyond them is a guess, not a result. Writes results/budget/budget_study.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, NullFormatter

from ppn.harness.benchmark import DENSE_FINETUNED as DENSE_TUNED
from ppn.harness.figures import method_colour
from ppn.harness.report import write_results

COLUMNS = ["source", "train_tokens", "size", "ppn_perplexity", "dense_finetuned_perplexity", "ratio", "meets_aim"]


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


def budget_rows(paths: list[str | Path], size: float, dense_paths: list[str | Path] = ()) -> list[dict]:
    """ppn at `size` against the fine-tuned dense model, one row per budget.

    Every ppn row at `size` needs a fine-tuned dense row with the same number of
    training tokens (an equal budget), in the same file or another; `dense_paths`
    give fine-tuned dense rows only."""
    ppn: dict[int, list] = {}
    dense: dict[int, list] = {}
    for path, dense_only in [(Path(p), False) for p in paths] + [(Path(p), True) for p in dense_paths]:
        for r in json.loads(path.read_text())["records"]:
            if r["method"] == "ppn" and abs(r["size"] - size) < 1e-9 and not dense_only:
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
                     "dense_finetuned_perplexity": dense_ppl, "ratio": ppl / dense_ppl})
    return rows


def study(paths: list[str | Path], size: float = 0.5, aim: float = 1.5,
          dense_paths: list[str | Path] = ()) -> list[dict]:
    """The measured rows, sorted by budget, each marked whether it meets the aim."""
    rows = sorted(budget_rows(paths, size, dense_paths), key=lambda r: r["train_tokens"])
    for r in rows:
        r["meets_aim"] = r["ratio"] <= aim
    return rows


def plot(rows: list[dict], aim: float, path: Path) -> None:
    """Perplexities and their ratio against the training tokens, at the measured budgets only."""
    tokens = [r["train_tokens"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.plot(tokens, [r["ppn_perplexity"] for r in rows], "o-", color=method_colour("ppn"), lw=2.5,
              label=f"ppn at {rows[0]['size']}")
    left.plot(tokens, [r["dense_finetuned_perplexity"] for r in rows], "s-", color=method_colour("dense"),
              label="dense fine-tuned")
    left.set(xscale="log", yscale="log", xlabel="training tokens", ylabel="validation perplexity (quick)")
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # perplexities, not powers of ten
    left.yaxis.set_major_formatter(plain)
    left.yaxis.set_minor_formatter(plain)
    left.legend()
    right.plot(tokens, [r["ratio"] for r in rows], "o-", color=method_colour("ppn"), lw=2.5, label="measured")
    right.axhline(aim, color="0.4", ls="--", lw=0.8, label=f"aim {aim}×")
    right.set(xscale="log", xlabel="training tokens", ylabel="ppn / dense fine-tuned")
    right.legend()
    for ax in (left, right):  # the budgets themselves as ticks: log-axis defaults overlap or vanish
        ax.set_xticks(tokens, [f"{t / 1e6:.2g}M" for t in tokens])
        ax.xaxis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(paths: list[str], size: float = 0.5, aim: float = 1.5, out_dir: str = "results/budget",
         name: str = "budget_study", dense_paths: list[str] = ()) -> list[dict]:
    rows = study(paths, size, aim, dense_paths)
    write_results(name, rows, COLUMNS, out_dir=out_dir,
                  title=f"ppn at size {size} against the dense model fine-tuned with the same tokens (aim {aim}×)")
    plot(rows, aim, Path(out_dir) / f"{name}.png")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results/*.json files of ppn bench and ppn fit")
    parser.add_argument("--size", type=float, default=0.5)
    parser.add_argument("--aim", type=float, default=1.5)
    parser.add_argument("--out-dir", default="results/budget")
    parser.add_argument("--name", default="budget_study")
    parser.add_argument("--dense", action="append", default=[], metavar="FILE",
                        help="read only the fine-tuned dense rows of this results file (repeatable)")
    a = parser.parse_args()
    for row in main(a.results, a.size, a.aim, a.out_dir, a.name, a.dense):
        print(row)
