"""The fairness row: the dense model fine-tuned on exactly the tokens, steps and
optimiser of the push puppet fit (FitConfig's budget), then its quick validation
perplexity, beside the untouched dense model.

    python experiments/finetune_dense.py            # SmolLM2-135M, FitConfig() budget
    python experiments/finetune_dense.py --smoke    # tiny model, seconds
    python experiments/finetune_dense.py --save runs/teachers/dense_ft150   # keep the tuned model (a teacher)

Writes results/dense/finetune_dense.json and .md (finetune_dense_steps<N> with --steps N
other than the default).
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

import ppn
from ppn import data
from ppn.harness.finetune import finetune
from ppn.harness.report import write_results


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "smollm2-135m"
    fit: ppn.FitConfig = ppn.FitConfig()
    eval_windows: int = 64
    out_dir: str = "results/dense"
    name: str = "finetune_dense"
    smoke: bool = False
    save: str | None = None  # an HF checkpoint directory for the tuned model (a fit's `teacher`)


def main(cfg: Config) -> list[dict]:
    if cfg.smoke:
        from ppn.testing import tiny_model

        model, seqlen, tokenizer = tiny_model(), 64, None
        rng = np.random.default_rng(0)
        train, valid = rng.integers(0, 97, 10_000), rng.integers(0, 97, 4 * seqlen)
    else:
        model, seqlen, tokenizer = ppn.load_model(cfg.model), 512, ppn.load_tokenizer(cfg.model)
        train = data.tokenize(data.shakespeare("train"), tokenizer)
        valid = data.tokenize(data.shakespeare("validation"), tokenizer)
    before = ppn.perplexity(model, valid, seqlen=seqlen, max_windows=cfg.eval_windows).perplexity
    tuned = finetune(model, train, cfg.fit)
    after = ppn.perplexity(tuned.model, valid, seqlen=seqlen, max_windows=cfg.eval_windows).perplexity
    if cfg.save:
        ppn.save_model(tuned.model, cfg.save, tokenizer=tokenizer, overwrite=True)
    n = model.config.num_params()
    rows = [{"method": "dense", "kept_total": n, "perplexity": before, "train_tokens": 0, "seconds": 0.0},
            {"method": "dense fine-tuned (ppn fit budget)", "kept_total": n, "perplexity": after,
             "train_tokens": cfg.fit.train_tokens, "seconds": tuned.seconds, "steps": cfg.fit.steps}]
    write_results(f"{cfg.name}_smoke" if cfg.smoke else cfg.name, rows,
                  ["method", "kept_total", "perplexity", "train_tokens", "steps", "seconds"], out_dir=cfg.out_dir,
                  title=f"Dense model fine-tuned with the fit's budget (validation, {cfg.eval_windows} windows)",
                  config=dataclasses.asdict(cfg))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--steps", type=int, help="override FitConfig's steps")
    parser.add_argument("--out-dir", default="results/dense")
    parser.add_argument("--save", help="write the tuned model here (HF format), for use as a fit's teacher")
    a = parser.parse_args()
    fit = ppn.FitConfig(steps=4, batch_size=2, seqlen=32, group_width=16) if a.smoke else ppn.FitConfig()
    name = "finetune_dense"
    if a.steps:
        fit, name = dataclasses.replace(fit, steps=a.steps), f"finetune_dense_steps{a.steps}"
    for row in main(Config(fit=fit, eval_windows=2 if a.smoke else 64, out_dir=a.out_dir, name=name,
                           smoke=a.smoke, save=a.save)):
        print(row)
