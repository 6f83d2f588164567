"""Speculative decoding: a pruned draft proposes, the target verifies.

The algorithm of Leviathan et al. (2023) and Chen et al. (2023). Each round the
draft proposes k tokens autoregressively with its own KV cache; the target scores
all k proposals plus one bonus position in one forward pass of k + 1 tokens. The
i-th proposal d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)) (p the
target's and q the draft's sampling distribution); at the first rejection a token
is drawn from the residual norm(max(0, p_i - q_i)) and the round ends; if all k are
accepted a bonus token is drawn from p_{k+1}. Every round therefore yields
between 1 and k + 1 tokens, whose distribution is exactly the target's. Greedy
decoding is the case where p and q are one-hot on their argmax: a proposal is
kept iff it is the target's argmax, and the target's argmax replaces the first
one that is not, so the output equals the target's own greedy output.

Both caches roll back by lowering `length`: between rounds the target's cache
holds every committed token but the last, the draft's every one but the last two.
The draft's first call of a round feeds those two tokens, so a round whose k
proposals were all accepted (the last of them never fed to the draft) needs no
extra draft call. The whole loop is one jitted `lax.while_loop`, compiled once per
(models, prompt length, max_new_tokens, k, sampling settings).

`choose_draft` picks the draft size and k that maximise the expected speed-up,
from a measured acceptance rate and measured costs.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppn.generate import check_sampling, generate, sample_logits, token_probs
from ppn.models.llama import KVCache, Llama
from ppn.prune import prune
from ppn.speed import time_call


@dataclasses.dataclass(frozen=True)
class SpeculativeResult:
    """The output of `speculative_generate`.

    Attributes:
        tokens: int32 (1, T + max_new_tokens): the prompt followed by the new tokens.
        accepted: draft proposals the target accepted, over all rounds.
        proposed: draft proposals made (k per round).
        target_calls: target forward passes (the prompt's prefill and one per round).
        seconds: wall time of the call (the first call for a shape also compiles).
    """

    tokens: np.ndarray
    accepted: int
    proposed: int
    target_calls: int
    seconds: float

    @property
    def acceptance_rate(self) -> float:
        """accepted / proposed (nan when no round ran, i.e. max_new_tokens == 1)."""
        return self.accepted / self.proposed if self.proposed else float("nan")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _State:
    """The decoding loop's carry.

    Attributes:
        tokens: int32 (1, T + max_new_tokens + k + 1), committed tokens in [0, n);
            slots past n hold scratch that later rounds overwrite.
        n: int32 scalar, the number of committed tokens (prompt included).
        target_cache: holds the first n - 1 committed tokens.
        draft_cache: holds the first n - 2 committed tokens.
        key: PRNG key of the next round.
        accepted, rounds: int32 counters.
    """

    tokens: jax.Array
    n: jax.Array
    target_cache: KVCache
    draft_cache: KVCache
    key: jax.Array
    accepted: jax.Array
    rounds: jax.Array


def _init(target: Llama, draft: Llama, prompt: jax.Array, key: jax.Array, *, max_new_tokens: int, k: int,
          temperature: float, top_k: int | None, top_p: float | None) -> _State:
    """Prefills both caches with the prompt (1, T) and draws the first new token from the target."""
    t = prompt.shape[1]
    slots = t + max_new_tokens + k  # the last round may write k positions past the end
    target_cache = KVCache.init(target.config, 1, slots, target.dtype)
    draft_cache = KVCache.init(draft.config, 1, slots, draft.dtype)
    logits, target_cache = target.forward_with_cache(prompt, target_cache)
    _, draft_cache = draft.forward_with_cache(prompt, draft_cache)
    key, sub = jax.random.split(key)
    first = sample_logits(logits[:, -1], sub, temperature, top_k, top_p)
    tokens = jnp.zeros((1, slots + 1), jnp.int32).at[:, :t].set(prompt).at[:, t].set(first)
    zero = jnp.zeros((), jnp.int32)
    return _State(tokens, jnp.int32(t + 1), target_cache, dataclasses.replace(draft_cache, length=jnp.int32(t - 1)),
                  key, zero, zero)


def _round(target: Llama, draft: Llama, s: _State, *, k: int, temperature: float, top_k: int | None,
           top_p: float | None) -> _State:
    """One propose-verify round: commits 1 to k + 1 tokens and rolls both caches back."""
    key, draft_key, accept_key, final_key = jax.random.split(s.key, 4)
    draft_keys = jax.random.split(draft_key, k)

    # Draft: the two newest committed tokens (the older one was never fed when the
    # previous round accepted everything), then each proposal in turn.
    logits, draft_cache = draft.forward_with_cache(jax.lax.dynamic_slice_in_dim(s.tokens, s.n - 2, 2, axis=1),
                                                   s.draft_cache)

    def propose(carry, step_key):
        logits, cache = carry
        token = sample_logits(logits, step_key, temperature, top_k, top_p)
        nxt, cache = draft.forward_with_cache(token[:, None], cache)
        return (nxt[:, -1], cache), (token[0], logits[0])

    (last_logits, draft_cache), (tokens, draft_logits) = jax.lax.scan(
        propose, (logits[:, -1], draft_cache), draft_keys[:-1])
    proposals = jnp.concatenate([tokens, sample_logits(last_logits, draft_keys[-1], temperature, top_k, top_p)])
    q = token_probs(jnp.concatenate([draft_logits, last_logits]), temperature, top_k, top_p)  # (k, V)

    # Target: the newest committed token and the k proposals, one pass.
    chunk = jnp.concatenate([jax.lax.dynamic_slice_in_dim(s.tokens[0], s.n - 1, 1), proposals])[None]
    target_logits, target_cache = target.forward_with_cache(chunk, s.target_cache)
    p = token_probs(target_logits[0], temperature, top_k, top_p)  # (k + 1, V)

    # Accept d_i iff u_i < p_i(d_i) / q_i(d_i); q_i(d_i) > 0 since d_i was drawn from q_i.
    idx = jnp.arange(k)
    ok = jax.random.uniform(accept_key, (k,)) * q[idx, proposals] < p[idx, proposals]
    j = jnp.sum(jnp.cumprod(ok)).astype(jnp.int32)  # proposals accepted before the first rejection
    # Row j of max(0, p - q) with a zero row appended to q: the residual, or p_{k+1} itself as the bonus.
    residual = jnp.maximum(p - jnp.concatenate([q, jnp.zeros_like(q[:1])]), 0.0)[j]
    # A rejection implies p_j != q_j, so the residual has mass; guard against rounding anyway.
    residual = jnp.where(residual.sum() > 0, residual, p[j])
    final = jax.random.categorical(final_key, jnp.log(residual)).astype(jnp.int32)

    out = jnp.concatenate([proposals, jnp.zeros((1,), jnp.int32)]).at[j].set(final)
    n = s.n + j + 1
    return _State(
        tokens=jax.lax.dynamic_update_slice_in_dim(s.tokens, out[None], s.n, axis=1),
        n=n,
        target_cache=dataclasses.replace(target_cache, length=n - 1),
        draft_cache=dataclasses.replace(draft_cache, length=n - 2),
        key=key, accepted=s.accepted + j, rounds=s.rounds + 1)


@functools.partial(jax.jit, static_argnames=("target_def", "draft_def", "max_new_tokens", "k", "temperature",
                                             "top_k", "top_p"))
def _speculative(target_def, target_state, draft_def, draft_state, prompt, key, *, max_new_tokens, k, temperature,
                 top_k, top_p):
    """The whole decoding loop; returns (tokens (1, T + max_new_tokens), accepted, rounds)."""
    target, draft = nnx.merge(target_def, target_state), nnx.merge(draft_def, draft_state)
    sampling = dict(k=k, temperature=temperature, top_k=top_k, top_p=top_p)
    s = _init(target, draft, prompt, key, max_new_tokens=max_new_tokens, **sampling)
    end = prompt.shape[1] + max_new_tokens
    s = jax.lax.while_loop(lambda s: s.n < end, lambda s: _round(target, draft, s, **sampling), s)
    return s.tokens[:, :end], s.accepted, s.rounds


def check_draft(target: Llama, draft: Llama) -> None:
    """Raises ValueError unless `draft` can draft for `target` (the same vocabulary)."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"draft vocabulary ({draft.config.vocab_size} tokens) differs from the target's "
                         f"({target.config.vocab_size} tokens); a draft must share the target's tokenizer")


def _check_prompt(prompt_ids, vocab_size: int) -> np.ndarray:
    prompt = np.asarray(prompt_ids)
    if prompt.ndim != 2 or not np.issubdtype(prompt.dtype, np.integer) or prompt.shape[1] == 0:
        raise ValueError(f"prompt_ids must be a 2-D integer array (B, T) with T >= 1, "
                         f"got shape {prompt.shape} dtype {prompt.dtype}")
    if prompt.min() < 0 or prompt.max() >= vocab_size:
        raise ValueError(f"prompt token ids must lie in [0, {vocab_size})")
    return prompt.astype(np.int32)


def speculative_generate(target: Llama, draft: Llama, prompt_ids, max_new_tokens: int, num_draft_tokens: int = 4,
                         *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                         seed: int = 0) -> SpeculativeResult:
    """Continues a prompt by `max_new_tokens` tokens of the target, drafted by `draft`.

    Greedy (temperature 0) output equals `ppn.generate(target, prompt_ids,
    max_new_tokens)` token for token (up to float ties: the target scores k + 1
    positions per pass instead of one); sampled output has exactly the
    distribution of `ppn.generate(target, ..., temperature, top_k, top_p)`, the
    draft's distribution being warped by the same settings.

    Args:
        target: the model whose output is produced.
        draft: a cheaper model with the same vocabulary (e.g. `draft_from_plan`).
        prompt_ids: int array (1, T); batch 1 only.
        max_new_tokens: tokens to append (>= 1).
        num_draft_tokens: k, proposals per round (>= 1).
        temperature, top_k, top_p: sampling settings, as for `ppn.generate`.
        seed: PRNG seed.

    Returns:
        A `SpeculativeResult`; `tokens` has shape (1, T + max_new_tokens).

    Raises:
        ValueError: a prompt that is not a 2-D integer array of batch 1 with ids in
            the vocabulary, max_new_tokens or num_draft_tokens below 1, invalid
            sampling settings, or a draft with another vocabulary.
    """
    check_draft(target, draft)
    prompt = _check_prompt(prompt_ids, target.config.vocab_size)
    if prompt.shape[0] != 1:
        raise ValueError(f"speculative decoding runs one sequence at a time (batch 1), got batch {prompt.shape[0]}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
    check_sampling(temperature, top_k, top_p, target.config.vocab_size)
    target_def, target_state = nnx.split(target)
    draft_def, draft_state = nnx.split(draft)
    start = time.perf_counter()
    tokens, accepted, rounds = _speculative(
        target_def, target_state, draft_def, draft_state, jnp.asarray(prompt), jax.random.key(seed),
        max_new_tokens=max_new_tokens, k=num_draft_tokens, temperature=float(temperature), top_k=top_k, top_p=top_p)
    tokens = np.asarray(tokens)
    seconds = time.perf_counter() - start
    rounds = int(rounds)
    return SpeculativeResult(tokens, int(accepted), rounds * num_draft_tokens, rounds + 1, seconds)


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
    prompts = _check_prompt(prompts, target.config.vocab_size)
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
    prompts = _check_prompt(prompts, target.config.vocab_size)
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
