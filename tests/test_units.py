"""Units and keep-sets: exact costs, KV heads counted once, budgets, rescaling factors."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ppn.testing import tiny_config
from ppn.units import KeepSet, Units


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


def test_a_keep_set_counts_a_kv_head_once_per_group():
    units = Units(tiny_config(), 16)  # 4 heads over 2 KV heads
    heads = np.array([[True, True, False, False], [True, False, True, False]])
    keep = KeepSet(units, np.ones(2, bool), np.ones(2, bool), heads, np.ones((2, 3), bool))
    np.testing.assert_array_equal(keep.kv_kept(), [[True, False], [True, True]])
    shapes = keep.layer_shapes()
    assert shapes[0].q_to_kv == (0, 0) and shapes[1].q_to_kv == (0, 1)


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


def test_keep_set_scales_are_checked():
    units = Units(tiny_config(), 16)
    full = units.full()
    with pytest.raises(ValueError, match="scales"):
        KeepSet(units, full.attn, full.mlp, full.heads, full.groups, {"head": np.ones((2, 4))})
    bad = {k: np.ones(s) for k, s in units.shapes().items()} | {"head": np.full((2, 4), np.nan)}
    with pytest.raises(ValueError, match="non-finite"):
        KeepSet(units, full.attn, full.mlp, full.heads, full.groups, bad)



def _random_keep(units, seed):
    rng = np.random.default_rng(seed)
    L, N, M = units.num_layers, units.num_heads, units.num_groups
    return KeepSet(units, rng.random(L) < 0.8, rng.random(L) < 0.8, rng.random((L, N)) < 0.5, rng.random((L, M)) < 0.5)


@pytest.mark.parametrize("seed", range(4))
def test_costs_in_each_currency_price_a_keep_set(seed):
    units = Units(tiny_config(), group_width=16)
    keep = _random_keep(units, seed)
    assert units.costs("params").of(keep) == keep.num_params()
    assert units.costs("bytes", dtype="bfloat16").of(keep) == 2 * keep.num_params()
    assert units.costs("bytes", dtype="float32").of(keep) == 4 * keep.num_params()
    # FLOPs per token: two per weight of the kept blocks, plus every kept query head's
    # scores and weighted sum over the context (4 * context * head_dim)
    heads = keep.effective().heads.sum()
    c = units.config
    assert units.costs("flops", context=100).of(keep) == 2 * keep.num_params() + heads * 4 * 100 * c.head_dim
    # outside the blocks: the output head and the final norm (the embedding lookup multiplies nothing)
    assert units.costs("flops").base == 2 * (c.vocab_size * c.hidden_size + c.hidden_size)
    assert units.costs("params").base == c.num_params() - c.num_prunable_params()


def test_costs_reject_an_unknown_currency_and_amounts_no_model_has():
    units = Units(tiny_config(), group_width=16)
    with pytest.raises(ValueError, match="unknown cost currency 'watts'"):
        units.costs("watts")
    costs = units.costs("bytes")
    with pytest.raises(ValueError, match="outside the blocks alone"):
        costs.budget(units, costs.base * 0.9)
    with pytest.raises(ValueError, match="the dense model has"):
        costs.budget(units, costs.base + costs.of(units.full()) + 10)
    with pytest.raises(ValueError, match="fraction in"):
        costs.budget(units, -0.5)


def test_units_refuse_a_size_currency_a_fit_cannot_push_toward():
    with pytest.raises(ValueError, match="params or flops, got 'bytes'"):
        Units(tiny_config(), 16, currency="bytes")
    with pytest.raises(ValueError, match="context must be a positive"):
        Units(tiny_config(), 16, currency="flops", context=0)
