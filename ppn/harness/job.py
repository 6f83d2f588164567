"""The main job: fit a push puppet on Shakespeare, then cut the model to every size.

    ppn fit                                  # SmolLM2-135M, default CPU budget
    ppn fit --mesh data=2,fsdp=4             # on 8 devices (see ppn.sharding)
    python experiments/fit.py --smoke        # tiny model, seconds

Writes into the run folder: config.json, metrics.jsonl, checkpoints/, model/
(the fitted dense weights, HF format), plan.json, posterior.nc (ArviZ), PNG
plots, table.md and the quality band (quality_band.json / .png: perplexity quantiles
per size over posterior keep-sets); and the results JSON (default <run folder>/results.json) + .md
with one row per size.
With several processes (`jax.distributed`) every process computes, and
process 0 alone writes those files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from ppn import data, plots
from ppn.harness.baselines.structured import structured_keep
from ppn.checkpoint import load_model, load_tokenizer, random_model, save_model
from ppn.evaluate import perplexity
from ppn.fit import FitConfig, fit
from ppn.models.llama import Llama
from ppn.plan import Plan
from ppn.prune import prune
from ppn.harness.report import markdown_table, write_results
from ppn.runs import atomic_write, mark_done, step_seconds
from ppn.sharding import addressable, is_main_process, make_mesh
from ppn.zoo import cache_dir

SIZES = (0.9, 0.7, 0.5, 0.4, 0.3)
COLUMNS = ["method", "size", "kept_prunable", "kept_fraction", "kept_total", "perplexity", "general_perplexity",
           "eval", "train_tokens", "resize_seconds"]


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """The main job's settings.

    Attributes:
        model: zoo name, checkpoint directory or .gguf file.
        run_dir: the run folder (resumed if unfinished, refused if finished).
        fit: the fit's knobs (default `FitConfig.recommended()`).
        sizes: target fractions of prunable parameters to cut to.
        eval_windows: validation windows per perplexity (64 = "quick", None = full).
        results: the results JSON to write (a markdown table goes beside it);
            None = results.json in the run folder.
        random_floor: also evaluate a random structure at each size (same weights).
        smoke: a tiny random model and random tokens instead of the real ones.
        dtype: weight and activation dtype of the model, "float32" or "bfloat16"
            (gates, softmax and losses stay float32).
        mesh: "data=D,fsdp=F" to fit and evaluate on that many devices
            (`ppn.sharding.make_mesh`); None: the default device.
        random_weights: start from random weights of the model's architecture
            (`ppn.checkpoint.random_model`; its directory needs config.json and the
            tokenizer only): for throughput on a machine the weights cannot reach.
            Perplexities are then meaningless.
        train_text, valid_text: a text file or a folder of .txt/.md files
            (`ppn.data.load_text`) to fit on and to measure perplexity on, instead of
            the Shakespeare train and validation splits. `train_text` may also be
            several sources "SOURCE=WEIGHT" ("shakespeare" names the train split,
            "general" the general English of `ppn.data.general_training`),
            mixed so each fills its weight's share of the windows (`ppn.data.mix_tokens`).
        general_eval: also measure every row's perplexity on general English
            (`ppn.data.general_english`, validation split): what the fit did to
            text unlike the fitting text.
        band_samples: keep-sets drawn per size for the quality band written beside
            the table (quality_band.json / .png, `ppn.decisions.quality_band`, on the
            first `band_windows` validation windows); 0: no band.
    """

    model: str = "smollm2-135m"
    run_dir: str = "runs/smollm2-135m"
    fit: FitConfig = dataclasses.field(default_factory=FitConfig.recommended)
    sizes: tuple[float, ...] = SIZES
    eval_windows: int | None = 64
    results: str | None = None
    random_floor: bool = True
    smoke: bool = False
    dtype: str = "float32"
    mesh: str | None = None
    random_weights: bool = False
    train_text: str | tuple[str, ...] | None = None
    valid_text: str | None = None
    general_eval: bool = True
    band_samples: int = 4
    band_windows: int = 8


def load_job(run_dir: str | os.PathLike) -> JobConfig:
    """The settings a finished main job ran with (its run folder's job.json)."""
    path = Path(run_dir) / "job.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not the folder of a finished `ppn fit`")
    d = json.loads(path.read_text())
    train_text = tuple(d["train_text"]) if isinstance(d.get("train_text"), list) else d.get("train_text")
    fit = FitConfig.from_dict(d["fit"])
    return JobConfig(**(d | {"fit": fit, "sizes": tuple(d["sizes"]), "train_text": train_text}))


# The Shakespeare splits a job or benchmark may evaluate on (the reserved one for final numbers only).
EVAL_SPLITS = ("validation", "reserved")


def load_inputs(source: str, dtype: str = "float32", smoke: bool = False, random_weights: bool = False,
                train_text: str | tuple[str, ...] | None = None, valid_text: str | None = None,
                split: str = "validation"):
    """(model, tokenizer or None, train tokens, validation tokens) of a job: the model
    at `source` (with `random_weights`, its architecture randomly initialised) and
    the Shakespeare splits, or with `smoke` a tiny random model and random tokens.
    `train_text` (one source or several weighted ones, see `JobConfig`) and
    `valid_text` (a file or a folder, `ppn.data.load_text`) replace the splits; with
    `smoke`, which has no tokenizer, a text's UTF-8 bytes modulo the vocabulary stand
    in for its tokens. `split="reserved"` evaluates on Shakespeare's reserved split
    instead of validation: final numbers only, never for choosing (BENCHMARK.md)."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"split must be {' or '.join(map(repr, EVAL_SPLITS))}, got {split!r}")
    specs = (train_text,) if isinstance(train_text, str) else tuple(train_text or ())
    if smoke:
        from ppn.testing import tiny_model

        model = tiny_model(dtype=jnp.dtype(dtype))
        rng = np.random.default_rng(0)

        def tokenize(text):
            return np.frombuffer(text.encode(), np.uint8).astype(np.int32) % model.config.vocab_size

        train = (_train_tokens(specs, tokenize) if specs else rng.integers(0, model.config.vocab_size, 20_000))
        draw = rng if split == "validation" else np.random.default_rng(1)
        valid = (tokenize(data.evaluation_text(valid_text, split)) if valid_text
                 else draw.integers(0, model.config.vocab_size, 2048))
        return model, None, train, valid
    model = random_model(source, dtype=dtype) if random_weights else load_model(source, dtype=dtype)
    tokenizer = load_tokenizer(source)
    train = _train_tokens(specs or ("shakespeare",), lambda text: data.tokenize(text, tokenizer))
    valid = data.evaluation_text(valid_text, split)
    return model, tokenizer, train, data.tokenize(valid, tokenizer)


def _train_tokens(specs: tuple[str, ...], tokenize) -> np.ndarray:
    """The training tokens of one or several "SOURCE[=WEIGHT]" specs, mixed by weight."""
    sources = [data.text_source(spec) for spec in specs]
    streams = [tokenize(data.training_text(source)) for source, _ in sources]
    return streams[0] if len(streams) == 1 else data.mix_tokens(streams, [w for _, w in sources])


def general_tokens(tokenizer, vocab_size: int) -> np.ndarray:
    """The general-English validation text (`ppn.data.general_english`) as tokens; with
    no tokenizer (a smoke job, which must not need the network), 2048 random tokens."""
    if tokenizer is None:
        return np.random.default_rng(1).integers(0, vocab_size, 4 * 512)
    return data.tokenize(data.general_english("validation"), tokenizer)


def measurer(valid, general, seqlen: int, eval_windows: int | None, progress: bool = True, mesh=None):
    """(model, cache=False, general=True) -> {"perplexity": on `valid`, "general_perplexity":
    on `general`, if given and asked for}. With `cache`, the result is kept in `<ppn cache>/measurements`
    under a hash of the model's weights, the texts and the windows: the dense model's
    row, the same for every fit of a model on the same texts, is measured once."""
    every = {"perplexity": valid} | ({} if general is None else {"general_perplexity": general})

    def measure(model: Llama, cache: bool = False, general: bool = True) -> dict:
        texts = every if general else {"perplexity": valid}
        path = None
        if cache and jax.process_count() == 1:  # hashing reads every weight on this host
            digest = hashlib.sha256(json.dumps([seqlen, eval_windows, sorted(texts)]).encode())
            for leaf in [*jax.tree.leaves(nnx.state(model)), *texts.values()]:
                digest.update(np.asarray(leaf).tobytes())
            path = cache_dir() / "measurements" / f"{digest.hexdigest()}.json"
            if path.exists():
                return json.loads(path.read_text())
        measured = {column: perplexity(model, tokens, seqlen=seqlen, max_windows=eval_windows, progress=progress,
                                       mesh=mesh).perplexity for column, tokens in texts.items()}
        if path is not None and is_main_process():
            atomic_write(path, json.dumps(measured))
        return measured

    return measure


def run(cfg: JobConfig, progress: bool = True) -> list[dict]:
    """Runs the whole pipeline and returns the result rows (also written to disk)."""
    run_dir = Path(cfg.run_dir)
    mesh = make_mesh(cfg.mesh) if cfg.mesh else None
    main = is_main_process()
    model, tokenizer, train, valid = load_inputs(cfg.model, cfg.dtype, cfg.smoke, cfg.random_weights,
                                                 cfg.train_text, cfg.valid_text)
    if cfg.fit.teacher not in (None, "start") and tokenizer is not None:
        check_same_tokenizer(tokenizer, load_tokenizer(cfg.fit.teacher), cfg.fit.teacher)
    seqlen = 512 if not cfg.smoke else 64
    general = general_tokens(tokenizer, model.config.vocab_size) if cfg.general_eval else None
    measure = measurer(valid, general, seqlen, cfg.eval_windows, progress, mesh)
    mode = eval_mode(cfg.eval_windows)
    dense_measured = measure(model, cache=True)

    fit_start = time.perf_counter()
    result = fit(model, train, cfg.fit, run_dir=run_dir, progress=progress, mesh=mesh, heldout=valid)
    fit_seconds = time.perf_counter() - fit_start
    plan = Plan.from_fit(result, meta={"model": cfg.model, "checkpoint": "model"})  # beside plan.json
    graphdef, state = nnx.split(result.model)
    fitted = nnx.merge(graphdef, addressable(state))  # gathered for process 0 to write: a collective
    if main:
        plan.save(run_dir / "plan.json")
        save_model(fitted, run_dir / "model", tokenizer=tokenizer, overwrite=True)
        _posterior_outputs(plan, result.metrics, run_dir)

    rows = size_rows(model, result.model, plan, measure, cfg.sizes, mode, cfg.fit.train_tokens,
                     random_floor=cfg.random_floor, dense_measured=dense_measured)
    for r in rows:  # this call's wall time; the updates' time over the whole run, resumes included
        r["fit_seconds"] = fit_seconds if r["train_tokens"] else 0.0
        r["fit_step_seconds"] = step_seconds(result.metrics) if r["train_tokens"] else 0.0
    band = None if not cfg.band_samples else plan.quality_band(
        result.model, valid, cfg.sizes, cfg.band_samples, seqlen=seqlen, max_windows=cfg.band_windows,
        progress=progress, mesh=mesh)
    results = Path(cfg.results) if cfg.results else run_dir / "results.json"
    if main:
        write_results(results.stem, rows, COLUMNS, out_dir=results.parent,
                      title=f"Push puppet fit on {cfg.model}: validation perplexity by size ({mode})",
                      config=dataclasses.asdict(cfg))
        atomic_write(run_dir / "table.md", markdown_table(rows, COLUMNS))
        if band is not None:
            atomic_write(run_dir / "quality_band.json", json.dumps(band.to_json(), indent=2))
            plt.close(plots.quality_band(band, path=run_dir / "quality_band.png"))
        atomic_write(run_dir / "job.json", json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
    mark_done(run_dir)
    return rows



def check_same_tokenizer(student, teacher, teacher_name: str) -> None:
    """Raises ValueError unless the teacher's tokenizer maps every string to the
    student's token ids (same vocabulary): distillation compares their
    distributions id by id."""
    if student.get_vocab() != teacher.get_vocab():
        ours, theirs = student.get_vocab(), teacher.get_vocab()
        differ = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
        raise ValueError(f"teacher {teacher_name!r} has another tokenizer than the model ({len(theirs):,} vs "
                         f"{len(ours):,} tokens; e.g. {differ}); a teacher must share the student's tokenizer")


def eval_mode(eval_windows: int | None) -> str:
    """How a perplexity was measured: "quick" (64 windows), "full" or "N windows"."""
    return "quick" if eval_windows == 64 else ("full" if eval_windows is None else f"{eval_windows} windows")


def size_rows(dense: Llama, fitted: Llama, plan: Plan, measure: Callable[[Llama], dict], sizes: tuple[float, ...],
              mode: str, train_tokens: int, random_floor: bool = True,
              dense_measured: dict | None = None) -> list[dict]:
    """The main job's table: the dense model, the fitted one unpruned, and at each
    size the fitted model cut by `plan` (with its resize time) and, with
    `random_floor`, cut to a random structure of that size (measured in domain only:
    its general-English perplexity would say nothing and cost a pass per size).

    Args:
        dense, fitted: the model before and after the fit.
        measure: model -> the row's perplexity columns (`measurer`).
        mode: the evaluation's name in the rows ("quick", "full").
        train_tokens: tokens the fit saw.
        dense_measured: `measure(dense)`, if already measured.
    """
    total, prunable = dense.config.num_params(), dense.config.num_prunable_params()
    rows = [{"method": "dense", "size": 1.0, "kept_prunable": prunable, "kept_fraction": 1.0, "kept_total": total,
             **(dense_measured or measure(dense)), "eval": mode, "train_tokens": 0},
            {"method": "ppn (fitted weights, unpruned)", "size": 1.0, "kept_prunable": prunable,
             "kept_fraction": 1.0, "kept_total": total, **measure(fitted), "eval": mode, "train_tokens": train_tokens}]
    for size in sizes:
        start = time.perf_counter()
        pruned = prune(fitted, plan, size)
        resize = time.perf_counter() - start
        kept = pruned.config.num_prunable_params()
        rows.append({"method": "ppn", "size": size, "kept_prunable": kept, "kept_fraction": kept / prunable,
                     "kept_total": pruned.config.num_params(), **measure(pruned), "eval": mode,
                     "train_tokens": train_tokens, "resize_seconds": resize})
        if random_floor:
            rand = prune(fitted, structured_keep(fitted, "random", size, units=plan.units, seed=0))
            kept = rand.config.num_prunable_params()
            rows.append({"method": "random structure (same weights)", "size": size, "kept_prunable": kept,
                         "kept_fraction": kept / prunable, "kept_total": rand.config.num_params(),
                         **measure(rand, general=False), "eval": mode, "train_tokens": train_tokens})
    return rows


def _posterior_outputs(plan: Plan, metrics: list[dict], run_dir: Path) -> None:
    """ArviZ posterior and the plots, beside the plan."""
    idata = plan.to_arviz()
    tmp = run_dir / ".posterior.nc.tmp"
    idata.to_netcdf(str(tmp))
    tmp.replace(run_dir / "posterior.nc")
    for name, fn in (("keep_frequency.png", lambda p: plots.keep_frequency_heatmap(plan, path=p)),
                     ("structure.png", lambda p: plots.structure_curves(plan, path=p)),
                     ("forest.png", lambda p: plots.forest(plan, path=p)),
                     ("training.png", lambda p: plots.training_curves(metrics, path=p))):
        plt.close(fn(run_dir / name))
