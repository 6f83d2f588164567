"""The pruning function: exact sizes and masked == pruned."""

import dataclasses

import numpy as np
import pytest

import ppn
from ppn.gates import hard_gates
from ppn.prune import prune
from ppn.testing import random_plan, tiny_config, tiny_model
from ppn.units import KeepSet, Units

IDS = np.random.RandomState(0).randint(0, 97, (2, 24))


def random_keep(units: Units, rng: np.random.Generator, p: float = 0.6, scaled: bool = False) -> KeepSet:
    L, N, M = units.num_layers, units.num_heads, units.num_groups
    scales = {k: rng.uniform(0.5, 2.0, s) for k, s in units.shapes().items()} if scaled else None
    return KeepSet(units, rng.random(L) < 0.85, rng.random(L) < 0.85, rng.random((L, N)) < p, rng.random((L, M)) < p,
                   scales)


@pytest.mark.parametrize("overrides", [{}, dict(intermediate_size=50), dict(num_kv_heads=1),
                                       dict(qkv_bias=True, o_bias=True), dict(intermediate_size=50, mlp_bias=True),
                                       dict(tie_word_embeddings=True)])
def test_pruned_model_equals_hard_gated_model(overrides):
    model = tiny_model(seed=2, **overrides)
    units = Units(model.config, group_width=16)
    rng = np.random.default_rng(0)
    dense_rest = model.config.num_params() - units.total
    for i in range(4):
        keep = random_keep(units, rng, scaled=i % 2 == 1)  # odd: with rescaling folded into the weights
        pruned = prune(model, keep)
        np.testing.assert_allclose(np.asarray(pruned(IDS)), np.asarray(model(IDS, gates=hard_gates(keep))),
                                   atol=1e-5, rtol=0)
        assert ppn.count_params(pruned) == keep.num_params() + dense_rest
        assert pruned.config.num_prunable_params() == keep.num_params()


def test_pruning_everything_away_leaves_identity_blocks():
    model = tiny_model()
    units = Units(model.config, 16)
    keep = KeepSet(units, np.zeros(2, bool), np.zeros(2, bool), np.ones((2, 4), bool), np.ones((2, 3), bool))
    pruned = prune(model, keep)
    assert keep.num_params() == 0 and pruned.config.num_prunable_params() == 0
    np.testing.assert_allclose(np.asarray(pruned(IDS)), np.asarray(model(IDS, gates=hard_gates(keep))), atol=1e-5)


def test_prune_at_full_size_is_the_original():
    model = tiny_model(seed=4)
    pruned = prune(model, Units(model.config, 16).full())
    np.testing.assert_array_equal(np.asarray(pruned(IDS)), np.asarray(model(IDS)))
    for (name, a), (_, b) in zip(ppn.hf_format.hf_tensors(model), ppn.hf_format.hf_tensors(pruned)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_prune_refuses_a_keep_set_of_another_model():
    keep = Units(tiny_config(num_heads=8, num_kv_heads=2), 16).full()
    with pytest.raises(ValueError, match="another architecture"):
        prune(tiny_model(), keep)


def test_a_rescaled_plan_folds_its_factors_into_the_cut():
    """The plan's factors at the size change the cut model (they are not ignored),
    and the cut equals the gated network with the plan's hard, rescaled gates."""
    model = tiny_model(seed=5)
    plan = random_plan(model.config, seed=3, rescale=True)
    keep = plan.keep(0.5)
    assert keep.scales is not None and not np.allclose(keep.scales["head"], 1.0)
    pruned = prune(model, plan, 0.5)
    np.testing.assert_allclose(np.asarray(pruned(IDS)), np.asarray(model(IDS, gates=hard_gates(keep))), atol=1e-5)
    unscaled = prune(model, dataclasses.replace(keep, scales=None))
    assert np.abs(np.asarray(pruned(IDS)) - np.asarray(unscaled(IDS))).max() > 1e-3
