"""The paper's own experiment, small: a LLaMA-family model trained from scratch on the
Shakespeare train split, (a) dense and (b) with push puppet gates from step 0, then cut.

    python experiments/scratch.py                    # experiments/scratch.toml
    python experiments/scratch.py --smoke            # tiny model, random tokens, seconds

Both runs use the same tokens, seed and optimiser (`[train]`: warm-up, cosine decay,
AdamW) and resume from their checkpoints in runs/scratch/{dense,gated} (a finished
run resumes at its last step, so a rerun only evaluates). Then, at each
size of `[eval]`: ppn cut from (b); SparseGPT and Wanda (unstructured) and FLAP
(structured, compensated) applied to (a); and (b)'s own full pass: quick validation
perplexity and its ratio to (a) and to (b)'s full pass, as the paper's draft reports.

Writes results/scratch/scratch.json (+ .md) and scratch.png (perplexity against the
kept fraction: the compression-quality frontier of this run).
"""

import argparse
import dataclasses
import json
import math
import tomllib
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import ppn
from ppn import data, plots
from ppn.harness.baselines.calibration import calibration_windows, layerwise
from ppn.harness.baselines.structured import prune_compensated, structured_keep
from ppn.harness.baselines.unstructured import prune_unstructured
from ppn.harness.figures import edge_markers, method_colour
from ppn.harness.finetune import finetune
from ppn.harness.report import write_results

CONFIG = Path(__file__).parent / "scratch.toml"


def main(config: dict, smoke: bool = False, run_root: str = "runs/scratch", out_dir: str = "results/scratch"):
    train_cfg, gates_cfg, ev = dict(config["train"]), config["gates"], config["eval"]
    epochs = train_cfg.pop("epochs")
    if smoke:
        from ppn.testing import tiny_config

        model_cfg, seqlen = tiny_config(), 32
        rng = np.random.default_rng(0)
        train, valid = rng.integers(0, 97, 3000), rng.integers(0, 97, 4 * seqlen)
        train_cfg |= dict(batch_size=3, seqlen=16, warmup_steps=2, checkpoint_every=4)
        gates_cfg = gates_cfg | dict(group_width=16)
    else:
        tokenizer = ppn.load_tokenizer("smollm2-135m")
        model_cfg, seqlen = ppn.LlamaConfig(vocab_size=len(tokenizer), **config["model"]), 512
        train = data.tokenize(data.shakespeare("train"), tokenizer)
        valid = data.tokenize(data.shakespeare("validation"), tokenizer)
    steps = math.ceil(epochs * len(train) / (train_cfg["batch_size"] * train_cfg["seqlen"]))
    if smoke:
        steps = 8
    dense_fit = ppn.FitConfig(steps=steps, **train_cfg)
    gated_fit = dataclasses.replace(dense_fit, **gates_cfg)

    def fresh():
        return ppn.Llama(model_cfg, rngs=nnx.Rngs(train_cfg["seed"]))

    dense = finetune(fresh(), train, dense_fit, run_dir=Path(run_root) / "dense").model
    result = ppn.fit(fresh(), train, gated_fit, run_dir=Path(run_root) / "gated")
    plan = ppn.Plan.from_fit(result)

    def ppl(model) -> float:
        return ppn.perplexity(model, valid, seqlen=seqlen, max_windows=ev["windows"]).perplexity

    windows = calibration_windows(train, ev["calibration_windows"], seqlen, seed=0)
    stats = layerwise(dense, windows, desc="calibration (FLAP)")
    reference = {"dense (a)": ppl(dense), "gated full pass (b)": ppl(result.model)}
    rows = [{"method": m, "size": 1.0, "kept_fraction": 1.0, "perplexity": p} for m, p in reference.items()]
    for size in ev["sizes"]:
        cut = ppn.prune(result.model, plan, size)
        flap = prune_compensated(dense, structured_keep(dense, "flap", size, stats=stats, units=plan.units), stats)
        for method, model in (("ppn (b)", cut), ("flap (a)", flap)):
            rows.append({"method": method, "size": size, "perplexity": ppl(model),
                         "kept_fraction": model.config.num_prunable_params() / model_cfg.num_prunable_params()})
        for method in ("sparsegpt", "wanda"):
            sparse = prune_unstructured(dense, method, 1.0 - size, windows=windows).model
            rows.append({"method": f"{method} (a)", "size": size, "kept_fraction": size, "perplexity": ppl(sparse)})
    for r in rows:
        r["ratio_to_dense_a"] = r["perplexity"] / reference["dense (a)"]
        r["ratio_to_full_b"] = r["perplexity"] / reference["gated full pass (b)"]
    name = "scratch_smoke" if smoke else "scratch"
    write_results(name, rows, list(rows[0]),
                  out_dir=out_dir, config={"toml": config, "model": model_cfg.to_hf(), "steps": steps,
                                           "dense_fit": dataclasses.asdict(dense_fit),
                                           "gated_fit": dataclasses.asdict(gated_fit)},
                  title=f"Trained from scratch ({steps} steps), cut: validation perplexity ({ev['windows']} windows)")
    frontier(rows, Path(out_dir) / f"{name}.png")
    return rows


def frontier(rows: list[dict], path) -> None:
    """Perplexity against the kept fraction per method (ppn thickest, unstructured
    dashed, method colours of the benchmark figure), the two full networks as lines; the
    axis ends at 1.6 times the dense network's perplexity, points beyond it are
    triangles on the top edge (their values in the table)."""
    reference = {r["method"]: r["perplexity"] for r in rows if r["size"] == 1.0}
    top = 1.6 * reference["dense (a)"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    above = []
    for method in dict.fromkeys(r["method"] for r in rows if r["size"] < 1):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["kept_fraction"])
        base = method.split(" (")[0]
        style = dict(color=method_colour(base), ls="--" if base in ("sparsegpt", "wanda") else "-", marker="o",
                     ms=4, lw=2.8 if base == "ppn" else 1.3, zorder=10 if base == "ppn" else 3)
        x, y = [r["kept_fraction"] for r in mine], [r["perplexity"] for r in mine]
        ax.plot(x, y, label=method, **style)
        above += [(xi, style["color"], style["zorder"]) for xi, yi in zip(x, y) if yi > top]
    for (label, value), style in zip(reference.items(), (":", "-.")):
        ax.axhline(value, color="k", ls=style, lw=1, label=label, zorder=1)
    if above:
        edge_markers(ax, above, top, f"above {top:.0f} (1.6\u00d7 dense)")
    ax.set_ylim(0.97 * min(r["perplexity"] for r in rows), top)
    ax.set(xlabel="kept fraction of prunable parameters", ylabel="validation perplexity",
           title="Compression-quality frontier, trained from scratch")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    plots.save_figure(fig, path, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--run-root", default="runs/scratch")
    parser.add_argument("--out-dir", default="results/scratch")
    parser.add_argument("--plot-only", action="store_true", help="redraw the figure from the results JSON")
    a = parser.parse_args()
    if a.plot_only:
        path = Path(a.out_dir) / ("scratch_smoke.json" if a.smoke else "scratch.json")
        frontier(json.loads(path.read_text())["records"], path.with_suffix(".png"))
        raise SystemExit(0)
    cfg = tomllib.loads(Path(a.config).read_text())
    if a.smoke:
        cfg["eval"] |= dict(windows=2, calibration_windows=2)
    for row in main(cfg, a.smoke, a.run_root, a.out_dir):
        print(row)
