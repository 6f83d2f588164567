"""Decisions under uncertainty on a finished run: the quality band, the second
seed's refit against it, sub-network ensembles, and the smallest size meeting a bar.

    python experiments/uncertainty.py --run-dir runs/quality/combined_lr1e-3_cosine_targets_steps150_seed0 \
        --second runs/quality/combined_lr1e-3_cosine_targets_steps150_seed1 --bar 60

1. The band (`Plan.quality_band`: --samples keep-sets x 200 window resamples per
   size, on the first --windows validation windows) at the run's sizes.
2. With --second: that run's own cut (its plan, its weights) at each size on the
   same windows, and whether it falls inside the first run's 90% band.
3. Ensembles of 1, 4 and 8 sub-networks at 0.5 against the median network and the
   dense fitted model (`ppn.decisions.ensemble_metrics`).
4. With --bar: `Plan.smallest_size(bar, 0.95)` on validation (4 keep-sets, 8 windows),
   then the median network at that size on the reserved split (quick: 64 windows); with
   --general both on general English (`ppn.data.general_english`) instead of Shakespeare.
5. Calibration of the keep decisions at 0.5: --ablations single units removed from
   the median network (`ppn.decisions.ablation_damage`, 4 windows), the Spearman
   correlation of their keep margin with the damage, and P(keep) against "removing
   it costs more than the median unit" in bins (a reliability table and figure).
6. With --second: how far that run's keep-sets lie from the first's, against the
   first posterior's own spread (`ppn.decisions.keep_disagreement`, plans only).

--parts runs some of these (band, ensembles, smallest_size, keep_calibration,
disagreement; default all). Writes <out-dir>/<run>_band.json (+ .md, .png),
<run>_ensembles.json, <run>_smallest_size[_general].json, <run>_keep_calibration.json (+ .png)
and <run>_seed_disagreement.json, each with its config and command.
"""

import argparse
import dataclasses
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ppn import data, plots
from ppn.checkpoint import load_model
from ppn.decisions import ablation_damage, ensemble_metrics, keep_disagreement
from ppn.evaluate import perplexity
from ppn.harness.job import load_inputs, load_job
from ppn.harness.report import write_results
from ppn.plan import Plan
from ppn.prune import prune

PARTS = ("band", "ensembles", "smallest_size", "keep_calibration", "disagreement")


def _run(run_dir: str):
    job = load_job(run_dir)
    dense, tokenizer, _, valid = load_inputs(job.model, job.dtype, job.smoke, job.random_weights,
                                             valid_text=job.valid_text)
    fitted = load_model(Path(run_dir) / "model", dtype=job.dtype)
    return job, tokenizer, valid, fitted, Plan.load(Path(run_dir) / "plan.json")


def main(run_dir: str, second: str | None = None, bar: float | None = None, samples: int = 8, windows: int = 16,
         ablations: int = 200, out_dir: str = "results/decisions", parts=PARTS, general: bool = False) -> dict:
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    name = Path(run_dir).name
    config = {"run_dir": run_dir, "second": second, "bar": bar, "samples": samples, "windows": windows,
              "ablations": ablations, "parts": list(parts), "general": general,
              "job": dataclasses.asdict(load_job(run_dir))}
    out = {}
    if "disagreement" in parts and second:
        out["disagreement"] = keep_disagreement(Plan.load(Path(run_dir) / "plan.json"),
                                                Plan.load(Path(second) / "plan.json"), load_job(run_dir).sizes)
        write_results(f"{name}_seed_disagreement", out["disagreement"], list(out["disagreement"][0]),
                      out_dir=out_dir, config=config,
                      title=f"Keep-sets of {second} against the posterior of {run_dir} (share of heads and MLP "
                            "groups kept by one of the two)")
    if not set(parts) - {"disagreement"}:
        return out
    job, tokenizer, valid, fitted, plan = _run(run_dir)
    seqlen = 64 if job.smoke else 512
    if "band" in parts:
        out["band"] = band_part(plan, fitted, valid, job, second, samples, windows, seqlen, name, config, out_dir,
                                run_dir)
    if "ensembles" in parts:
        out["ensembles"] = ensemble_metrics(plan, fitted, valid, 0.5, seqlen=seqlen, max_windows=windows)
        write_results(f"{name}_ensembles", out["ensembles"], list(out["ensembles"][0]), out_dir=out_dir,
                      config=config, title=f"Sub-network ensembles at 0.5 of {run_dir} ({windows} validation windows)")
    if bar is not None and "smallest_size" in parts:
        if general and tokenizer is None:
            raise ValueError("--general measures general English, which needs the run's real tokenizer (not --smoke)")
        source = "general" if general else None  # general English, or the run's own validation text
        search = data.tokenize(data.evaluation_text(source), tokenizer) if general else valid
        choice = plan.smallest_size(bar, 0.95, model=fitted, tokens=search, num_samples=4, max_windows=8,
                                    seqlen=seqlen)
        reserved = (np.random.default_rng(2).integers(0, fitted.config.vocab_size, 4096) if tokenizer is None
                    else data.tokenize(data.evaluation_text(source, "reserved"), tokenizer))
        measured = perplexity(prune(fitted, plan, choice.size), reserved, seqlen=seqlen, max_windows=64).perplexity
        out["smallest_size"] = [{"bar": bar, "prob": 0.95, "size": choice.size, "probability": choice.probability,
                                 "sizes_searched": len(choice.band.sizes), "reserved_perplexity": measured,
                                 "meets_bar_on_reserved": bool(measured <= bar)}]
        text = "general-English" if general else "validation"
        write_results(f"{name}_smallest_size" + "_general" * general, out["smallest_size"],
                      list(out["smallest_size"][0]), out_dir=out_dir, config=config,
                      title=f"The smallest size of {run_dir} with {text} perplexity <= {bar} at 95%")
    if ablations and "keep_calibration" in parts:
        out["keep_calibration"] = keep_calibration(plan, fitted, valid, ablations, seqlen, Path(out_dir) / name,
                                                   config, run_dir)
    return out


def band_part(plan, fitted, valid, job, second, samples, windows, seqlen, name, config, out_dir, run_dir):
    """Steps 1-2: the band at the run's sizes, and the second seed's own cuts against it."""
    band = plan.quality_band(fitted, valid, job.sizes, samples, seqlen=seqlen, max_windows=windows)
    q = band.quantiles()
    rows = [{"size": float(s), "q05": q[i, 0], "q50": q[i, 1], "q95": q[i, 2],
             "median_network": band.median_network[i]} for i, s in enumerate(band.sizes)]
    if second:
        _, _, _, fitted2, plan2 = _run(second)
        for row in rows:
            row["second_seed"] = perplexity(prune(fitted2, plan2, row["size"]), valid, seqlen=seqlen,
                                            max_windows=windows).perplexity
            row["second_inside_90"] = bool(row["q05"] <= row["second_seed"] <= row["q95"])
    write_results(f"{name}_band", rows, list(rows[0]), out_dir=out_dir, config=config,
                  title=f"Quality band of {run_dir}: {samples} keep-sets x 200 resamples of {windows} windows")
    plt.close(plots.quality_band(band, path=Path(out_dir) / f"{name}_band.png"))
    return rows


def keep_calibration(plan, fitted, valid, ablations, seqlen, stem: Path, config, run_dir) -> list[dict]:
    """Step 5: ablations at 0.5, their Spearman correlation with the keep margin, a reliability table."""
    from scipy.stats import spearmanr

    units = ablation_damage(plan, fitted, valid, 0.5, ablations, seqlen=seqlen, max_windows=4)
    damage = np.array([u["damage_nll"] for u in units])
    frequency = np.array([u["keep_frequency"] for u in units])
    costly = damage > np.median(damage)
    rho = float(spearmanr([u["margin"] for u in units], damage).statistic)
    edges = (0.0, 0.5, 0.8, 0.95, 1.0 + 1e-9)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (frequency >= lo) & (frequency < hi)
        rows.append({"p_keep_from": lo, "p_keep_to": min(hi, 1.0), "units": int(inside.sum()),
                     "mean_p_keep": float(frequency[inside].mean()) if inside.any() else None,
                     "share_costlier_than_median": float(costly[inside].mean()) if inside.any() else None,
                     "spearman_margin_damage": rho, "ablated": len(units)})
    write_results(stem.name + "_keep_calibration", rows, list(rows[0]), out_dir=stem.parent, config=config,
                  title=f"Keep decisions of {run_dir} at 0.5 against single-unit ablations "
                        f"(Spearman of margin and damage: {rho:.3f})")
    fig, ax = plt.subplots(figsize=(4.5, 4), layout="constrained")
    ax.scatter([u["margin"] for u in units], damage, s=8)
    ax.set(xlabel="keep margin (posterior-median score minus the cut's)", ylabel="NLL increase when removed",
           title=f"Spearman {rho:.2f} over {len(units)} units")
    plots.save_figure(fig, stem.parent / f"{stem.name}_keep_calibration.png")
    plt.close(fig)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="a finished `ppn fit` run folder")
    parser.add_argument("--second", help="the same fit with another seed, to compare with the band")
    parser.add_argument("--bar", type=float, help="a perplexity bar for the smallest-size search")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--ablations", type=int, default=200, help="units removed one at a time at 0.5 (0: none)")
    parser.add_argument("--general", action="store_true",
                        help="--bar on general English (validation half to search, reserved half to check) "
                             "instead of Shakespeare")
    parser.add_argument("--out-dir", default="results/decisions")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {','.join(PARTS)}")
    a = parser.parse_args()
    print(main(a.run_dir, a.second, a.bar, a.samples, a.windows, a.ablations, a.out_dir, a.parts.split(","),
               a.general))
