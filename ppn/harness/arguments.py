"""The harness commands' arguments: `ppn fit` and `ppn bench` (and their
`experiments/fit.py` / `experiments/benchmark.py` twins) parsed into a `JobConfig`
or a `BenchConfig`."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

FULL_STEPS = 2000


def parse_overrides(cls, pairs: list[str]) -> dict:
    """{field: value} from "FIELD=VALUE" strings, each value parsed as its
    dataclass field's type (int, float, bool, str, None for "none", or a tuple
    of comma-separated values for `tuple[float, ...]`)."""
    types = typing.get_type_hints(cls)
    out = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or name not in types:
            raise ValueError(f"--set {pair!r}: expected FIELD=VALUE with FIELD one of "
                             f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        hint = types[name]
        options = (hint,) if typing.get_origin(hint) is tuple else typing.get_args(hint) or (hint,)
        kinds = [t for t in options if t is not type(None)]
        if raw.lower() == "none" and type(None) in options:
            out[name] = None
        elif kinds[0] is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--set {pair!r}: {name} takes true or false")
            out[name] = raw.lower() in ("true", "1")
        elif typing.get_origin(kinds[0]) is tuple:
            item = typing.get_args(kinds[0])[0]
            try:
                out[name] = tuple(item(x) for x in raw.split(",") if x.strip())
            except ValueError:
                raise ValueError(f"--set {pair!r}: {name} takes comma-separated {item.__name__}s") from None
        else:
            try:
                out[name] = kinds[0](raw)
            except ValueError:
                raise ValueError(f"--set {pair!r}: {name} takes a {kinds[0].__name__}") from None
    return out


def job_config(args):
    """The main job's config from `ppn fit` / `experiments/fit.py` arguments.

    Raises:
        ValueError: the arguments make no valid `FitConfig` (a bad `--set`, say).
    """
    from ppn.fit import FitConfig
    from ppn.harness.job import JobConfig

    fit_fields = {}
    if args.smoke:
        fit_fields = dict(steps=8, batch_size=3, seqlen=32, group_width=16, checkpoint_every=4,
                          checkpoint_min_seconds=0)
    if args.full:
        fit_fields["steps"] = FULL_STEPS
    if args.steps is not None:
        fit_fields["steps"] = args.steps
    if args.target_sizes is not None:
        fit_fields["target_sizes"] = args.target_sizes
    if args.teacher is not None:
        fit_fields["teacher"] = args.teacher
    fit_fields.update(parse_overrides(FitConfig, args.set))
    texts = args.train_text or []  # one source as a string, several as a tuple (JobConfig.train_text)
    return JobConfig(model=args.model, run_dir=args.run_dir, fit=FitConfig.recommended(**fit_fields), smoke=args.smoke,
                     results=args.results or str(Path(args.run_dir) / "results.json"),
                     eval_windows=None if args.full_eval else (2 if args.smoke else 64),
                     dtype=args.dtype, mesh=args.mesh, random_weights=args.random_weights,
                     train_text=texts[0] if len(texts) == 1 else tuple(texts) or None, valid_text=args.valid_text,
                     general_eval=not args.no_general_eval, band_samples=args.band_samples)


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


def _target_sizes(text: str) -> tuple[float, ...]:
    """argparse type: "0.5,0.3" -> (0.5, 0.3), each in (0, 1]."""
    try:
        sizes = _fractions(text)
    except argparse.ArgumentTypeError:
        sizes = ()  # the message below says what a size is
    if not sizes or not all(0 < s <= 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes in (0, 1] like 0.5,0.3, got {text!r}")
    return sizes


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="zoo name, checkpoint directory or .gguf file")
    p.add_argument("--run-dir", default="runs/smollm2-135m", help="run folder (an unfinished run resumes)")
    p.add_argument("--steps", type=int, help="SVI steps (default: the CPU budget of FitConfig)")
    p.add_argument("--full", action="store_true", help=f"the full budget ({FULL_STEPS} steps)")
    p.add_argument("--train-text", metavar="PATH[=WEIGHT]", action="append",
                   help="fit on this text file or folder of .txt/.md files instead of the Shakespeare train split; "
                        "repeat to mix sources by weight (\"shakespeare\" names the train split, \"general\" "
                        "general English, ppn.data.general_training), e.g. --train-text shakespeare=3 "
                        "--train-text general=1")
    p.add_argument("--valid-text", metavar="PATH",
                   help="measure perplexity on this text file or folder instead of the Shakespeare validation "
                        "split, or general (general English)")
    p.add_argument("--no-general-eval", action="store_true",
                   help="skip the out-of-domain perplexity on general English (ppn.data.general_english)")
    p.add_argument("--target-sizes", type=_target_sizes, metavar="0.5,0.3",
                   help="sizes that matter most: the fit draws them more often (FitConfig.target_sizes; "
                        "recommended: 0.5,0.3)")
    p.add_argument("--teacher", metavar="SOURCE",
                   help='distil from a frozen teacher: "start" (the starting weights) or a zoo name, checkpoint '
                        "directory or .gguf, with the student's vocabulary (FitConfig.teacher; recommended: "
                        "start, at --set teacher_weight=0.5)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any FitConfig field, e.g. --set lr_weights=1e-4 --set init=prior (repeatable)")
    p.add_argument("--full-eval", action="store_true", help="full validation perplexity instead of quick")
    p.add_argument("--band-samples", type=int, default=4, metavar="K",
                   help="keep-sets per size drawn from the posterior for the quality band beside the table "
                        "(quality_band.json/.png); 0: no band")
    p.add_argument("--results", help="results JSON, a markdown table beside it (default: RUN_DIR/results.json)")
    p.add_argument("--smoke", action="store_true", help="tiny random model: checks the pipeline in seconds")
    p.add_argument("--random-weights", action="store_true",
                   help="the model's architecture with random weights (its folder needs only config.json and "
                        "the tokenizer): for throughput where the weights cannot travel; perplexities are meaningless")
    add_scale_arguments(p)
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first: one process per host (TPU) or per GPU "
                        "(Slurm); also env PPN_DISTRIBUTED=1")


def bench_config(args):
    """The benchmark's config from `ppn bench` / `experiments/benchmark.py` arguments.

    Raises:
        ValueError: the arguments make no valid `BenchConfig` (an unknown method, say).
    """
    from ppn.harness.benchmark import BenchConfig

    fields = {k: v for k, v in dict(model=args.model, plan=args.plan, state_dir=args.state_dir,
                                    out=args.out, mesh=args.mesh,
                                    finetune_steps=args.finetune_steps).items() if v is not None}
    fields["dtype"] = args.dtype
    fields["split"] = args.split
    if args.methods:
        fields["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.no_speed:
        fields["speed"] = False
    if args.no_general_eval:
        fields["general_eval"] = False
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
    p.add_argument("--no-general-eval", action="store_true",
                   help="skip the out-of-domain perplexity on general English (ppn.data.general_english)")
    p.add_argument("--sizes", type=_fractions,
                   help="sizes of the ppn and structured rows, e.g. 0.9,0.7,0.5,0.4,0.3 (default: the preset's)")
    p.add_argument("--unstructured-sizes", type=_fractions,
                   help="sizes of the one-shot unstructured rows (default: the preset's)")
    p.add_argument("--nm", type=_patterns, help="N:M patterns, e.g. 2:4,4:8; empty for none (default: the preset's)")
    p.add_argument("--state-dir", help="folder of finished rows, for resuming")
    # ppn.harness.job.EVAL_SPLITS, written out: the parser stays free of jax imports
    p.add_argument("--split", default="validation", choices=("validation", "reserved"),
                   help="where perplexity is measured; reserved: final numbers only, never for choosing")
    p.add_argument("--finetune-steps", type=int, metavar="N",
                   help="fine-tuned rows with the budget of `ppn fit --steps N` (default: the plan's budget; "
                        "no plan needed with this flag)")
    p.add_argument("--out", help="results JSON (default results/benchmark.json, or benchmark_quick.json)")
    p.add_argument("--smoke", action="store_true", help="tiny random model: checks the benchmark in seconds")
    add_scale_arguments(p)
