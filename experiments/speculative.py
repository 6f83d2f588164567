"""Speculative decoding with pruned drafts: decode tokens/s against the target alone.

The target is the fitted model of a run (the checkpoint its plan names); each
draft is the target pruned by the plan (ρ = 0.3, 0.5 with 4 draft tokens per
round, and the size and k `choose_draft` picks on separate calibration prompts,
with the full vocabulary and with a shortlist of the train split's most frequent
tokens, `ShortlistDraft`).
Prompts are windows of the validation text; greedy decoding, batch 1, KV cache
(experiments/BENCHMARK.md, "Speed, memory and cost"). The decoders take turns on each
prompt, so the machine's slow spells fall on all of them alike.

    python experiments/speculative.py --run-dir runs/smollm2-135m   # after `ppn fit`
    python experiments/speculative.py --smoke                        # tiny model, seconds

Writes results/speed/speculative.json and .md (one row per decoder), speculative.png
(speed-up and acceptance by draft), and speculative_choice.json and .md (the
estimate of every candidate (size, k)).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time
from pathlib import Path

import numpy as np

import ppn
from ppn import data
from ppn.drafts import choose_draft, draft_from_plan, frequent_tokens
from ppn.harness.report import write_results
from ppn.speculative import speculative_generate


@dataclasses.dataclass(frozen=True)
class Config:
    run_dir: str = "runs/smollm2-135m"
    sizes: tuple[float, ...] = (0.3, 0.5)
    num_draft_tokens: int = 4
    ks: tuple[int, ...] = (1, 2, 3, 4, 6, 8)  # candidates of the automatic choice
    prompt_len: int = 128
    new_tokens: int = 128
    num_prompts: int = 4
    calibration_prompts: int = 4  # for the automatic choice, disjoint from the timed prompts
    shortlist: int = 8192  # the shortlist drafts score the train split's most frequent tokens
    seed: int = 0
    out_dir: str = "results/speed"
    smoke: bool = False


SMOKE = dict(prompt_len=16, new_tokens=16, num_prompts=2, calibration_prompts=1, ks=(4,), shortlist=48)  # a tiny model's run


def _setup(cfg: Config):
    """(target, plan, train tokens, validation tokens) of the run, or of a tiny random model in smoke mode."""
    if cfg.smoke:
        from ppn.testing import random_plan, tiny_model

        target = tiny_model()
        rng = np.random.default_rng(cfg.seed)
        return target, random_plan(target.config), rng.integers(0, 97, 4000), rng.integers(0, 97, 4000)
    plan = ppn.Plan.load(Path(cfg.run_dir) / "plan.json")
    checkpoint = plan.meta.get("checkpoint", str(Path(cfg.run_dir) / "model"))
    target = ppn.load_model(checkpoint)
    tokenizer = ppn.load_tokenizer(checkpoint)
    return (target, plan, data.tokenize(data.shakespeare("train"), tokenizer),
            data.tokenize(data.shakespeare("validation"), tokenizer))


def _timed(decoders: dict, prompts) -> dict[str, tuple[list, float]]:
    """{name: (outputs of decode(prompt) for each prompt (1, T), their total seconds)}.

    One untimed compile run of each decoder first; then, prompt by prompt, every
    decoder in turn, so a slow spell of the machine falls on all of them alike.
    """
    for decode in decoders.values():
        decode(prompts[0])
    timed = {name: ([], 0.0) for name in decoders}
    for p in prompts:
        for name, decode in decoders.items():
            start = time.perf_counter()
            out = decode(p)
            outputs, seconds = timed[name]
            timed[name] = (outputs + [out], seconds + time.perf_counter() - start)
    return timed


def plot(records: list[dict], path) -> None:
    """Two panels: speed-up over the target alone, and acceptance rate, one bar per decoder."""
    import matplotlib

    matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
    import matplotlib.pyplot as plt

    labels = [r["method"] for r in records]
    x = np.arange(len(records))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(x, [r["speedup"] for r in records], color="tab:blue", label="measured")
    expected = [(i, r["expected_speedup"]) for i, r in enumerate(records) if r.get("expected_speedup") is not None]
    if expected:
        left.scatter(*zip(*expected), color="tab:orange", zorder=3, label="expected (choose_draft)")
    left.axhline(1.0, color="grey", lw=0.8)
    left.set_ylabel("decode tokens/s relative to the target alone")
    left.legend(fontsize=8, framealpha=0.9)
    right.bar(x, [r["acceptance_rate"] if r["acceptance_rate"] is not None else 0.0 for r in records],
              color="tab:green")
    right.set_ylim(0, 1)
    right.set_ylabel("acceptance rate of draft tokens")
    for ax in (left, right):
        ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(cfg: Config) -> list[dict]:
    target, plan, train, tokens = _setup(cfg)
    windows = data.eval_windows(tokens, cfg.prompt_len)
    picks = np.random.default_rng(cfg.seed).choice(len(windows), cfg.num_prompts + cfg.calibration_prompts,
                                                   replace=False)
    prompts = [windows[i][None] for i in picks[:cfg.num_prompts]]
    shortlist = frequent_tokens(train, cfg.shortlist)
    choices = {vocab: choose_draft(target, plan, windows[picks[cfg.num_prompts:]], cfg.sizes,
                                   tuple(sorted(set(cfg.ks) | {cfg.num_draft_tokens})), new_tokens=cfg.new_tokens,
                                   shortlist=ids)
               for vocab, ids in (("all", None), (len(shortlist), shortlist))}
    expected = {(vocab, r["size"], r["k"]): r["expected_speedup"] for vocab, c in choices.items() for r in c.table}

    full = target.config.num_prunable_params()
    runs = [(f"ρ={s}, k={cfg.num_draft_tokens}", "all", s, cfg.num_draft_tokens) for s in cfg.sizes]
    runs += [(f"auto: ρ={c.size}, k={c.k}" + ("" if vocab == "all" else f", {vocab}-token shortlist"), vocab, c.size,
              c.k) for vocab, c in choices.items()]
    drafts = {(vocab, size): draft_from_plan(target, plan, size, None if vocab == "all" else shortlist)
              for _, vocab, size, _ in runs}
    decoders = {"target alone": lambda p: ppn.generate(target, p, cfg.new_tokens)}
    for method, vocab, size, k in runs:
        decoders[method] = functools.partial(
            lambda p, draft, k: speculative_generate(target, draft, p, cfg.new_tokens, k), draft=drafts[vocab, size],
            k=k)
    timed = _timed(decoders, prompts)

    reference, seconds = timed["target alone"]
    new = cfg.new_tokens * len(prompts)
    base_tps = new / seconds
    records = [{"method": "target alone", "draft_size": None, "k": None, "kept_fraction": 1.0,
                "acceptance_rate": None, "tokens_per_round": 1.0, "tokens_per_second": base_tps, "speedup": 1.0,
                "expected_speedup": None, "matches_target": 1.0, "seconds": seconds}]
    for method, vocab, size, k in runs:
        results, seconds = timed[method]
        accepted, proposed = sum(r.accepted for r in results), sum(r.proposed for r in results)
        rounds = sum(r.target_calls - 1 for r in results)
        records.append({
            "method": method, "draft_size": size, "k": k, "draft_vocabulary": vocab,
            "kept_fraction": drafts[vocab, size].config.num_prunable_params() / full,
            "acceptance_rate": accepted / proposed, "tokens_per_round": (new - len(prompts)) / rounds,
            "tokens_per_second": new / seconds, "speedup": new / seconds / base_tps,
            "expected_speedup": expected[(vocab, size, k)],
            "matches_target": float(np.mean([np.array_equal(r.tokens, ref) for r, ref in zip(results, reference)])),
            "seconds": seconds})

    name = "speculative_smoke" if cfg.smoke else "speculative"
    title = (f"Speculative decoding with pruned drafts: greedy, batch 1, {cfg.prompt_len}-token prompts, "
             f"{cfg.new_tokens} new tokens, {len(prompts)} prompts")
    write_results(name, records, ["method", "kept_fraction", "draft_vocabulary", "acceptance_rate", "tokens_per_round",
                                  "tokens_per_second", "speedup", "expected_speedup", "matches_target"],
                  out_dir=cfg.out_dir, title=title)
    write_results(f"{name}_choice", [{"draft_vocabulary": vocab} | r for vocab, c in choices.items() for r in c.table],
                  ["draft_vocabulary", "size", "k", "alpha", "cost_ratio", "verify_ratio",
                   "expected_tokens_per_round", "expected_speedup"], out_dir=cfg.out_dir,
                  title=f"choose_draft estimates ({cfg.calibration_prompts} calibration prompts); chosen: "
                        + "; ".join(f"{vocab} tokens: ρ={c.size}, k={c.k}" for vocab, c in choices.items()))
    plot(records, Path(cfg.out_dir) / f"{name}.png")
    return records


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/smollm2-135m")
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out-dir", default="results/speed")
    a = parser.parse_args()
    sizes = SMOKE if a.smoke else {"num_prompts": a.num_prompts}
    for row in main(Config(run_dir=a.run_dir, out_dir=a.out_dir, smoke=a.smoke, **sizes)):
        print(row)
