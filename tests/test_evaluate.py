"""Perplexity against its definition (experiments/BENCHMARK.md), on tiny models with known answers."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ppn.evaluate import PerplexityResult, perplexity


class TinyLM(nnx.Module):
    """Embedding then a linear head: logits depend on the current token only."""

    def __init__(self, vocab: int, dim: int, seed: int = 0, dtype=jnp.float32):
        rngs = nnx.Rngs(seed)
        # Scaled up so the logits are far from uniform and an off-by-one shows.
        self.embed = nnx.Param(3.0 * jax.random.normal(rngs.params(), (vocab, dim)))
        self.head = nnx.Param(jax.random.normal(rngs.params(), (dim, vocab)))
        self.bias = nnx.Param(jax.random.normal(rngs.params(), (vocab,)))
        self.dtype = dtype

    def __call__(self, ids):
        return (self.embed[...][ids] @ self.head[...] + self.bias[...]).astype(self.dtype)

    def numpy_logits(self, ids):
        embed, head, bias = (np.asarray(p[...], np.float64) for p in (self.embed, self.head, self.bias))
        return embed[ids] @ head + bias


class Bigram(nnx.Module):
    """Logits = log P(next | current) from a fixed table, shape (V, V)."""

    def __init__(self, log_probs):
        self.table = nnx.Param(jnp.asarray(log_probs, jnp.float32))

    def __call__(self, ids):
        return self.table[...][ids]


def reference_nll(logits_fn, tokens, seqlen, max_windows=None):
    """The definition, in float64: mean NLL of tokens 2..seqlen of every full window."""
    n = len(tokens) // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    windows = np.asarray(tokens[: n * seqlen]).reshape(n, seqlen)
    logits = logits_fn(windows)[:, :-1].astype(np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    picked = np.take_along_axis(logp, windows[:, 1:, None], axis=-1)[..., 0]
    return -picked.mean(), n


def test_matches_the_definition_with_a_padded_last_batch():
    model = TinyLM(vocab=37, dim=16)
    tokens = np.random.default_rng(0).integers(0, 37, 7 * 32 + 13)  # 7 windows, a 13-token tail
    result = perplexity(model, tokens, seqlen=32, batch_size=3, progress=False)  # 3 + 3 + (1 + 2 padding)
    nll, n = reference_nll(model.numpy_logits, tokens, 32)
    assert isinstance(result, PerplexityResult)
    assert (result.num_windows, result.num_tokens) == (7, 7 * 31)
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-5)
    assert result.perplexity > 3.0  # far from 1: the comparison above means something


def test_max_windows_takes_the_first_windows():
    model = TinyLM(vocab=37, dim=16, seed=1)
    tokens = np.random.default_rng(1).integers(0, 37, 10 * 16)
    result = perplexity(model, tokens, seqlen=16, max_windows=4, batch_size=4, progress=False)
    nll, _ = reference_nll(model.numpy_logits, tokens, 16, max_windows=4)
    assert (result.num_windows, result.num_tokens) == (4, 4 * 15)
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert perplexity(model, tokens, seqlen=16, max_windows=99, progress=False).num_windows == 10


def test_accepts_lists_jax_arrays_and_cut_windows():
    model = TinyLM(vocab=37, dim=16)
    tokens = np.random.default_rng(2).integers(0, 37, 5 * 8)
    expected = perplexity(model, tokens, seqlen=8, progress=False).nll
    assert perplexity(model, tokens.tolist(), seqlen=8, progress=False).nll == pytest.approx(expected, rel=1e-6)
    assert perplexity(model, jnp.asarray(tokens), seqlen=8, progress=False).nll == pytest.approx(expected, rel=1e-6)
    windows = tokens.reshape(5, 8)
    assert perplexity(model, windows, seqlen=8, progress=False).nll == pytest.approx(expected, rel=1e-6)


def test_uniform_model_has_perplexity_equal_to_the_vocabulary():
    model = Bigram(np.zeros((11, 11)))
    tokens = np.random.default_rng(3).integers(0, 11, 5 * 20 + 7)
    result = perplexity(model, tokens, seqlen=20, batch_size=2, progress=False)
    assert result.perplexity == pytest.approx(11.0, rel=1e-6)


def test_bigram_on_a_cycle_has_the_analytic_perplexity():
    # Tokens cycle 0, 1, ..., V-1, 0, ...; the model gives the true successor probability
    # p and spreads 1 - p over the rest, so every prediction costs -log p: perplexity 1/p.
    vocab, p = 9, 0.6
    probs = np.full((vocab, vocab), (1 - p) / (vocab - 1))
    probs[np.arange(vocab), (np.arange(vocab) + 1) % vocab] = p
    tokens = np.arange(6 * 25 + 3) % vocab
    result = perplexity(Bigram(np.log(probs)), tokens, seqlen=25, batch_size=4, progress=False)
    assert result.perplexity == pytest.approx(1 / p, rel=1e-6)
    assert result.nll == pytest.approx(-math.log(p), rel=1e-6)


def test_bfloat16_logits_take_a_float32_log_softmax():
    model = TinyLM(vocab=37, dim=16, dtype=jnp.bfloat16)
    tokens = np.random.default_rng(4).integers(0, 37, 4 * 32)
    result = perplexity(model, tokens, seqlen=32, batch_size=2, progress=False)

    def rounded_logits(windows):  # the bfloat16 logits themselves, taken exactly
        return np.asarray(model(jnp.asarray(windows, jnp.int32)).astype(jnp.float32), np.float64)

    nll, _ = reference_nll(rounded_logits, tokens, 32)
    assert result.nll == pytest.approx(nll, rel=1e-5)


TRACES = []


class TracedLM(TinyLM):
    """Records each trace: Python code in the jitted function runs only while tracing."""

    def __call__(self, ids):
        TRACES.append(ids.shape)
        return super().__call__(ids)


def test_compiles_once_across_batches_and_calls():
    TRACES.clear()
    tokens = np.random.default_rng(5).integers(0, 23, 9 * 16 + 5)
    perplexity(TracedLM(vocab=23, dim=8), tokens, seqlen=16, batch_size=4, progress=False)  # 4 + 4 + (1 + 3)
    assert TRACES == [(4, 16)]
    # Same structure, other weights, fewer windows: the compiled function is reused.
    perplexity(TracedLM(vocab=23, dim=8, seed=7), tokens, seqlen=16, max_windows=3, batch_size=4, progress=False)
    assert TRACES == [(4, 16)]


def test_progress_bar_can_be_silenced(capsys):
    tokens = np.arange(4 * 8) % 37
    perplexity(TinyLM(vocab=37, dim=16), tokens, seqlen=8, batch_size=2, progress=False)
    assert capsys.readouterr().err == ""
    perplexity(TinyLM(vocab=37, dim=16), tokens, seqlen=8, batch_size=2, progress=True)
    # shown unless the shell silences every bar (TQDM_DISABLE, read by tqdm at import; tests/test_cli.py runs both)
    assert ("perplexity" in capsys.readouterr().err) == ("TQDM_DISABLE" not in os.environ)


def test_errors():
    model = TinyLM(vocab=37, dim=16)
    with pytest.raises(ValueError, match="15 tokens make no window of 16"):
        perplexity(model, np.zeros(15, np.int32), seqlen=16, progress=False)
    with pytest.raises(ValueError, match="windows of 8 tokens given with seqlen=16"):
        perplexity(model, np.zeros((3, 8), np.int32), seqlen=16, progress=False)
    with pytest.raises(ValueError, match="seqlen must be at least 2"):
        perplexity(model, np.zeros(16, np.int32), seqlen=1, progress=False)
