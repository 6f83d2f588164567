"""Autoregressive generation with a key/value cache.

The prompt is encoded in one forward pass, then each new token costs one
single-position pass over the cache. The whole loop is a `jax.lax.scan` inside
one jitted function, so decoding never returns to Python between tokens and
compiles once per (batch, prompt length, max_new_tokens, sampling settings).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppn.models.llama import KVCache, Llama


def warp_logits(logits: jax.Array, temperature: float, top_k: int | None = None,
                top_p: float | None = None) -> jax.Array:
    """The float32 logits (B, V) that sampling draws from, for temperature > 0.

    Logits are divided by the temperature, then restricted (others set to -inf)
    to the `top_k` largest and to the smallest set whose probability reaches `top_p`.
    """
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep a token if the mass before it is below top_p (the first is always kept).
        keep_sorted = (cum - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def token_probs(logits: jax.Array, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None) -> jax.Array:
    """The distribution (B, V) that `sample_logits` draws from, given logits (B, V):
    one-hot on the argmax for temperature 0, else the softmax of `warp_logits`."""
    if temperature == 0.0:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(warp_logits(logits, temperature, top_k, top_p), axis=-1)


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None) -> jax.Array:
    """Draws token ids (B,) from logits (B, V).

    temperature 0 is greedy (argmax); otherwise a draw from `warp_logits`.
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, warp_logits(logits, temperature, top_k, top_p), axis=-1).astype(jnp.int32)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, vocab_size: int) -> None:
    """Raises ValueError unless the sampling settings are valid for a vocabulary of `vocab_size`."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size], got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate(graphdef, state, prompt, key, *, max_new_tokens, temperature, top_k, top_p):
    model = nnx.merge(graphdef, state)
    b, t = prompt.shape
    cache = KVCache.init(model.config, b, t + max_new_tokens, model.dtype)
    logits, cache = model.forward_with_cache(prompt, cache)
    keys = jax.random.split(key, max_new_tokens)
    first = sample_logits(logits[:, -1], keys[0], temperature, top_k, top_p)
    rest, _ = decode_loop(model, first, cache, keys[1:], temperature, top_k, top_p)
    return jnp.concatenate([prompt, first[:, None], rest], axis=1)


def decode_loop(model: Llama, token: jax.Array, cache: KVCache, keys: jax.Array, temperature: float = 0.0,
                top_k: int | None = None, top_p: float | None = None) -> tuple[jax.Array, KVCache]:
    """Feeds `token` (B,) after the cache and samples one token per key (keys (n,)):
    the n new tokens (B, n) and the cache with n more positions. A `lax.scan`, for
    use inside a jitted function."""

    def step(carry, k):
        token, cache = carry
        logits, cache = model.forward_with_cache(token[:, None], cache)
        nxt = sample_logits(logits[:, -1], k, temperature, top_k, top_p)
        return (nxt, cache), nxt

    (_, cache), tokens = jax.lax.scan(step, (token, cache), keys)
    return tokens.T, cache


def generate(model: Llama, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> np.ndarray:
    """Continues each prompt by `max_new_tokens` tokens.

    Args:
        model: the decoder.
        prompt_ids: int array (B, T) or (T,) of equal-length prompts.
        max_new_tokens: tokens to append (>= 1).
        temperature: 0 for greedy decoding, > 0 to sample.
        top_k, top_p: optional truncation of the sampling distribution.
        seed: PRNG seed of the sampling.

    Returns:
        int32 array (B, T + max_new_tokens) (or (T + max_new_tokens,) for a 1-D
        prompt): the prompts followed by the generated tokens.
    """
    prompt = np.asarray(prompt_ids, np.int32)
    squeeze = prompt.ndim == 1
    prompt = prompt[None] if squeeze else prompt
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt_ids must have shape (B, T) or (T,) with T >= 1, got {np.shape(prompt_ids)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p, model.config.vocab_size)
    if prompt.min() < 0 or prompt.max() >= model.config.vocab_size:
        raise ValueError(f"prompt token ids must lie in [0, {model.config.vocab_size})")
    graphdef, state = nnx.split(model)
    out = _generate(graphdef, state, jnp.asarray(prompt), jax.random.key(seed),
                    max_new_tokens=max_new_tokens, temperature=float(temperature),
                    top_k=top_k, top_p=top_p)
    out = np.asarray(out)
    return out[0] if squeeze else out
