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

Drafts (a pruned model, a shortlist head) and the choice of draft size and k:
`ppn.drafts`.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppn.generate import check_sampling, sample_logits, token_probs
from ppn.models.llama import KVCache, Llama


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


def check_prompt(prompt_ids, vocab_size: int) -> np.ndarray:
    """`prompt_ids` as an int32 array (B, T); ValueError unless it is 2-D integer, T >= 1, ids in [0, vocab_size)."""
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
    prompt = check_prompt(prompt_ids, target.config.vocab_size)
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
