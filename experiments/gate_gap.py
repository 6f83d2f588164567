"""Hard-pruned versus soft-gated: does the cut model behave like the gated network
it was trained as? For each size, the validation perplexity of the model pruned
from the plan and of the dense fitted model run with the plan's deterministic
(soft) gates at that size, by both estimators of `Plan.soft_gates`: Louizos et
al.'s test-time gate ("gap") and the gate's median at the fit's final
temperature ("median_gap").

    python experiments/gate_gap.py --run-dir runs/smollm2-135m   # after `ppn fit`
    python experiments/gate_gap.py --smoke                        # tiny model, seconds

Writes results/budget/gate_gap.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

import ppn
from ppn import data
from ppn.harness.report import write_results


@dataclasses.dataclass(frozen=True)
class Config:
    run_dir: str = "runs/smollm2-135m"
    sizes: tuple[float, ...] = (0.9, 0.7, 0.5, 0.4, 0.3)
    eval_windows: int = 64
    temperature: float | None = None  # None: the fit's final temperature (temperature_end)
    out_dir: str = "results/budget"
    name: str = "gate_gap"  # of the results files
    smoke: bool = False


def main(cfg: Config) -> list[dict]:
    if cfg.smoke:
        from ppn.testing import tiny_model

        model = tiny_model()
        tokens = np.random.default_rng(0).integers(0, 97, 8000)
        result = ppn.fit(model, tokens, ppn.FitConfig(steps=4, batch_size=2, seqlen=32, group_width=16),
                         progress=False)
        plan, model, valid, seqlen = ppn.Plan.from_fit(result), result.model, tokens[:4 * 64], 64
    else:
        plan = ppn.Plan.load(f"{cfg.run_dir}/plan.json")
        model = ppn.load_model(f"{cfg.run_dir}/model")
        valid = data.tokenize(data.shakespeare("validation"), ppn.load_tokenizer(f"{cfg.run_dir}/model"))
        seqlen = 512
    temperature = cfg.temperature or plan.meta.get("fit", {}).get("temperature_end", ppn.FitConfig.temperature_end)
    rows = []
    for size in cfg.sizes:
        pruned = ppn.prune(model, plan, size)
        hard = ppn.perplexity(pruned, valid, seqlen=seqlen, max_windows=cfg.eval_windows).perplexity
        soft, median = (ppn.perplexity(model, valid, seqlen=seqlen, max_windows=cfg.eval_windows,
                                       gates=plan.soft_gates(size, temperature, estimator)).perplexity
                        for estimator in ("louizos", "median"))
        rows.append({"size": size, "kept_prunable": pruned.config.num_prunable_params(),
                     "kept_fraction": pruned.config.num_prunable_params() / model.config.num_prunable_params(),
                     "hard_pruned_perplexity": hard, "soft_gated_perplexity": soft, "gap": hard / soft - 1,
                     "median_gated_perplexity": median, "median_gap": hard / median - 1,
                     "temperature": temperature, "eval_windows": cfg.eval_windows})
    write_results(f"{cfg.name}_smoke" if cfg.smoke else cfg.name, rows,
                  ["size", "kept_prunable", "kept_fraction", "hard_pruned_perplexity", "soft_gated_perplexity", "gap",
                   "median_gated_perplexity", "median_gap"],
                  out_dir=cfg.out_dir, title="Hard-pruned vs soft-gated perplexity (validation)")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/smollm2-135m")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out-dir", default="results/budget")
    parser.add_argument("--name", default="gate_gap", help="results file name (without .json)")
    a = parser.parse_args()
    smoke = dict(eval_windows=4) if a.smoke else {}
    for row in main(Config(run_dir=a.run_dir, out_dir=a.out_dir, name=a.name, smoke=a.smoke, **smoke)):
        print(row)
