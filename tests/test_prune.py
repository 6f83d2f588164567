"""Units, keep-sets and the pruning function: exact sizes and masked == pruned."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ppn
from ppn.units import KeepSet, Units
from ppn.prune import hard_gates, prune
from ppn.testing import random_plan, tiny_config, tiny_model

IDS = np.random.RandomState(0).randint(0, 97, (2, 24))


def random_keep(units: Units, rng: np.random.Generator, p: float = 0.6, scaled: bool = False) -> KeepSet:
    L, N, M = units.num_layers, units.num_heads, units.num_groups
    scales = {k: rng.uniform(0.5, 2.0, s) for k, s in units.shapes().items()} if scaled else None
    return KeepSet(units, rng.random(L) < 0.85, rng.random(L) < 0.85, rng.random((L, N)) < p, rng.random((L, M)) < p,
                   scales)


def test_costs_add_up_to_the_prunable_parameters():
    for config in [tiny_config(), tiny_config(intermediate_size=50, qkv_bias=True, o_bias=True),
                   tiny_config(intermediate_size=50, mlp_bias=True),
                   tiny_config(num_kv_heads=1), tiny_config(num_kv_heads=4)]:
        u = Units(config, group_width=16)
        full = u.full()
        by_cost = u.num_layers * (u.attn_fixed_cost + u.num_heads * u.head_cost + config.num_kv_heads * u.kv_cost
                                  + u.mlp_fixed_cost + int(u.group_costs.sum()))
        assert full.num_params() == by_cost == u.total == config.num_prunable_params()
        assert u.group_widths.sum() == config.intermediate_size


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
    for (name, a), (_, b) in zip(ppn.checkpoint.hf_tensors(model), ppn.checkpoint.hf_tensors(pruned)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_a_keep_set_counts_a_kv_head_once_per_group():
    units = Units(tiny_config(), 16)  # 4 heads over 2 KV heads
    heads = np.array([[True, True, False, False], [True, False, True, False]])
    keep = KeepSet(units, np.ones(2, bool), np.ones(2, bool), heads, np.ones((2, 3), bool))
    np.testing.assert_array_equal(keep.kv_kept(), [[True, False], [True, True]])
    shapes = keep.layer_shapes()
    assert shapes[0].q_to_kv == (0, 0) and shapes[1].q_to_kv == (0, 1)


def test_prune_refuses_a_keep_set_of_another_model():
    keep = Units(tiny_config(num_heads=8, num_kv_heads=2), 16).full()
    with pytest.raises(ValueError, match="another architecture"):
        prune(tiny_model(), keep)


@pytest.mark.parametrize("size, error, match", [
    (0, ValueError, "size must be"), (-0.3, ValueError, "size must be"), (float("nan"), ValueError, "size must be"),
    (1.5, ValueError, "must be whole"), (10**9, ValueError, "exceeds the model's"), ("half", TypeError, "number"),
])
def test_budget_rejects_bad_sizes(size, error, match):
    with pytest.raises(error, match=match):
        Units(tiny_config(), 16).budget(size)


@settings(max_examples=30, deadline=None)
@given(st.floats(0.01, 1.0))
def test_budget_of_a_fraction(size):
    u = Units(tiny_config(), 16)
    assert u.budget(size) == round(size * u.total)


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


def test_keep_set_scales_are_checked():
    units = Units(tiny_config(), 16)
    full = units.full()
    with pytest.raises(ValueError, match="scales"):
        KeepSet(units, full.attn, full.mlp, full.heads, full.groups, {"head": np.ones((2, 4))})
    bad = {k: np.ones(s) for k, s in units.shapes().items()} | {"head": np.full((2, 4), np.nan)}
    with pytest.raises(ValueError, match="non-finite"):
        KeepSet(units, full.attn, full.mlp, full.heads, full.groups, bad)
