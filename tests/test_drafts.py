"""Drafts: the shortlist head and its token counts, the expected speed-up, and the draft choice."""

import jax.numpy as jnp
import numpy as np
import pytest
from test_speculative import K, NEW, PROMPT, plan, target  # noqa: F401  (fixtures; the smoke run's shapes)

from ppn.drafts import ShortlistDraft, choose_draft, expected_speedup, expected_tokens_per_round, frequent_tokens


# ------------------------------------------------------------ shortlist drafts
def test_frequent_tokens_and_the_shortlist_draft_logits(target):
    tokens = np.array([5, 3, 5, 9, 3, 5, 1, 9, 9, 9])
    np.testing.assert_array_equal(frequent_tokens(tokens, 2), [5, 9])
    np.testing.assert_array_equal(frequent_tokens(tokens, 3), [3, 5, 9])
    np.testing.assert_array_equal(frequent_tokens(tokens, 99), [1, 3, 5, 9])  # only tokens that occur
    ids = np.array([3, 7, 50, 96])
    draft = ShortlistDraft(target, ids[::-1])
    full, short = np.asarray(target(jnp.asarray(PROMPT))), np.asarray(draft(jnp.asarray(PROMPT)))
    np.testing.assert_array_equal(np.asarray(draft.token_ids[...]), ids)
    np.testing.assert_allclose(short[..., ids], full[..., ids], rtol=1e-6, atol=1e-6)
    assert np.isneginf(np.delete(short, ids, axis=-1)).all()
    everything = ShortlistDraft(target, np.arange(97))
    np.testing.assert_allclose(np.asarray(everything(jnp.asarray(PROMPT))), full, rtol=1e-6, atol=1e-6)
    for bad in ([], [0, 97], [-1, 4]):
        with pytest.raises(ValueError, match="shortlist"):
            ShortlistDraft(target, np.asarray(bad, np.int64))
    with pytest.raises(ValueError, match="count"):
        frequent_tokens(tokens, 0)


# --------------------------------------------------------- choosing a draft
def test_expected_speedup_follows_leviathan():
    assert expected_tokens_per_round(1.0, 4) == 5.0
    assert expected_tokens_per_round(0.0, 4) == 1.0
    assert expected_tokens_per_round(0.5, 2) == pytest.approx(1.75)
    assert expected_speedup(0.5, 2, 0.1) == pytest.approx(1.75 / 1.2)
    assert expected_speedup(0.5, 2, 0.1, verify_ratio=2.0) == pytest.approx(1.75 / 2.2)


def test_choose_draft_with_size_and_k_fixed(target, plan):
    choice = choose_draft(target, plan, PROMPT, size=0.5, k=K, new_tokens=NEW)
    assert (choice.size, choice.k) == (0.5, K) and len(choice.table) == 1
    row = choice.table[0]
    assert 0.0 <= row["alpha"] <= 1.0 and row["cost_ratio"] > 0 and row["verify_ratio"] > 0
    assert choice.expected_speedup == pytest.approx(
        expected_speedup(row["alpha"], K, row["cost_ratio"], row["verify_ratio"]))
