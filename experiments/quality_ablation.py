"""Quality per training token: the main job with each technique of the quality
study alone and combined, at one budget, every variant from the same seed.

    python experiments/quality_ablation.py teacher                  # 150 steps (the main job's budget)
    python experiments/quality_ablation.py combined --steps 600 --seed 1
    python experiments/quality_ablation.py --list

Each variant is a set of `FitConfig` overrides on top of the main job's defaults
(`VARIANTS`; "train_text" is the job's training text instead). Writes the run folder runs/quality/<tag> and the size table
results/quality/<tag>.json (+ .md), tag = <variant>_steps<N>_seed<S>; the JSON
records the whole JobConfig. The run's plan is copied beside it (<tag>.plan.json, small and
committed, so a later session can cut, time or compare it without the run folder). No random-structure rows and no quality band (the main job
has them; experiments/uncertainty.py measures the band).
"""

import argparse
import dataclasses
import shutil
from pathlib import Path

from ppn.fit import FitConfig
from ppn.harness.job import JobConfig, run

# the pieces the variants combine: the first preset (teacher, sizes per sequence, rescaling, lr 3e-4),
# distillation alone, half the sizes at 0.5 and 0.3, the faster decaying rate, and the dense model
# fine-tuned first as teacher. `FitConfig.recommended()` is now `combined_lr1e-3_cosine_targets`.
PRESET = dict(teacher="start", teacher_weight=0.5, size_sampling="sequence", sandwich=True, rescale=True,
              lr_weights=3e-4)
KL = dict(teacher_weight=1.0)
TARGETS = dict(target_sizes=(0.5, 0.3), target_share=0.5)


def cosine(lr: float) -> dict:
    """The weights' learning rate `lr`, warmed up over 10 steps and cosine-decayed to a tenth."""
    return dict(lr_weights=lr, lr_decay="cosine", warmup_steps=10)


LR6E4_COSINE = cosine(6e-4)
FT_TEACHER = dict(teacher="runs/teachers/dense_ft150", teacher_weight=1.0)

VARIANTS = {
    "default": {},
    # a frozen copy of the starting weights as teacher, half NLL, half KL
    "teacher": dict(teacher="start", teacher_weight=0.5),
    # distillation alone: the teacher's distribution instead of the tokens
    "teacher_kl": dict(teacher="start", teacher_weight=1.0),
    # a size per sequence, with the full network and the smallest size in every batch
    "sizes": dict(size_sampling="sequence", sandwich=True),
    "rescale": dict(rescale=True),
    "combined": dict(teacher="start", teacher_weight=0.5, size_sampling="sequence", sandwich=True, rescale=True),
    # the weights' learning rate that favoured the small sizes (results/ablations/ablation_lr3e-4)
    # with the techniques that protect the large ones: a teacher and the full network in every batch
    "teacher_sizes_lr3e-4": dict(teacher="start", teacher_weight=0.5, size_sampling="sequence", sandwich=True,
                                 lr_weights=3e-4),
    "combined_lr3e-4": PRESET,
    # the same with distillation alone (forward KL to the frozen start, no token term), as
    # the distillation-based recoveries of pruned models train
    "combined_lr3e-4_kl": PRESET | KL,
    # the preset with half the sampled sizes at the headline's 0.5 and 0.3
    "combined_lr3e-4_targets": PRESET | TARGETS,
    # both leaders at once: distillation alone (general English) with half the sizes at 0.5 and 0.3 (in domain)
    "combined_lr3e-4_kl_targets": PRESET | KL | TARGETS,
    # the targets screen with twice the weights' learning rate, warmed up over 10 steps and
    # cosine-decayed to a tenth (the rate's trend, 1e-4 -> 2e-4 -> 3e-4, had not levelled off)
    "combined_lr6e-4_cosine_targets": PRESET | TARGETS | LR6E4_COSINE,
    # the rate's trend again (3e-4 -> 6e-4 with cosine decay gained 13.6% at 0.5): does 1e-3 gain more?
    "combined_lr1e-3_cosine_targets": PRESET | TARGETS | cosine(1e-3),
    # the general-purpose screen (kl_targets) at the recommended fit's rate
    "combined_lr1e-3_cosine_kl_targets": PRESET | KL | TARGETS | cosine(1e-3),
    # the same on Shakespeare mixed with general English (a quarter of the windows, ppn.data.general_training;
    # a JobConfig field): the general-purpose candidate
    "combined_lr1e-3_cosine_kl_targets_general25": PRESET | KL | TARGETS | cosine(1e-3)
    | dict(train_text=("shakespeare=3", "general=1")),
    # half the windows general English: how far does more general text move the trade?
    "combined_lr1e-3_cosine_kl_targets_general50": PRESET | KL | TARGETS | cosine(1e-3)
    | dict(train_text=("shakespeare=1", "general=1")),
    # general English mixed in without distillation: which of the two keeps general ability?
    "combined_lr1e-3_cosine_targets_general25": PRESET | TARGETS | cosine(1e-3)
    | dict(train_text=("shakespeare=3", "general=1")),
    # the bound: the whole budget on general English (no Shakespeare), so how near dense general English can a
    # structured cut get with these tokens at all?
    "combined_lr1e-3_cosine_targets_general100": PRESET | TARGETS | cosine(1e-3) | dict(train_text=("general",)),
    # kl_targets distilling from the dense model fine-tuned on the same batches' budget first (150 steps, made by
    # `python experiments/finetune_dense.py --save runs/teachers/dense_ft150`): a teacher that knows the text
    "combined_lr3e-4_ftteacher_targets": PRESET | FT_TEACHER | TARGETS,
    # the recommended fit started from each unit's output energy instead of its Taylor importance
    "combined_lr1e-3_cosine_targets_activation": PRESET | TARGETS | cosine(1e-3) | dict(init="activation"),
    # the recommended fit with the point guide (AutoDelta, MAP): does the posterior change a decision?
    "combined_lr1e-3_cosine_targets_map": PRESET | TARGETS | cosine(1e-3) | dict(guide="delta"),
    # the preset with the weights anchored at their pretrained values (keeps general ability?)
    "combined_lr3e-4_anchor5e-3": PRESET | dict(anchor_sd=5e-3),
}


def job(variant: str, steps: int = FitConfig.steps, seed: int = 0) -> JobConfig:
    """The main job's config for one variant of the study."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    tag = f"{variant}_steps{steps}_seed{seed}"
    overrides = dict(VARIANTS[variant])
    text = overrides.pop("train_text", None)
    fit = FitConfig(**overrides, steps=steps, seed=seed)
    return dataclasses.replace(JobConfig(), fit=fit, run_dir=f"runs/quality/{tag}", train_text=text,
                               results=f"results/quality/{tag}.json", random_floor=False, band_samples=0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", nargs="?", choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=FitConfig.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="print the variants and their overrides")
    a = parser.parse_args()
    if a.list or a.variant is None:
        for name, overrides in VARIANTS.items():
            print(f"{name}: {overrides}")
    else:
        cfg = job(a.variant, a.steps, a.seed)
        run(cfg)
        # the plan beside its results (small, committed): a later session can cut, time or compare it
        shutil.copyfile(Path(cfg.run_dir) / "plan.json", Path(cfg.results).with_suffix(".plan.json"))
