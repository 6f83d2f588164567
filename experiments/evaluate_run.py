"""The main job's table again for a finished run, at another evaluation size:
full validation perplexity by default (the main job measures quick perplexity),
beside the perplexity on general English (`ppn.data.general_english`) at the same
number of windows, also for runs made before the main job measured it.

    python experiments/evaluate_run.py --run-dir runs/smollm2-135m            # full validation split
    python experiments/evaluate_run.py --run-dir runs/smollm2-135m --windows 64
    python experiments/evaluate_run.py --run-dir runs/smollm2-135m --windows 64 --split reserved  # final numbers

Reads the run's job.json (model, dtype, sizes), the fitted model and plan.json;
evaluates the dense model, the fitted model unpruned and the plan's cut at each
size (no random floor: the quick table has it). Writes
results/ablations/<run folder name>_<eval>[_reserved].json and .md.
"""

import argparse
from pathlib import Path

from ppn.checkpoint import load_model
from ppn.harness.job import COLUMNS, EVAL_SPLITS, eval_mode, general_tokens, load_inputs, load_job, measurer, size_rows
from ppn.plan import Plan
from ppn.harness.report import write_results


def main(run_dir: str, windows: int | None = None, out_dir: str = "results/ablations",
         split: str = "validation") -> list[dict]:
    job = load_job(run_dir)
    dense, tokenizer, _, valid = load_inputs(job.model, job.dtype, job.smoke, job.random_weights,
                                             valid_text=None if split == "reserved" else job.valid_text, split=split)
    fitted = load_model(Path(run_dir) / "model", dtype=job.dtype)
    plan = Plan.load(Path(run_dir) / "plan.json")
    seqlen = 64 if job.smoke else 512
    mode = eval_mode(windows)
    general = general_tokens(tokenizer, dense.config.vocab_size)
    rows = size_rows(dense, fitted, plan, measurer(valid, general, seqlen, windows), job.sizes, mode,
                     job.fit.train_tokens, random_floor=False)
    suffix = "" if split == "validation" else f"_{split}"
    write_results(f"{Path(run_dir).name}_{mode.replace(' ', '')}{suffix}", rows, COLUMNS[:-1], out_dir=out_dir,
                  title=f"Push puppet fit of {run_dir} on {job.model}: {split} perplexity by size ({mode})",
                  config={"run_dir": run_dir, "windows": windows, "split": split})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--windows", type=int, default=None, help="validation windows (default: all of them)")
    parser.add_argument("--out-dir", default="results/ablations")
    parser.add_argument("--split", default="validation", choices=EVAL_SPLITS,
                        help="reserved: Shakespeare's reserved split, for final numbers only (BENCHMARK.md)")
    a = parser.parse_args()
    for row in main(a.run_dir, a.windows, a.out_dir, a.split):
        print(row)
