"""Speculative decoding: greedy parity with the target, the sampled distribution,
cache rollback, bad input, and the experiment's smoke run."""

import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

import ppn
from ppn.harness.baselines.structured import structured_keep
from ppn.units import Units
from ppn.generate import token_probs
from ppn.drafts import ShortlistDraft, draft_from_plan
from ppn.speculative import _init, _round, _speculative, speculative_generate
from ppn.testing import random_plan, tiny_model

# The shapes of the experiment's smoke run, so that compiled functions are shared.
PROMPT = np.random.default_rng(0).integers(0, 97, (1, 16)).astype(np.int32)
NEW, K = 16, 4


@pytest.fixture(scope="module")
def target():
    return tiny_model(0)


@pytest.fixture(scope="module")
def reference(target):
    return ppn.generate(target, PROMPT, NEW)


@pytest.fixture(scope="module")
def plan(target):
    return random_plan(target.config)


def _draft(kind, target, plan):
    if kind == "other random model":
        return tiny_model(1)
    if kind == "the target itself":
        return target
    if kind == "random structure at 0.5":
        return ppn.prune(target, structured_keep(target, "random", 0.5, units=Units(target.config, group_width=16)))
    if kind == "plan at 0.5, 40-token shortlist":
        return draft_from_plan(target, plan, 0.5, shortlist=np.arange(0, 97, 97 / 40).astype(int))
    return draft_from_plan(target, plan, 0.5)


# ------------------------------------------------------------------- greedy
@pytest.mark.parametrize("kind, k", [("other random model", K), ("the target itself", K),
                                     ("random structure at 0.5", 1), ("plan at 0.5", K),
                                     ("plan at 0.5, 40-token shortlist", K)])
def test_greedy_equals_the_targets_greedy_output(target, reference, plan, kind, k):
    draft = _draft(kind, target, plan)
    result = speculative_generate(target, draft, PROMPT, NEW, num_draft_tokens=k)
    np.testing.assert_array_equal(result.tokens, reference)
    assert result.proposed == k * (result.target_calls - 1)
    assert result.target_calls - 1 <= NEW - 1  # every round commits at least one token
    if kind == "the target itself":
        assert result.acceptance_rate == 1.0
        assert result.target_calls == 1 + -(-(NEW - 1) // (k + 1))  # k + 1 tokens per round
    if kind == "other random model":
        assert result.acceptance_rate < 0.5


# --------------------------------------------------------------- rollback
def _poison_stale_slots(cache):
    """Fills every slot at or past `length` with large values the mask must hide."""
    stale = (jnp.arange(cache.k[0].shape[1]) >= cache.length)[None, :, None, None]
    return ppn.KVCache([jnp.where(stale, 1e3, a) for a in cache.k], [jnp.where(stale, -1e3, a) for a in cache.v],
                       cache.length)


def test_caches_roll_back_to_the_committed_prefix(target, reference):
    draft, k = tiny_model(1), 3
    sampling = dict(k=k, temperature=0.0, top_k=None, top_p=None)
    (target_def, target_state), (draft_def, draft_state) = nnx.split(target), nnx.split(draft)
    init = jax.jit(lambda: _init(nnx.merge(target_def, target_state), nnx.merge(draft_def, draft_state),
                                 jnp.asarray(PROMPT), jax.random.key(0), max_new_tokens=NEW, **sampling))
    step = jax.jit(lambda s: _round(nnx.merge(target_def, target_state), nnx.merge(draft_def, draft_state), s,
                                    **sampling))
    s = init()
    end, rejections = PROMPT.shape[1] + NEW, 0
    while int(s.n) < end:
        s.target_cache, s.draft_cache = _poison_stale_slots(s.target_cache), _poison_stale_slots(s.draft_cache)
        before = int(s.n)
        s = step(s)
        n = int(s.n)
        rejections += n - before - 1 < k
        assert int(s.target_cache.length) == n - 1 and int(s.draft_cache.length) == n - 2
        np.testing.assert_array_equal(np.asarray(s.tokens[:, :min(n, end)]), reference[:, :min(n, end)])
    assert rejections > 0


# --------------------------------------------------------------- sampling
V = 8


def _sharp_model(seed):
    """A tiny model over 8 tokens whose next-token distributions are far from uniform."""
    model = tiny_model(seed, vocab_size=V)
    model.lm_head.set_value(model.lm_head.get_value() * 5.0)
    return model


def _exact_joint(model, prompt, temperature, top_k):
    """P(x3, x4) of the 3rd and 4th sampled tokens after `prompt` (1, T), summed over x1, x2: (V, V)."""
    t = prompt.shape[1]
    grid = np.stack(np.meshgrid(*[np.arange(V)] * 3, indexing="ij"), -1).reshape(-1, 3)  # every (x1, x2, x3)
    logits = model(jnp.asarray(np.concatenate([np.repeat(prompt, len(grid), 0), grid], 1)))
    p = [np.asarray(token_probs(logits[:, t - 1 + i], temperature, top_k), np.float64) for i in range(4)]
    p1, p2 = p[0][0], p[1].reshape(V, V, V, V)[:, 0, 0]
    p3, p4 = p[2].reshape(V, V, V, V)[:, :, 0], p[3].reshape(V, V, V, V)
    joint = np.einsum("a,ab,abc,abcd->cd", p1, p2, p3, p4).reshape(-1)
    return joint / joint.sum()


def _chisquare_pvalue(observed, probs):
    """Pearson's test of counts against probabilities, cells expecting < 5 merged."""
    expected = probs * observed.sum()
    big = expected >= 5
    obs, exp = list(observed[big]), list(expected[big])
    if expected[~big].sum() > 0:
        obs.append(observed[~big].sum())
        exp.append(expected[~big].sum())
    exp = np.asarray(exp) * observed.sum() / np.sum(exp)
    return stats.chisquare(np.asarray(obs), exp).pvalue


@pytest.mark.parametrize("shortlist", [None, (0, 1, 2, 4, 6)])
def test_sampled_tokens_follow_the_targets_distribution(shortlist):
    """Tokens 3 and 4 come out of accepted proposals, residual draws and bonus tokens
    (k = 2); their joint distribution must be the target's, not the draft's, also
    when the draft can propose only 5 of the 8 tokens."""
    target, draft = _sharp_model(0), _sharp_model(1)
    if shortlist is not None:
        draft = ShortlistDraft(draft, shortlist)
    prompt = np.random.default_rng(0).integers(0, V, (1, 5)).astype(np.int32)
    temperature, top_k, num = 0.9, 6, 20000
    target_def, target_state = nnx.split(target)
    draft_def, draft_state = nnx.split(draft)
    sample = jax.jit(jax.vmap(lambda key: _speculative(
        target_def, target_state, draft_def, draft_state, jnp.asarray(prompt), key, max_new_tokens=4, k=2,
        temperature=temperature, top_k=top_k, top_p=None)))
    tokens, accepted, rounds = sample(jax.random.split(jax.random.key(0), num))
    tokens = np.asarray(tokens)[:, 0, prompt.shape[1] + 2:]
    observed = np.bincount(tokens[:, 0] * V + tokens[:, 1], minlength=V * V)

    p, q = _exact_joint(target, prompt, temperature, top_k), _exact_joint(draft, prompt, temperature, top_k)
    assert 0.5 * np.abs(p - q).sum() > 0.3  # the draft is clearly another distribution
    assert 0.2 < float(accepted.sum()) / (2 * float(rounds.sum())) < 0.9  # so rejections happen
    assert observed[p == 0].sum() == 0  # nothing outside the target's top-k support
    assert _chisquare_pvalue(observed, p) > 1e-3
    if shortlist is None:
        assert _chisquare_pvalue(observed, q) < 1e-6  # the test can tell the two apart
    else:  # tokens the draft cannot propose come out (from the residual), as often as the target says
        assert observed[q == 0].sum() > 0.05 * num


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("prompt, kwargs, match", [
    (PROMPT, dict(num_draft_tokens=0), "num_draft_tokens must be >= 1"),
    (PROMPT, dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (PROMPT[0], {}, "2-D integer array"),
    (PROMPT.astype(np.float32), {}, "2-D integer array"),
    (np.zeros((1, 0), np.int32), {}, "2-D integer array"),
    (np.repeat(PROMPT, 2, 0), {}, "batch 1"),
    (PROMPT + 97, {}, r"must lie in \[0, 97\)"),
    (PROMPT, dict(temperature=-1.0), "temperature must be >= 0"),
])
def test_bad_input_is_refused(target, prompt, kwargs, match):
    kwargs = dict(max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=match):
        speculative_generate(target, target, prompt, **kwargs)


def test_a_draft_with_another_vocabulary_is_refused(target):
    with pytest.raises(ValueError, match="draft vocabulary .* differs"):
        speculative_generate(target, tiny_model(1, vocab_size=64), PROMPT, 4)


# ------------------------------------------------------------ the experiment
def test_experiment_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "speculative_experiment", Path(__file__).resolve().parents[1] / "experiments" / "speculative.py")
    experiment = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = experiment  # dataclasses resolve the Config's annotations through it
    spec.loader.exec_module(experiment)
    rows = experiment.main(experiment.Config(smoke=True, out_dir=str(tmp_path), **experiment.SMOKE))
    assert rows[0]["method"] == "target alone" and [r["method"][:5] for r in rows[-2:]] == ["auto:"] * 2
    assert [r["draft_size"] for r in rows[1:3]] == [0.3, 0.5]
    assert [r["draft_vocabulary"] for r in rows[1:]] == ["all"] * 3 + [48]
    assert all(r["matches_target"] == 1.0 and r["tokens_per_second"] > 0 for r in rows)
    assert all(0.0 <= r["acceptance_rate"] <= 1.0 for r in rows[1:])
    for name in ["speculative_smoke.json", "speculative_smoke.md", "speculative_smoke.png",
                 "speculative_smoke_choice.json"]:
        assert (tmp_path / name).exists(), name
    table = json.loads((tmp_path / "speculative_smoke_choice.json").read_text())["records"]
    assert len(table) == 2 * 2 * len(experiment.SMOKE["ks"])  # sizes x vocabularies x ks
    for vocab, row in (("all", rows[-2]), (48, rows[-1])):
        best = max((r for r in table if r["draft_vocabulary"] == vocab), key=lambda r: r["expected_speedup"])
        assert row["method"].startswith(f"auto: ρ={best['size']}, k={best['k']}")


# -------------------------------------------------------------- real model
@pytest.mark.slow
def test_real_model_greedy_with_a_pruned_draft():
    model = ppn.load_model(ppn.checkpoint.resolve_source("smollm2-135m"))
    draft = ppn.prune(model, structured_keep(model, "random", 0.5, units=Units(model.config)))
    tokenizer = ppn.load_tokenizer(ppn.checkpoint.resolve_source("smollm2-135m"))
    prompt = tokenizer("Shall I compare thee to a summer's day?", return_tensors="np")["input_ids"]
    result = speculative_generate(model, draft, prompt, 16, num_draft_tokens=4)
    np.testing.assert_array_equal(result.tokens, ppn.generate(model, prompt, 16))
