"""The fairness rows of a budget, without a fit: the dense model fine-tuned with the
fit's tokens; one-shot SparseGPT at 0.5, and SparseGPT at 0.5 with its mask held
fixed while the kept weights fine-tune on the same batches; FLAP at 0.7 / 0.5 / 0.3,
and FLAP at 0.5 fine-tuned (experiments/BENCHMARK.md, "fair rows"). Fine-tunes use
`FitConfig(steps=N)`'s optimiser (lr 1e-4, constant), or with `--optimizer recommended` the
recommended fit's own (lr 1e-3, warm-up, cosine decay). ppn's own rows at that budget come
from its fit (quality study).

    python experiments/fair_rows.py --steps 150        # the main job's budget
    python experiments/fair_rows.py --steps 600 --methods dense,sparsegpt,finetuned   # no FLAP rows
    python experiments/fair_rows.py --steps 600 --methods sparsegpt,finetuned   # SparseGPT's rows only
    python experiments/fair_rows.py --steps 150 --optimizer recommended   # fair_rows_steps150_recommended.json
    python experiments/fair_rows.py --smoke            # tiny model, seconds

Rows resume from runs/fair/steps<N>; writes results/benchmark/fair_rows_steps<N>.json
(+ .md, .png), quick perplexity on Shakespeare and general English.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile

from ppn.fit import FitConfig
from ppn.harness.benchmark import BenchConfig, run


METHODS = ("dense", "sparsegpt", "flap", "finetuned")


def config(steps: int, smoke: bool = False, methods: tuple[str, ...] = METHODS,
           optimizer: str = "default") -> BenchConfig:
    """"finetuned" fine-tunes SparseGPT's and FLAP's cuts at 0.5 where they run, and the dense model with "dense"."""
    fields = dict(methods=methods, unstructured_sizes=(0.5,), nm=(), speed=False, finetune_steps=steps,
                  finetune_optimizer=optimizer)
    if smoke:
        root = tempfile.mkdtemp(prefix="ppn-fair-")
        return BenchConfig.smoke_test(root, **fields)
    name = f"steps{steps}" + ("" if optimizer == "default" else f"_{optimizer}")
    return BenchConfig.quick(**fields, state_dir=f"runs/fair/{name}", out=f"results/benchmark/fair_rows_{name}.json")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=FitConfig.steps)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the default")
    parser.add_argument("--optimizer", choices=("default", "recommended"), default="default",
                        help="the fine-tunes' optimiser: FitConfig()'s, or the recommended fit's")
    parser.add_argument("--out", help="results JSON (default results/benchmark/fair_rows_steps<N>.json)")
    a = parser.parse_args()
    methods = tuple(m for m in a.methods.split(",") if m)
    if not set(methods) <= set(METHODS):
        parser.error(f"--methods: choose from {','.join(METHODS)}, got {a.methods}")
    cfg = config(2 if a.smoke else a.steps, a.smoke, methods, a.optimizer)
    if a.out:
        cfg = dataclasses.replace(cfg, out=a.out)
    for row in run(cfg):
        print({k: row.get(k) for k in ("method", "size", "perplexity", "general_perplexity", "tokens_used")})
