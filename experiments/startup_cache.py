"""Start-up of the `ppn` command with and without JAX's persistent compilation cache.

Each command runs `runs` times in a row as a fresh process, once with the cache
off (`PPN_NO_COMPILATION_CACHE=1`) and once with it on, each mode in its own
empty `PPN_CACHE` folder: with the cache on, the first run compiles and fills
it and the later runs load from it; with it off every run compiles. Other
caches of ppn (tokenised text) fill on the first run in both modes alike, so
the second runs differ by the compilation cache alone. Wall time and the
process's CPU time (user + system, less sensitive to other load on the
machine) are recorded with the 1-minute load average before each run.

The commands:
    fit    ppn fit --smoke --run-dir <tmp>/run             (its tiny random model)
    eval   ppn eval --model <ckpt> --text <file> --quick   (a SmolLM2-shaped random
           checkpoint: 30 blocks, 9 query and 3 KV heads, narrow widths, a BPE
           tokenizer trained on Shakespeare; compiles as many blocks as the real
           model, computes little)

    python experiments/startup_cache.py                  # results/speed/startup_cache.{json,md}
    python experiments/startup_cache.py --runs 3 --commands fit
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flax import nnx

import ppn
from ppn import data
from ppn.harness.report import write_results

COLUMNS = ["command", "cache", "run", "wall_s", "cpu_s", "load_avg", "cache_files"]
COMMANDS = ("fit", "eval")


@dataclasses.dataclass(frozen=True)
class Config:
    runs: int = 2
    commands: tuple[str, ...] = COMMANDS
    out_dir: str = "results/speed"
    timeout_s: int = 1800


def eval_checkpoint(folder: Path) -> tuple[Path, Path]:
    """A SmolLM2-shaped random checkpoint with a trained BPE tokenizer, and a text file for it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = data.shakespeare("validation")[:200_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(text.splitlines(), trainers.BpeTrainer(
        vocab_size=2048, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    config = ppn.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=72, intermediate_size=192, num_layers=30,
                             num_heads=9, num_kv_heads=3, head_dim=8, max_position_embeddings=2048,
                             tie_word_embeddings=True)
    model = ppn.Llama(config, rngs=nnx.Rngs(0))
    checkpoint = ppn.save_model(model, folder / "ckpt", tokenizer=PreTrainedTokenizerFast(tokenizer_object=tok))
    text_file = folder / "text.txt"
    text_file.write_text(text[:20_000])  # a few windows of 512 tokens
    return checkpoint, text_file


def timed(argv: list[str], env: dict[str, str], timeout_s: int) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one run of `argv` as a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(cfg: Config) -> Path:
    rows = []
    # the child processes must see neither the tests' cache folder nor an opt-out from this shell
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("JAX_COMPILATION_CACHE_DIR", "PPN_NO_COMPILATION_CACHE",
                             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "JAX_COMPILATION_CACHE_MAX_SIZE")}
    with tempfile.TemporaryDirectory(prefix="ppn-startup-") as tmp:
        work = Path(tmp)
        checkpoint, text = eval_checkpoint(work) if "eval" in cfg.commands else (None, None)
        for command in cfg.commands:
            for cache in ("off", "on"):
                ppn_cache = work / f"cache-{command}-{cache}"
                env = base_env | {"PPN_CACHE": str(ppn_cache), "TQDM_DISABLE": "1"}
                if cache == "off":
                    env["PPN_NO_COMPILATION_CACHE"] = "1"
                for run in range(1, cfg.runs + 1):
                    out = work / f"out-{command}-{cache}"
                    shutil.rmtree(out, ignore_errors=True)  # a run folder left behind would resume, not start
                    argv = [sys.executable, "-m", "ppn.cli", "--quiet"]
                    argv += (["fit", "--smoke", "--run-dir", str(out)] if command == "fit" else
                             ["eval", "--model", str(checkpoint), "--text", str(text), "--quick",
                              "--out", str(out / "eval.json")])
                    load = os.getloadavg()[0]
                    wall, cpu = timed(argv, env, cfg.timeout_s)
                    jax_cache = ppn_cache / "jax"
                    files = len(list(jax_cache.glob("*-cache")))
                    rows.append(dict(command=command, cache=cache, run=run, wall_s=round(wall, 2),
                                     cpu_s=round(cpu, 2), load_avg=round(load, 2), cache_files=files))
                    print(rows[-1], flush=True)
    return write_results("startup_cache", rows, COLUMNS, out_dir=cfg.out_dir,
                         title="Start-up of ppn with and without the JAX compilation cache",
                         config=dataclasses.asdict(cfg))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=Config.runs, help="runs of each command in each mode")
    parser.add_argument("--commands", default=",".join(COMMANDS), help="comma-separated subset of fit,eval")
    parser.add_argument("--out-dir", default=Config.out_dir)
    args = parser.parse_args()
    print(main(Config(runs=args.runs, commands=tuple(c for c in args.commands.split(",") if c),
                      out_dir=args.out_dir)))
