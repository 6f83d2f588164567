"""Does the posterior change a decision? Fits with the Normal guide (AutoNormal)
against fits with the point guide (AutoDelta, MAP) of the same config, two seeds
each (the quality study's `combined_lr1e-3_cosine_targets`, the recommended fit, and its
`combined_lr1e-3_cosine_targets_map`).

    python experiments/map_compare.py \\
        --normal runs/quality/combined_lr1e-3_cosine_targets_steps150_seed{0,1} \\
        --map runs/quality/combined_lr1e-3_cosine_targets_map_steps150_seed{0,1}

Per run: quick validation perplexity at each size (the results JSON its job.json
names, found beside the run's `runs/` folder) and the undecided share at each size
(gates whose open probability lies in (0.05, 0.95), `Posterior.undecided_share`).
Per size: how much the two guides' cuts of one seed disagree (same batches, same
sizes), against how much the two seeds of one guide disagree (what a refit moves
anyway). Disagreement is the share of kept prunable parameters that only one of two
cuts keeps (`ppn.decisions.mismatch`). Reads plans and results only,
no model; writes results/posterior/map_compare.json (+ .md, and .png: perplexity and
disagreement against size).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ppn import plots
from ppn.decisions import mismatch
from ppn.harness.report import write_results
from ppn.plan import Plan

SIZES = (0.9, 0.7, 0.5, 0.4, 0.3)


def run_perplexities(run_dir: Path) -> dict[float, float]:
    """Quick validation perplexity of the run's cut at each size, from the results
    JSON its job wrote (job.json's `results`, relative to the folder above `runs/`;
    `ppn fit`'s default, results.json in the run folder)."""
    job = json.loads((run_dir / "job.json").read_text())
    depth = len(Path(job["run_dir"]).parts)
    path = run_dir.resolve().parents[depth - 1] / job["results"] if job["results"] else run_dir / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: its results file {path} is missing; has the job finished?")
    records = json.loads(path.read_text())["records"]
    return {r["size"]: r["perplexity"] for r in records if r["method"] == "ppn"}


def compare(normal: list[Path], point: list[Path], sizes=SIZES) -> list[dict]:
    """One record per run (perplexity and undecided share by size) and one per size
    (disagreements), as `main` writes them."""
    if len(normal) != len(point) or len(normal) < 2:
        raise ValueError(f"give the same number (>= 2) of Normal-guide and MAP runs, one per seed, in seed order; "
                         f"got {len(normal)} and {len(point)}")
    runs = {"normal": normal, "map": point}
    plans = {g: [Plan.load(r / "plan.json") for r in dirs] for g, dirs in runs.items()}
    records = []
    for guide, dirs in runs.items():
        for run_dir, plan in zip(dirs, plans[guide]):
            ppl = run_perplexities(run_dir)
            records.append({"kind": "run", "guide": guide, "run": str(run_dir),
                            **{f"ppl_{s}": ppl.get(s) for s in sizes},
                            **{f"undecided_{s}": plan.undecided_share(s) for s in sizes}})
    for s in sizes:
        keep = {g: [p.keep(s) for p in ps] for g, ps in plans.items()}
        row = {"kind": "size", "size": s,
               "normal_vs_map_same_seed": float(np.mean([mismatch(a, b) for a, b in zip(keep["normal"],
                                                                                            keep["map"])])),
               "normal_seed_to_seed": mismatch(keep["normal"][0], keep["normal"][1]),
               "map_seed_to_seed": mismatch(keep["map"][0], keep["map"][1])}
        records.append(row)
    return records


def figure(records: list[dict], path: Path) -> None:
    """Left: perplexity against size, one line per run (Normal solid, MAP dashed, a
    colour per seed). Right: the three disagreements against size."""
    runs = [r for r in records if r["kind"] == "run"]
    rows = sorted((r for r in records if r["kind"] == "size"), key=lambda r: r["size"])
    sizes = [r["size"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained")
    seen: dict[str, int] = {}
    for r in runs:
        seed = seen[r["guide"]] = seen.get(r["guide"], -1) + 1
        left.plot(sizes, [r[f"ppl_{s}"] for s in sizes], "-" if r["guide"] == "normal" else "--", marker="o",
                  color=f"C{seed}", label=f"{r['guide']}, seed {seed}")
    left.set(xlabel="size (share of prunable parameters)", ylabel="perplexity",
             title="Cut perplexity by guide and seed")
    left.legend(fontsize=8)
    for key, label, colour in (("normal_vs_map_same_seed", "Normal vs MAP, same seed", "C2"),
                               ("normal_seed_to_seed", "Normal, seed 0 vs 1", "C3"),
                               ("map_seed_to_seed", "MAP, seed 0 vs 1", "C4")):
        right.plot(sizes, [r[key] for r in rows], marker="o", color=colour, label=label)
    right.set(xlabel="size (share of prunable parameters)", ylabel="share of kept parameters in one cut only",
              title="Keep-set disagreement", ylim=(0, None))
    right.legend(fontsize=8)
    plots.save_figure(fig, path)
    plt.close(fig)


def main(normal: list[str], point: list[str], out_dir: str = "results/posterior") -> list[dict]:
    records = compare([Path(r) for r in normal], [Path(r) for r in point])
    columns = sorted({k for r in records for k in r}, key=lambda k: (k not in ("kind", "guide", "run", "size"), k))
    write_results("map_compare", records, columns, out_dir=out_dir,
                  config={"normal": normal, "map": point, "sizes": SIZES},
                  title="Normal guide against MAP: perplexity, undecided share and keep-set disagreement by size")
    figure(records, Path(out_dir) / "map_compare.png")
    return records


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--normal", nargs="+", required=True, help="Normal-guide run folders, one per seed")
    parser.add_argument("--map", nargs="+", required=True, help="MAP run folders, the same seeds in the same order")
    parser.add_argument("--out-dir", default="results/posterior")
    a = parser.parse_args()
    for record in main(a.normal, a.map, a.out_dir):
        print(record)
