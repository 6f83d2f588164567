"""Throughput measurements of the experiments/BENCHMARK.md protocol, for any `Llama` (dense or pruned).

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
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppn.generate import generate
from ppn.models.llama import Llama


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
