"""Throughput measurements of the experiments/BENCHMARK.md protocol, for any `Llama`
(dense or pruned), and latency tables: what each unit costs in milliseconds on this
machine (`profile_costs`), so that `Plan.keep` can cut to a latency.

Each function compiles first (untimed), then reports the median of `repeats`
timed runs, blocking on the result so asynchronous dispatch is not mistaken for
speed. Ratios between models measured in the same process are what reports
quote; `relative_speed` measures them interleaved (reference, model, reference,
model, ...), so that a slow spell of the machine slows both sides of a pair
rather than one model's whole measurement.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppn.generate import decode_loop, generate
from ppn.models.config import LlamaConfig
from ppn.models.llama import KVCache, Llama
from ppn.units import Costs, KeepSet, Units


@dataclasses.dataclass(frozen=True)
class Throughput:
    """Tokens per second of one measurement.

    Attributes:
        tokens_per_second: processed (prefill) or generated (decode) tokens per second.
        seconds: median wall time of one run.
        tokens: tokens per run.
        repeats: timed runs.
    """

    tokens_per_second: float
    seconds: float
    tokens: int
    repeats: int


def time_call(fn: Callable[[], object], tokens: int, repeats: int = 5) -> Throughput:
    """Times `fn()` (which must block until done) after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return Throughput(tokens / median, median, tokens, repeats)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)


def _prefill_call(model: Llama, batch: int = 4, seqlen: int = 512, seed: int = 0) -> tuple[Callable, int]:
    """A blocking forward pass on random token windows (B=batch, T=seqlen), and its token count."""
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, model.config.vocab_size, (batch, seqlen)),
                      jnp.int32)
    graphdef, state = nnx.split(model)
    return (lambda: _logits(graphdef, state, ids).block_until_ready()), batch * seqlen


def _decode_call(model: Llama, prompt_len: int = 128, new_tokens: int = 128, seed: int = 0) -> tuple[Callable, int]:
    """Greedy decoding of `new_tokens` after a random prompt at batch 1, and the new token count."""
    prompt = np.random.default_rng(seed).integers(0, model.config.vocab_size, (1, prompt_len))
    return (lambda: generate(model, prompt, new_tokens)), new_tokens


def prefill_throughput(model: Llama, batch: int = 4, seqlen: int = 512, repeats: int = 5,
                       seed: int = 0) -> Throughput:
    """Forward-only throughput on random token windows (B=batch, T=seqlen)."""
    return time_call(*_prefill_call(model, batch, seqlen, seed), repeats)


def decode_throughput(model: Llama, prompt_len: int = 128, new_tokens: int = 128, repeats: int = 3,
                      seed: int = 0) -> Throughput:
    """Greedy decoding with the KV cache at batch 1: generated tokens per second
    (the prompt's prefill included in the time, as a user experiences it)."""
    return time_call(*_decode_call(model, prompt_len, new_tokens, seed), repeats)


def interleaved_ratio(fn: Callable[[], object], reference: Callable[[], object], repeats: int = 5) -> float:
    """Median over `repeats` rounds of time(reference) / time(fn), the two timed
    back to back in each round (after one untimed call of each): > 1 means `fn`
    is faster. Both must block until done."""
    fn(), reference()
    ratios = []
    for _ in range(repeats):
        start = time.perf_counter()
        reference()
        middle = time.perf_counter()
        fn()
        ratios.append((middle - start) / (time.perf_counter() - middle))
    return statistics.median(ratios)


def relative_speed(model: Llama, reference: Llama, repeats: int = 5, prefill: dict | None = None,
                   decode: dict | None = None) -> dict[str, float]:
    """Prefill and decode speed of `model` as ratios to `reference`'s, interleaved.

    Args:
        model, reference: e.g. a pruned model and the dense one it came from.
        repeats: timed rounds per ratio.
        prefill, decode: keyword arguments of `prefill_throughput` / `decode_throughput`
            (batch, seqlen / prompt_len, new_tokens), the same for both models.

    Returns:
        {"prefill_ratio", "decode_ratio"}: median ratios of the models' tokens per second.
    """
    prefill, decode = prefill or {}, decode or {}
    return {"prefill_ratio": interleaved_ratio(_prefill_call(model, **prefill)[0],
                                               _prefill_call(reference, **prefill)[0], repeats),
            "decode_ratio": interleaved_ratio(_decode_call(model, **decode)[0],
                                              _decode_call(reference, **decode)[0], repeats)}


def decode_without_cache_throughput(model: Llama, prompt_len: int = 128, new_tokens: int = 128,
                                    points: int = 5, repeats: int = 3, seed: int = 0) -> Throughput:
    """Greedy decoding that recomputes the whole prefix for every new token, the
    baseline the KV cache is measured against.

    Token t costs one forward pass over its t-token prefix. That cost is timed at
    `points` evenly spaced prefix lengths in [prompt_len, prompt_len + new_tokens)
    and averaged (it grows about linearly with t), which avoids recompiling for
    every one of the new_tokens lengths.
    """
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(model)
    lengths = np.linspace(prompt_len, prompt_len + new_tokens - 1, points).round().astype(int)
    per_token = []
    for t in lengths:
        ids = jnp.asarray(rng.integers(0, model.config.vocab_size, (1, int(t))), jnp.int32)
        per_token.append(time_call(lambda: _logits(graphdef, state, ids).block_until_ready(), 1, repeats).seconds)
    mean = float(np.mean(per_token))
    return Throughput(1.0 / mean, mean * new_tokens, new_tokens, repeats)


# ------------------------------------------------------------------ latency tables
COSTS_FORMAT = "ppn-costs/1"
PHASES = ("prefill", "decode")
# Latency terms of a model, summed over its blocks; the regressors of `profile_costs`.
LATENCY_TERMS = ("base", "attn_layer", "head", "kv_head", "mlp_layer", "channel")


def _profile_keeps(units: Units, random_cuts: int = 8, seed: int = 0) -> list[KeepSet]:
    """Pruned variants of the dense model whose counts of sub-layers, query heads, KV
    heads and channels vary independently enough to separate their latencies.

    First nine the same in every block: whole KV groups and one head per KV group,
    every, half and a quarter of the MLP groups, no attention, no MLP. Then
    `random_cuts` that differ from block to block as a plan's cuts do (each sub-layer
    kept with probability 0.8, a uniform number of its heads and MLP groups, chosen
    at random), so the table is fitted on the kind of model it will price."""
    L, N, K, M = units.num_layers, units.num_heads, units.config.num_kv_heads, units.num_groups
    group = units.head_kv
    heads = {"all": np.ones(N, bool), "half_groups": group < max(K // 2, 1),
             "one_per_group": np.r_[True, group[1:] != group[:-1]], "quarter_groups": group < max(K // 4, 1)}
    groups = {f: np.arange(M) < max(round(M * f), 1) for f in (1.0, 0.5, 0.25)}
    specs = [(heads["all"], groups[1.0], True, True), (heads["half_groups"], groups[1.0], True, True),
             (heads["one_per_group"], groups[1.0], True, True), (heads["all"], groups[0.5], True, True),
             (heads["all"], groups[0.25], True, True), (heads["quarter_groups"], groups[0.25], True, True),
             (heads["all"], groups[1.0], False, True), (heads["all"], groups[0.5], True, False),
             (heads["one_per_group"], groups[0.5], False, True)]
    uniform = [KeepSet(units, np.full(L, a), np.full(L, m), np.tile(h, (L, 1)), np.tile(g, (L, 1)))
               for h, g, a, m in specs]
    rng = np.random.default_rng(seed)

    def some(n: int) -> np.ndarray:
        """(L, n) each row a random subset of 1..n of the n units."""
        return np.stack([rng.permutation(n) < rng.integers(1, n + 1) for _ in range(L)])

    return uniform + [KeepSet(units, rng.random(L) < 0.8, rng.random(L) < 0.8, some(N), some(M))
                      for _ in range(random_cuts)]


def latency_terms(keep: KeepSet) -> np.ndarray:
    """(len(LATENCY_TERMS),) the model's count of each latency term."""
    eff = keep.effective()
    return np.array([1, eff.attn.sum(), eff.heads.sum(), keep.kv_kept().sum(), eff.mlp.sum(),
                     keep.channels().sum()], np.float64)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _prefilled(graphdef, state, prompt, capacity):
    """The greedy next token (B,) after `prompt` (B, T) and a cache of `capacity` positions holding it."""
    model = nnx.merge(graphdef, state)
    cache = KVCache.init(model.config, prompt.shape[0], capacity, model.dtype)
    logits, cache = model.forward_with_cache(prompt, cache)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


@functools.partial(jax.jit, static_argnums=0)
def _decode_steps(graphdef, state, token, cache, keys):
    return decode_loop(nnx.merge(graphdef, state), token, cache, keys)[0]


def measure_latency(model: Llama, context: int = 512, new_tokens: int = 32, repeats: int = 3) -> dict[str, float]:
    """Milliseconds at batch 1: "prefill", one forward pass over `context` tokens filling
    a key/value cache; "decode",
    one new token after a `context`-token prompt: greedy decoding of `new_tokens` from a
    cache filled beforehand (the prefill is not in the timed call, so its noise is not
    either), per token."""
    graphdef, state = nnx.split(model)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (1, context)), jnp.int32)
    prefill = time_call(lambda: jax.block_until_ready(_prefilled(graphdef, state, prompt, context + new_tokens)), 1,
                        repeats).seconds
    token, cache = _prefilled(graphdef, state, prompt, context + new_tokens)
    keys = jax.random.split(jax.random.key(0), new_tokens)
    decode = time_call(lambda: _decode_steps(graphdef, state, token, cache, keys).block_until_ready(), new_tokens,
                       repeats).seconds
    return {"prefill": 1e3 * prefill, "decode": 1e3 * decode / new_tokens}


def profile_costs(model: Llama, group_width: int = 64, context: int = 512, repeats: int = 3, measure=None,
                  progress: bool = True) -> dict:
    """A latency table of `model` on this machine: what each unit costs in milliseconds.

    Times the pruned variants of `_profile_keeps` and fits, per phase, the latency as
    a non-negative sum of `LATENCY_TERMS` (a fixed cost, then per attention sub-layer,
    query head, KV head, MLP sub-layer and MLP channel) by least squares. A unit's
    latency is thereby assumed the same in every block.

    Args:
        measure: pruned model -> {"prefill": ms, "decode": ms}; default `measure_latency`.

    Returns:
        The table (`COSTS_FORMAT`): the dense config, context, per-phase coefficients
        by term, and the measured and fitted milliseconds of each variant. `save_costs`
        writes it; `load_costs` turns a phase of it into `Costs` for `Plan.keep`.
    """
    from scipy.optimize import nnls

    from ppn.console import progress_bar
    from ppn.prune import prune

    units = Units(model.config, min(group_width, model.config.intermediate_size))
    measure = measure or functools.partial(measure_latency, context=context, repeats=repeats)
    keeps = _profile_keeps(units)
    terms = np.stack([latency_terms(k) for k in keeps])
    measured = [measure(prune(model, k)) for k in progress_bar(keeps, desc="profile", unit="model", enabled=progress)]
    table = {"format": COSTS_FORMAT, "config": model.config.to_hf(), "context": context, "terms": LATENCY_TERMS,
             "variants": terms.tolist(), "phases": {}}
    for phase in PHASES:
        ms = np.array([m[phase] for m in measured])
        coef = nnls(terms, ms)[0]
        table["phases"][phase] = {"coefficients_ms": dict(zip(LATENCY_TERMS, coef.tolist())),
                                  "measured_ms": ms.tolist(), "fitted_ms": (terms @ coef).tolist()}
    return table


def save_costs(table: dict, path) -> Path:
    """Writes a latency table as JSON, atomically."""
    from ppn.runs import atomic_write

    return atomic_write(path, json.dumps(table, indent=2))


def load_costs(path, units: Units, phase: str = "decode") -> Costs:
    """One phase of a latency table as `Costs` (currency "ms") for `units`' model.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a cost table, an unknown phase, or a table measured on another model shape.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no cost table at {path}")
    try:
        table = json.loads(path.read_text())
        if table.get("format") != COSTS_FORMAT:
            raise ValueError(f"format is {table.get('format')!r}, expected {COSTS_FORMAT!r}")
        config = LlamaConfig.from_hf(table["config"])
        coef = table["phases"][phase]["coefficients_ms"] if phase in PHASES else None
        if coef is None:
            raise ValueError(f"unknown phase {phase!r}; choose one of {', '.join(PHASES)}")
        c = {t: float(coef[t]) for t in LATENCY_TERMS}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a valid ppn cost table: {e}") from e
    if config.replace(layers=None) != units.config:
        raise ValueError(f"{path} was measured for another model shape ({config}) than this plan's ({units.config})")
    return Costs("ms", c["head"], c["kv_head"], c["attn_layer"], c["channel"] * units.group_widths.astype(np.float64),
                 c["mlp_layer"], c["base"])


@dataclasses.dataclass(frozen=True)
class LatencyCut:
    """A cut whose latency was measured against its target (`cut_to_latency`).

    Attributes:
        keep: the units kept.
        measured_ms: its measured milliseconds.
        asked_ms: the amount asked of the table for it (the target corrected by the measurements).
        measured_each: the milliseconds of every cut measured, in order; the first is the
            table's own cut of the target.
    """

    keep: KeepSet
    measured_ms: float
    asked_ms: float
    measured_each: tuple[float, ...]

    @property
    def rounds(self) -> int:
        """Cuts measured (1 when the table's own cut met the tolerance)."""
        return len(self.measured_each)


def cut_to_latency(model: Llama, plan, target_ms: float, costs: Costs, *, tolerance: float = 0.05,
                   max_rounds: int = 4, measure: Callable[[Llama], float]) -> LatencyCut:
    """Cuts `model` by `plan` to a measured latency of `target_ms`, within `tolerance`.

    The table's prediction (`plan.keep(ms, cost=costs)`) is the first guess; while the
    measured latency misses the target by more than `tolerance`, the blocks' share of
    what is asked is scaled by (target - base) / (measured - base) and the model cut and
    measured again, at most `max_rounds` cuts in all. A table fitted on other cuts
    mispredicts some shapes by 10-30% on a CPU (results/speed/latency_target.json);
    measuring the cut itself is what lands it.

    Args:
        measure: a pruned model -> its milliseconds (for example decode per token,
            `lambda m: measure_latency(m)["decode"]`).

    Returns:
        The last cut measured, or the one nearest the target if none met the tolerance.
    """
    from ppn.prune import prune

    full = costs.base + costs.of(plan.units.full())
    if not costs.base < target_ms <= full:
        raise ValueError(f"a target of {target_ms:.3g} ms: the table puts the dense model at {full:.3g} ms and its "
                         f"parts outside the blocks alone at {costs.base:.3g} ms")
    asked, best, each = target_ms, None, []
    for _ in range(max_rounds):
        keep = plan.keep(asked, cost=costs)
        each.append(ms := float(measure(prune(model, keep))))
        if best is None or abs(ms - target_ms) < abs(best[1] - target_ms):
            best = (keep, ms, asked)
        if abs(ms / target_ms - 1.0) <= tolerance or ms <= costs.base:
            break
        blocks = (asked - costs.base) * (target_ms - costs.base) / (ms - costs.base)
        asked = float(np.clip(costs.base + blocks, costs.base + 1e-6 * (full - costs.base), full))
    return LatencyCut(*best, tuple(each))
