"""Throughput measurements of the BENCHMARK.md protocol, for any `Llama` (dense or pruned).

Each function compiles first (untimed), then reports the median of `repeats`
timed runs, blocking on the result so asynchronous dispatch is not mistaken for
speed. Ratios between models measured in the same process are what reports quote.
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


def prefill_throughput(model: Llama, batch: int = 4, seqlen: int = 512, repeats: int = 5,
                       seed: int = 0) -> Throughput:
    """Forward-only throughput on random token windows (B=batch, T=seqlen)."""
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, model.config.vocab_size, (batch, seqlen)),
                      jnp.int32)
    graphdef, state = nnx.split(model)
    return time_call(lambda: _logits(graphdef, state, ids).block_until_ready(), batch * seqlen, repeats)


def decode_throughput(model: Llama, prompt_len: int = 128, new_tokens: int = 128, repeats: int = 3,
                      seed: int = 0) -> Throughput:
    """Greedy decoding with the KV cache at batch 1: generated tokens per second
    (the prompt's prefill included in the time, as a user experiences it)."""
    prompt = np.random.default_rng(seed).integers(0, model.config.vocab_size, (1, prompt_len))
    return time_call(lambda: generate(model, prompt, new_tokens), new_tokens, repeats)


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
