"""Drafts for speculative decoding, and the choice of draft size and k.

A plan fitted on a model's own weights gives drafts for free:
`draft_from_plan(target, plan, size)` is `prune(target, plan, size)`, optionally
with an output head that scores only a shortlist of frequent tokens
(`ShortlistDraft`, `frequent_tokens`). `choose_draft` picks the draft size and
k that maximise the expected speed-up of `ppn.speculative.speculative_generate`
(Leviathan et al. 2023), from a measured acceptance rate (`acceptance_alpha`)
and measured draft and verify costs (`forward_seconds`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppn.generate import generate, token_probs
from ppn.models.llama import KVCache, Llama
from ppn.prune import prune
from ppn.speculative import check_draft, check_prompt
from ppn.speed import time_call


class ShortlistDraft(nnx.Module):
    """A draft whose output head scores only a shortlist of the vocabulary.

    On a small model the output head is a large share of a decode step
    (SmolLM2-135M: 28M of its 135M parameters), and a pruned draft keeps all of
    it. Scoring only the tokens that occur most often in the training text (the
    "frequency-ranked" draft heads of FR-Spec, Zhao et al. 2025) cuts that cost;
    the other tokens get probability zero in the draft's distribution q. That
    keeps speculative decoding exact: the target still verifies every proposal,
    and a token outside the shortlist is produced from the residual max(0, p - q)
    when the target wants it. Only the acceptance rate can drop.

    Attributes:
        model: the draft network (e.g. `prune(target, plan, size)`).
        config: `model.config` (the vocabulary is the full one).
        token_ids: int32 (V',) the shortlist, ascending.
        head: (V', D) the output head's rows of the shortlist.
    """

    def __init__(self, model: Llama, token_ids):
        ids = np.unique(np.asarray(token_ids))
        if ids.size == 0 or not np.issubdtype(ids.dtype, np.integer) or ids[0] < 0 \
                or ids[-1] >= model.config.vocab_size:
            raise ValueError(f"a shortlist must be a non-empty set of token ids in [0, {model.config.vocab_size})")
        self.model = model
        self.config = model.config
        self.token_ids = nnx.Variable(jnp.asarray(ids, jnp.int32))
        head = model.embed if model.lm_head is None else model.lm_head
        self.head = nnx.Param(head[...][ids])

    @property
    def dtype(self):
        return self.model.dtype

    def _logits(self, x: jax.Array) -> jax.Array:
        """Full-vocabulary float32 logits (B, T, V) of hidden states x (B, T, D): -inf off the shortlist."""
        scores = jnp.einsum("BTD,VD->BTV", x, self.head[...], preferred_element_type=jnp.float32)
        full = jnp.full(scores.shape[:-1] + (self.config.vocab_size,), -jnp.inf, jnp.float32)
        return full.at[..., self.token_ids[...]].set(scores)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """Logits (B, T, V) for input_ids (B, T), every sequence starting at position 0."""
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        return self._logits(self.model.hidden(input_ids, positions)[0])

    def forward_with_cache(self, input_ids: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """As `Llama.forward_with_cache`, scoring the shortlist only."""
        positions = jnp.broadcast_to(cache.length + jnp.arange(input_ids.shape[1]), input_ids.shape)
        x, cache = self.model.hidden(input_ids, positions, cache)
        return self._logits(x), cache


def frequent_tokens(tokens, count: int) -> np.ndarray:
    """The `count` most frequent ids of a token stream (N,), ascending (ties broken
    by the smaller id): a `ShortlistDraft`'s shortlist. Take them from training text,
    never from the text decoding is measured on."""
    tokens = np.asarray(tokens).ravel()
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    freq = np.bincount(tokens)
    order = np.lexsort((np.arange(freq.size), -freq))  # by frequency, then id
    return np.sort(order[:min(count, int((freq > 0).sum()))])


def draft_from_plan(target: Llama, plan, size: float | int, shortlist=None) -> Llama | ShortlistDraft:
    """The draft for `target` at `size` of `plan`: `prune(target, plan, size)`.

    The plan was fitted on the target's own weights, so the draft needs no
    second checkpoint.

    Args:
        shortlist: token ids (e.g. `frequent_tokens(train_tokens, 8192)`): the
            draft scores only these (`ShortlistDraft`); None scores them all.

    Raises:
        ValueError: the plan belongs to another architecture, or the size is invalid.
    """
    draft = prune(target, plan, size)
    check_draft(target, draft)
    return draft if shortlist is None else ShortlistDraft(draft, shortlist)


# ------------------------------------------------------------ choosing a draft
@dataclasses.dataclass(frozen=True)
class DraftChoice:
    """The draft size and k of `choose_draft`, with every candidate's estimate.

    Attributes:
        size: the chosen draft size (fraction of prunable parameters, or a count).
        k: the chosen number of draft tokens per round.
        expected_speedup: its estimated tokens/s relative to the target alone
            (below 1: speculative decoding is not expected to pay).
        table: one dict per (size, k): size, k, alpha, cost_ratio, verify_ratio,
            expected_tokens_per_round, expected_speedup.
    """

    size: float | int
    k: int
    expected_speedup: float
    table: tuple[dict, ...]


def expected_tokens_per_round(alpha: float, k: int) -> float:
    """Leviathan et al.'s E[tokens per round] = (1 - alpha^(k+1)) / (1 - alpha), k + 1 at alpha = 1."""
    return float(k + 1) if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def expected_speedup(alpha: float, k: int, cost_ratio: float, verify_ratio: float = 1.0) -> float:
    """Leviathan et al.'s expected speed-up (1 - alpha^(k+1)) / ((1 - alpha)(k c + v)).

    Args:
        alpha: the expected acceptance probability of one proposal.
        k: proposals per round.
        cost_ratio: c, the time of one draft token over one target forward.
        verify_ratio: v, the time of the target's (k + 1)-token verify pass over
            one target forward; 1 in the paper (a memory-bound accelerator),
            above 1 where compute grows with the tokens (a CPU).
    """
    return expected_tokens_per_round(alpha, k) / (k * cost_ratio + verify_ratio)


@functools.partial(jax.jit, static_argnames=("target_def", "draft_def", "start", "temperature", "top_k", "top_p"))
def _overlap(target_def, target_state, draft_def, draft_state, seqs, *, start, temperature, top_k, top_p):
    """Mean over sequences (B, S) and positions >= start of sum_v min(p(v), q(v)):
    the probability that a proposal drawn from q is accepted (alpha)."""
    def probs(graphdef, state):
        logits = nnx.merge(graphdef, state)(seqs)[:, start - 1:-1]  # (B, S - start, V): predict tokens start..S-1
        return token_probs(logits.reshape(-1, logits.shape[-1]), temperature, top_k, top_p)

    return jnp.mean(jnp.sum(jnp.minimum(probs(target_def, target_state), probs(draft_def, draft_state)), axis=-1))


def acceptance_alpha(target: Llama, draft: Llama, prompts, new_tokens: int = 32, *, temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> float:
    """The expected acceptance probability alpha of `draft`'s proposals, on the
    text speculative decoding would see: the target's own continuations of `prompts`.

    Args:
        target, draft: the models (same vocabulary).
        prompts: int array (B, T) of equal-length prompts.
        new_tokens: continuation length generated by the target and scored.
        temperature, top_k, top_p, seed: sampling settings; greedy alpha is the
            fraction of positions where both argmaxes agree.
    """
    check_draft(target, draft)
    prompts = check_prompt(prompts, target.config.vocab_size)
    seqs = generate(target, prompts, new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    target_def, target_state = nnx.split(target)
    draft_def, draft_state = nnx.split(draft)
    return float(_overlap(target_def, target_state, draft_def, draft_state, jnp.asarray(seqs),
                          start=prompts.shape[1], temperature=float(temperature), top_k=top_k, top_p=top_p))


@functools.partial(jax.jit, static_argnames=("graphdef", "steps"))
def _forward_steps(graphdef, state, cache, chunk, *, steps):
    """`steps` forward passes of chunk (1, W) after the cache's `length` positions,
    each from the same cache (a decode or verify step, repeated for timing). Each
    pass's first token is the previous pass's argmax, so no pass can be hoisted."""
    model = nnx.merge(graphdef, state)

    def step(token, _):
        logits, _ = model.forward_with_cache(chunk.at[:, 0].set(token), cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), None

    return jax.lax.scan(step, chunk[:, 0], None, length=steps)[0]


def forward_seconds(model: Llama, width: int, context: int, steps: int = 16, repeats: int = 3) -> float:
    """Seconds of one cached forward pass of `width` tokens after `context` positions, batch 1."""
    cache = KVCache.init(model.config, 1, context + width, model.dtype)
    cache = dataclasses.replace(cache, length=jnp.int32(context))
    chunk = jnp.zeros((1, width), jnp.int32)
    graphdef, state = nnx.split(model)
    return time_call(lambda: _forward_steps(graphdef, state, cache, chunk, steps=steps).block_until_ready(),
                     steps, repeats).seconds / steps


def choose_draft(target: Llama, plan, prompts, sizes: Sequence[float | int] = (0.3, 0.5),
                 ks: Sequence[int] = (1, 2, 3, 4, 6, 8), *, size: float | int | None = None, k: int | None = None,
                 new_tokens: int = 32, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, shortlist=None) -> DraftChoice:
    """Picks the draft size and k with the highest expected speed-up.

    For each size, the draft `draft_from_plan(target, plan, size)` gets its
    acceptance probability alpha from `acceptance_alpha` on `prompts`, and its cost
    ratio c = (one draft decode step) / (one target decode step) from timed cached
    forward passes; each k adds the measured ratio v_k of the target's (k+1)-token
    verify pass to one decode step. The estimate is `expected_speedup(alpha, k,
    c, v_k)`: Leviathan et al.'s formula, with the verify cost measured rather than
    assumed to be one forward (v_k = 1 recovers it exactly).

    Args:
        target: the model to speed up.
        plan: a `ppn.Plan` fitted on the target.
        prompts: int array (B, T) of calibration prompts (keep them apart from
            the prompts speed is then reported on).
        sizes, ks: the candidates.
        size, k: fix either one instead of choosing it.
        new_tokens: tokens of target continuation scored per prompt for alpha.
        temperature, top_k, top_p: the sampling settings decoding will use.
        shortlist: the drafts' shortlist of token ids (`draft_from_plan`).

    Returns:
        A `DraftChoice`.
    """
    sizes = (size,) if size is not None else tuple(sizes)
    ks = (k,) if k is not None else tuple(ks)
    if not sizes or not ks or min(ks) < 1:
        raise ValueError(f"need at least one size and one k >= 1, got sizes {sizes} and ks {ks}")
    prompts = check_prompt(prompts, target.config.vocab_size)
    context = prompts.shape[1] + new_tokens // 2  # a typical cache length while decoding
    target_step = forward_seconds(target, 1, context)
    verify = {kk: forward_seconds(target, kk + 1, context) / target_step for kk in ks}
    table = []
    for s in sizes:
        draft = draft_from_plan(target, plan, s, shortlist)
        alpha = acceptance_alpha(target, draft, prompts, new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p)
        c = forward_seconds(draft, 1, context) / target_step
        table += [{"size": s, "k": kk, "alpha": alpha, "cost_ratio": c, "verify_ratio": verify[kk],
                   "expected_tokens_per_round": expected_tokens_per_round(alpha, kk),
                   "expected_speedup": expected_speedup(alpha, kk, c, verify[kk])} for kk in ks]
    best = max(table, key=lambda r: r["expected_speedup"])
    return DraftChoice(best["size"], best["k"], best["expected_speedup"], tuple(table))
