"""The benchmark of experiments/BENCHMARK.md: every method at every size, one table, one plot.

    ppn bench --quick                          # about an hour on a 2-core CPU (sizes 0.7, 0.5, 0.3)
    ppn bench                                  # the full preset (a GPU's job)
    python experiments/benchmark.py --smoke    # tiny model, seconds

Methods: the dense model; ppn (every size from one fitted plan); one-shot
unstructured magnitude, Wanda and SparseGPT (sparsity 1 - rho, and 2:4 at
rho = 0.5); structured Block Influence layer removal, FLAP and Wanda-sp scores,
and random structure; and the fairness rows: the dense model and the best
structured baseline at rho = 0.5 fine-tuned with the fit's exact budget.

Each row is appended to `<state_dir>/rows.jsonl` when done, so an interrupted
benchmark resumes where it stopped (a state folder of other settings is refused); a
fine-tuning row resumes from its checkpoint in `<state_dir>/finetune-*`. Results:
`results/benchmark/benchmark.json` (a record per row), `.md` (the table, the wall time
per method) and `.png` (perplexity against kept parameters; speed ratios).

Speed: prefill and decode throughput of every structured model against the dense
model, timed back to back in each round (`ppn.speed.relative_speed`). Unstructured and
N:M models keep dense shapes and run at dense speed here (not measured; the table says so).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from ppn.harness.baselines.calibration import calibration_windows, layerwise
from ppn.harness.baselines.structured import STRUCTURED_METHODS, prune_compensated, structured_keep
from ppn.harness.baselines.unstructured import METHODS as UNSTRUCTURED_METHODS
from ppn.harness.baselines.unstructured import prune_unstructured
from ppn.harness.figures import benchmark_figure
from ppn.harness.finetune import finetune
from ppn.harness.job import EVAL_SPLITS, JobConfig, eval_mode, general_tokens, load_inputs, measurer
from ppn.harness.job import run as run_job
from ppn.fit import FitConfig
from ppn.units import Units
from ppn.models.llama import Llama
from ppn.plan import Plan
from ppn.prune import prune
from ppn.harness.report import TOTAL_COLUMNS, markdown_table, wall_time_per_method, write_results
from ppn.runs import append_jsonl, atomic_write, read_jsonl, read_metrics, step_seconds
from ppn.sharding import make_mesh

SIZES = (0.9, 0.7, 0.5, 0.4, 0.3)
QUICK_SIZES = (0.7, 0.5, 0.3)
METHODS = ("dense", "ppn", *UNSTRUCTURED_METHODS, *STRUCTURED_METHODS, "finetuned")
# The structured baselines that score units (random is the floor, not a candidate to fine-tune).
SCORED_METHODS = tuple(m for m in STRUCTURED_METHODS if m != "random")
# The method name of the dense model fine-tuned with the fit's budget (read by experiments/budget_study.py).
DENSE_FINETUNED = "dense fine-tuned (fit budget)"
COLUMNS = ["method", "pattern", "size", "kept_prunable", "kept_fraction", "kept_total", "perplexity",
           "general_perplexity", "eval",
           "tokens_used", "prune_seconds", "prefill_ratio", "decode_ratio"]


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """The benchmark's settings (defaults: the full preset of experiments/BENCHMARK.md).

    Attributes:
        model: zoo name, checkpoint directory or .gguf file of the dense model.
        plan: the fitted plan of the ppn rows (its checkpoint is the plan's
            `meta["checkpoint"]`); when the file is missing, the main job fits
            one first into the plan's folder.
        methods: which of `METHODS` to run. "finetuned" fine-tunes with the fit's budget each the run has of:
            the dense model, SparseGPT's cut at 0.5 (mask held), the best scored structured cut at 0.5
            (with none of them, the dense model).
        sizes: target fractions of prunable parameters (ppn and structured).
        unstructured_sizes: the sizes of the unstructured one-shot rows.
        nm: N:M patterns, run at rho = N / M (2:4 and 4:8 at 0.5).
        calibration_windows, calibration_seqlen: windows drawn from the train
            split with seed 0 for Wanda, SparseGPT and the structured scores.
        eval_windows: validation windows per perplexity (64 = quick, None = full).
        speed: measure prefill/decode throughput of structured models.
        speed_repeats: timed rounds per speed ratio (dense and pruned back to back in each).
        state_dir: where finished rows are kept for resuming.
        out: the results JSON (the .md and .png go beside it).
        smoke: a tiny random model and random tokens (seconds).
        dtype: weight and activation dtype of every model, "float32" or "bfloat16".
        mesh: "data=D,fsdp=F": perplexities (and a fit run first) on that many
            devices (`ppn.sharding.make_mesh`); None: the default device. Baselines and
            speed run on one device.
        finetune_steps: the fine-tuned rows' budget as `FitConfig` defaults with this many steps (the budget
            of `ppn fit --steps N`), so a fine-tuned row needs no plan at hand; None: the plan's own fit config.
        finetune_optimizer: with `finetune_steps`, "default" (`FitConfig()`'s) or "recommended" (the fit's own).
        general_eval: also measure every row's perplexity on general English
            (`ppn.data.general_english`), out of the fitting text's domain.
        split: where perplexity is measured: "validation", or "reserved" for final numbers only.
    """

    model: str = "smollm2-135m"
    plan: str = "runs/smollm2-135m/plan.json"
    methods: tuple[str, ...] = METHODS
    sizes: tuple[float, ...] = SIZES
    unstructured_sizes: tuple[float, ...] = SIZES
    nm: tuple[tuple[int, int], ...] = ((2, 4), (4, 8))
    calibration_windows: int = 128
    calibration_seqlen: int = 512
    eval_windows: int | None = None
    speed: bool = True
    speed_repeats: int = 5
    state_dir: str = "runs/benchmark"
    out: str = "results/benchmark/benchmark.json"
    smoke: bool = False
    dtype: str = "float32"
    mesh: str | None = None
    finetune_steps: int | None = None
    finetune_optimizer: str = "default"
    general_eval: bool = True
    split: str = "validation"

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        for s in (*self.sizes, *self.unstructured_sizes):
            if not 0 < s <= 1:
                raise ValueError(f"sizes must lie in (0, 1], got {s}")
        for n, m in self.nm:
            if not 0 < n < m:
                raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
        if self.split not in EVAL_SPLITS:
            raise ValueError(f"split must be {' or '.join(map(repr, EVAL_SPLITS))}, got {self.split!r}")
        if self.finetune_optimizer not in ("default", "recommended"):
            raise ValueError(f"finetune_optimizer must be 'default' or 'recommended', got {self.finetune_optimizer!r}")
        if self.finetune_steps is not None and self.finetune_steps < 1:
            raise ValueError(f"finetune_steps must be a positive number of steps, got {self.finetune_steps}")

    @classmethod
    def quick(cls, **overrides) -> BenchConfig:
        """The CPU preset (about an hour on 2 cores): quick perplexity, 32
        calibration windows, the sizes that matter most (0.7, 0.5, 0.3; one-shot
        unstructured rows at 0.5 and 0.3, the aim's range, and 2:4), fewer timing
        repeats. The fine-tuned rows keep the fit's full budget."""
        fields = dict(eval_windows=64, calibration_windows=32, sizes=QUICK_SIZES, unstructured_sizes=(0.5, 0.3),
                      nm=((2, 4),), speed_repeats=3, out="results/benchmark/benchmark_quick.json",
                      state_dir="runs/benchmark-quick")
        return cls(**(fields | overrides))

    @classmethod
    def smoke_test(cls, root: str | os.PathLike, **overrides) -> BenchConfig:
        """A tiny random model and random tokens, everything written under `root`."""
        root = Path(root)
        fields = dict(smoke=True, plan=str(root / "fit" / "plan.json"), state_dir=str(root / "state"),
                      out=str(root / "benchmark_smoke.json"), eval_windows=2, calibration_windows=4,
                      calibration_seqlen=32, sizes=(0.5,), unstructured_sizes=(0.5,), speed_repeats=1)
        return cls(**(fields | overrides))


class _State:
    """Rows finished so far, kept one JSON line each in `<state_dir>/rows.jsonl`."""

    def __init__(self, cfg: BenchConfig):
        self.dir = Path(cfg.state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        # The mesh changes where rows are computed, not what they mean; fields at
        # their old defaults are left out so state folders made before they existed still resume.
        old = dict(dtype="float32", finetune_steps=None, finetune_optimizer="default", general_eval=False,
                   split="validation")
        skip = ("methods", "out", "mesh") + tuple(k for k, v in old.items() if getattr(cfg, k) == v)
        settings = json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip},
                              sort_keys=True, default=list)
        cfg_path = self.dir / "config.json"
        if cfg_path.exists() and cfg_path.read_text() != settings:
            raise ValueError(f"{self.dir} holds a benchmark with other settings; pass another state folder "
                             "or delete it")
        atomic_write(cfg_path, settings)
        self.path = self.dir / "rows.jsonl"
        self.rows = {row["key"]: row for row in read_jsonl(self.path)}

    def add(self, row: dict) -> None:
        self.rows[row["key"]] = row
        append_jsonl(self.path, row)


class _Bench:
    """Loads what the pending rows need, lazily, once."""

    def __init__(self, cfg: BenchConfig, progress: bool, rows: dict[str, dict]):
        self.cfg, self.progress, self.rows = cfg, progress, rows
        self._cache: dict[str, object] = {}

    def _once(self, name: str, make: Callable[[], object]):
        if name not in self._cache:
            self._cache[name] = make()
        return self._cache[name]

    # ------------------------------------------------------------- inputs
    def inputs(self):
        """(dense model, tokenizer or None, train tokens, validation tokens, eval seqlen)."""
        cfg = self.cfg
        return self._once("inputs", lambda: (*load_inputs(cfg.model, cfg.dtype, cfg.smoke, split=cfg.split),
                                             64 if cfg.smoke else 512))

    @property
    def mesh(self):
        return self._once("mesh", lambda: make_mesh(self.cfg.mesh) if self.cfg.mesh else None)

    @property
    def dense(self) -> Llama:
        return self.inputs()[0]

    def measure(self, model: Llama) -> dict:
        """The row's perplexity columns (`ppn.harness.job.measurer`)."""
        def make():
            dense, tokenizer, _, valid, seqlen = self.inputs()
            general = general_tokens(tokenizer, dense.config.vocab_size) if self.cfg.general_eval else None
            return measurer(valid, general, seqlen, self.cfg.eval_windows, self.progress, self.mesh)
        return self._once("measure", make)(model)

    def windows(self) -> np.ndarray:
        return self._once("windows", lambda: calibration_windows(
            self.inputs()[2], self.cfg.calibration_windows, self.cfg.calibration_seqlen, seed=0))

    def stats(self):
        """Calibration statistics of the dense model (one pass) and its wall time."""
        def make():
            start = time.perf_counter()
            stats = layerwise(self.dense, self.windows(), progress=self.progress, desc="calibration (structured)")
            return stats, time.perf_counter() - start
        return self._once("stats", make)

    def plan(self) -> tuple[Plan, Llama, float]:
        """The fitted plan, its fitted model, and the fit's wall time (fitting first if needed)."""
        def make():
            from ppn.checkpoint import load_model

            path = Path(self.cfg.plan)
            if not path.exists():
                fit = FitConfig.recommended(**(dict(steps=8, batch_size=3, seqlen=32, group_width=16)
                                               if self.cfg.smoke else {}))
                run_job(JobConfig(model=self.cfg.model, run_dir=str(path.parent), fit=fit,
                                  results=str(path.parent / "fit.json"), smoke=self.cfg.smoke,
                                  eval_windows=self.cfg.eval_windows, random_floor=False, dtype=self.cfg.dtype,
                                  mesh=self.cfg.mesh, general_eval=self.cfg.general_eval),
                        progress=self.progress)
            plan = Plan.load(path)
            model = load_model(plan.meta.get("checkpoint") or path.parent / "model", dtype=self.cfg.dtype)
            plan.check_model(model.config)
            return plan, model, step_seconds(read_metrics(path.parent))
        return self._once("plan", make)

    def fit_config(self) -> FitConfig:
        """The fine-tuned rows' budget: `finetune_steps` if set, else the plan's fit."""
        if self.cfg.finetune_steps is not None:
            make = FitConfig.recommended if self.cfg.finetune_optimizer == "recommended" else FitConfig
            return make(steps=self.cfg.finetune_steps)
        return FitConfig.from_dict(self.plan()[0].meta["fit"])

    # -------------------------------------------------------------- speed
    def speed(self, model: Llama) -> dict:
        """Prefill and decode throughput of `model` as ratios to the dense model's."""
        from ppn import speed

        if not self.cfg.speed:
            return {}
        kw = dict(prefill=dict(batch=2, seqlen=32), decode=dict(prompt_len=8, new_tokens=8)) if self.cfg.smoke else {}
        return speed.relative_speed(model, self.dense, repeats=self.cfg.speed_repeats, **kw)


def _row(method: str, size: float, model: Llama, dense: Llama, **fields) -> dict:
    prunable = dense.config.num_prunable_params()
    kept = fields.pop("kept_prunable", model.config.num_prunable_params())
    extra = dense.config.num_params() - prunable
    return {"method": method, "size": size, "kept_prunable": int(kept), "kept_fraction": kept / prunable,
            "kept_total": int(kept + extra), **fields}


def _tasks(cfg: BenchConfig, b: _Bench) -> list[tuple[str, Callable[[], dict]]]:
    """(key, compute-the-row) for every row the config asks for, in table order."""
    mode = eval_mode(cfg.eval_windows)
    calib_tokens = cfg.calibration_windows * cfg.calibration_seqlen
    tasks = []

    def dense_row():
        return _row("dense", 1.0, b.dense, b.dense, pattern="dense", **b.measure(b.dense), eval=mode,
                    tokens_used=0, prune_seconds=0.0)

    def ppn_row(size):
        def run():
            plan, fitted, fit_seconds = b.plan()
            start = time.perf_counter()
            pruned = prune(fitted, plan, size)
            seconds = time.perf_counter() - start
            return _row("ppn", size, pruned, b.dense, pattern="structured", **b.measure(pruned),
                        eval=mode, tokens_used=plan.meta.get("train_tokens", 0), prune_seconds=seconds,
                        fit_seconds=fit_seconds, **b.speed(pruned))
        return run

    def unstructured_row(method, size, nm):
        def run():
            result = prune_unstructured(b.dense, method, 1.0 - size, nm=nm,
                                        windows=None if method == "magnitude" else b.windows(),
                                        progress=b.progress)
            zeros = _zeros(result.model)
            return _row(method, size, result.model, b.dense, kept_prunable=b.dense.config.num_prunable_params() - zeros,
                        pattern=f"{nm[0]}:{nm[1]}" if nm else "unstructured", **b.measure(result.model),
                        eval=mode, tokens_used=0 if method == "magnitude" else calib_tokens,
                        prune_seconds=result.seconds, prefill_ratio=None, decode_ratio=None,
                        speed_note="dense kernels: runs at dense speed")
        return run

    def structured_row(method, size):
        def run():
            calib_seconds = 0.0 if method == "random" else b.stats()[1]
            start = time.perf_counter()
            pruned = _structured(b, method, size)
            seconds = time.perf_counter() - start
            return _row(method, size, pruned, b.dense, pattern="structured", **b.measure(pruned),
                        eval=mode, tokens_used=0 if method == "random" else calib_tokens, prune_seconds=seconds,
                        calibration_seconds=calib_seconds, **b.speed(pruned))
        return run

    def dense_finetuned_row():
        return _finetuned_row(b, DENSE_FINETUNED, b.dense, 1.0, "dense", mode, tokens_used=0, prune_seconds=0.0)

    if "dense" in cfg.methods:
        tasks.append(("dense", dense_row))
    if "ppn" in cfg.methods:
        tasks += [(f"ppn@{s}", ppn_row(s)) for s in cfg.sizes]
    for method in UNSTRUCTURED_METHODS:
        if method in cfg.methods:
            tasks += [(f"{method}@{s}", unstructured_row(method, s, None)) for s in cfg.unstructured_sizes]
            tasks += [(f"{method} {n}:{m}@{n / m}", unstructured_row(method, n / m, (n, m))) for n, m in cfg.nm]
    for method in STRUCTURED_METHODS:
        if method in cfg.methods:
            tasks += [(f"{method}@{s}", structured_row(method, s)) for s in cfg.sizes]
    if "finetuned" in cfg.methods:
        if "dense" in cfg.methods or not set(cfg.methods) & {"sparsegpt", *SCORED_METHODS}:
            tasks.append(("dense fine-tuned", dense_finetuned_row))
        if any(m in cfg.methods for m in SCORED_METHODS):
            tasks.append(("best structured fine-tuned@0.5", lambda: _best_structured_finetuned(b, mode, calib_tokens)))
        if "sparsegpt" in cfg.methods:
            tasks.append(("sparsegpt masked fine-tuned@0.5", lambda: _sparsegpt_finetuned(b, mode, calib_tokens)))
    return tasks


def _structured(b: _Bench, method: str, size: float) -> Llama:
    """The dense model cut to `size` by a structured baseline (FLAP with its bias compensation)."""
    stats = None if method == "random" else b.stats()[0]
    keep = structured_keep(b.dense, method, size, stats=stats, units=Units(b.dense.config, 16 if b.cfg.smoke else 64))
    return prune_compensated(b.dense, keep, stats) if method == "flap" else prune(b.dense, keep)


def _finetuned_row(b: _Bench, method: str, model: Llama, size: float, folder: str, mode: str, *,
                   tokens_used: int, pattern: str = "dense", keep_zeros: bool = False, **fields) -> dict:
    """`model` fine-tuned with the fit's budget (resumable in `<state_dir>/finetune-<folder>`), as a row;
    `tokens_used` counts what the model used before (calibration), `keep_zeros` holds its zeros fixed."""
    fit = b.fit_config()
    tuned = finetune(model, b.inputs()[2], fit, progress=b.progress, keep_zeros=keep_zeros,
                     run_dir=Path(b.cfg.state_dir) / f"finetune-{folder}")
    if keep_zeros:
        fields["kept_prunable"] = b.dense.config.num_prunable_params() - _zeros(tuned.model)
    return _row(method, size, tuned.model, b.dense, pattern=pattern, **b.measure(tuned.model),
                eval=mode, tokens_used=fit.train_tokens + tokens_used, finetune_seconds=tuned.seconds, **fields)


def _best_structured_finetuned(b: _Bench, mode: str, calib_tokens: int) -> dict:
    """The structured baseline with the lowest perplexity at 0.5 (random excluded), fine-tuned."""
    scored = {m: b.rows[f"{m}@0.5"]["perplexity"] for m in SCORED_METHODS if f"{m}@0.5" in b.rows}
    if not scored:
        raise ValueError("the fine-tuned structured row needs a structured baseline at size 0.5 in the same run")
    best = min(scored, key=scored.get)
    return _finetuned_row(b, f"{best} fine-tuned (fit budget)", _structured(b, best, 0.5), 0.5, f"{best}-0.5", mode,
                          tokens_used=calib_tokens, pattern="structured", prune_seconds=0.0)


def _sparsegpt_finetuned(b: _Bench, mode: str, calib_tokens: int) -> dict:
    """SparseGPT at sparsity 0.5, then its kept weights fine-tuned with the mask held fixed."""
    sparse = prune_unstructured(b.dense, "sparsegpt", 0.5, windows=b.windows(), progress=b.progress)
    return _finetuned_row(b, "sparsegpt masked fine-tuned (fit budget)", sparse.model, 0.5, "sparsegpt-0.5", mode,
                          tokens_used=calib_tokens, pattern="unstructured", keep_zeros=True,
                          prune_seconds=sparse.seconds, prefill_ratio=None, decode_ratio=None,
                          speed_note="dense kernels: runs at dense speed")


def _zeros(model: Llama) -> int:
    """Exact zeros in the prunable (block) weights of `model`."""
    return int(sum(int((np.asarray(p) == 0).sum()) for p in jax.tree.leaves(nnx.state(model.blocks, nnx.Param))))


def run(cfg: BenchConfig, progress: bool = True) -> list[dict]:
    """Computes every row not already in the state folder, then writes the results.

    Returns:
        The rows of the table (also in `cfg.out`, .md and .png).
    """
    state = _State(cfg)
    bench = _Bench(cfg, progress, state.rows)
    for key, compute in _tasks(cfg, bench):
        if key in state.rows:
            continue
        start = time.perf_counter()
        row = compute()
        row.update(key=key, wall_seconds=time.perf_counter() - start)
        state.add(row)
    rows = [state.rows[k] for k, _ in _tasks(cfg, bench) if k in state.rows]
    totals = wall_time_per_method(rows)
    out = Path(cfg.out)
    name = out.stem
    write_results(name, rows, COLUMNS, out_dir=out.parent, config=dataclasses.asdict(cfg),
                  title=f"Benchmark on {cfg.model if not cfg.smoke else 'a tiny model'}: {cfg.split} perplexity "
                        f"by kept size")
    md = out.parent / f"{name}.md"
    atomic_write(md, md.read_text() + "\n## Wall time per method, all sizes\n\n"
                      + markdown_table(totals, TOTAL_COLUMNS)
                      + "\nUnstructured and N:M rows keep dense shapes and run at dense speed here.\n")
    plt.close(benchmark_figure(rows, out.parent / f"{name}.png"))
    return rows
