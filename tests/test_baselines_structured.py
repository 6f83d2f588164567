"""Structured baselines: Block Influence layer removal, FLAP and Wanda-sp unit scores, random structure."""

import jax.numpy as jnp
import numpy as np
import pytest

from ppn import prune
from ppn.baselines.calibration import calibration_windows, layerwise
from ppn.baselines.structured import STRUCTURED_METHODS, structured_keep, structured_scores, unit_scores
from ppn.gates import Units
from ppn.testing import tiny_model

SIZES = (0.9, 0.6, 0.35, 0.2)
IDENTITY_BLOCK = 2


def _zero_block(model, l):
    """Makes block l an identity map: its attention and MLP write nothing to the residual."""
    block = model.blocks[l]
    block.attn.o.set_value(jnp.zeros_like(block.attn.o[...]))
    block.mlp.down.set_value(jnp.zeros_like(block.mlp.down[...]))


@pytest.fixture(scope="module")
def setup():
    """A 4-block tiny model whose block 2 is the identity, its units (groups of 20, 20, 8
    channels), calibration windows and the dense model's stats."""
    model = tiny_model(num_layers=4)
    _zero_block(model, IDENTITY_BLOCK)
    units = Units(model.config, group_width=20)
    windows = calibration_windows(np.random.default_rng(0).integers(0, 97, 2_000), num_windows=4, seqlen=16)
    return model, units, windows, layerwise(model, windows, progress=False)


def test_block_influence_removes_the_identity_block_first(setup):
    model, units, _, stats = setup
    bi = structured_scores(model, "block_influence", stats=stats, units=units)["attn_layer"]
    assert abs(bi[IDENTITY_BLOCK]) < 1e-5
    assert np.argmin(bi) == IDENTITY_BLOCK and np.sort(bi)[1] > 1e-3
    block_cost = units.total // units.num_layers
    for size in (units.total - block_cost, 0.8):  # each removes exactly one block
        keep = structured_keep(model, "block_influence", size, stats=stats, units=units)
        expected = np.arange(units.num_layers) != IDENTITY_BLOCK
        np.testing.assert_array_equal(keep.attn, expected)
        np.testing.assert_array_equal(keep.mlp, expected)


@pytest.mark.parametrize("method", STRUCTURED_METHODS)
def test_keep_sets_build_models_of_the_promised_size(setup, method):
    model, units, _, stats = setup
    block_cost = units.total // units.num_layers
    unit_cost = max(units.head_cost + units.kv_cost + units.attn_fixed_cost,
                    int(units.group_costs.max()) + units.mlp_fixed_cost)
    slack = block_cost if method == "block_influence" else unit_cost
    for size in SIZES + (units.total // 2 + 1,):
        keep = structured_keep(model, method, size, stats=stats, units=units, seed=1)
        budget = units.budget(size)
        assert prune(model, keep).config.num_prunable_params() == keep.num_params()
        assert budget - slack < keep.num_params() <= budget, (size, keep.num_params(), budget)
        if method == "block_influence":
            np.testing.assert_array_equal(keep.attn, keep.mlp)
            np.testing.assert_array_equal(keep.heads, np.repeat(keep.attn[:, None], units.num_heads, 1))


def test_flap_and_wanda_scores_follow_their_definitions(setup):
    """Block 0's unit scores recomputed from its activations; the search scores are the
    means of channel scores standardised within each layer."""
    model, units, windows, stats = setup
    block = model.blocks[0]
    x = model.embed[...][jnp.asarray(windows)]
    positions = jnp.broadcast_to(jnp.arange(windows.shape[1]), windows.shape)
    heads = np.asarray(block.attn.head_outputs(block.input_norm(x), positions)[0], np.float64)
    h = x + np.einsum("BTNH,DNH->BTD", heads, block.attn.o[...])
    hidden = np.asarray(block.mlp.hidden(block.post_attention_norm(h)), np.float64)
    heads = heads.reshape(windows.size, -1)  # (tokens, N*H), head-major
    hidden = hidden.reshape(windows.size, -1)  # (tokens, F)
    o = np.asarray(block.attn.o[...], np.float64).reshape(units.config.hidden_size, -1)
    down = np.asarray(block.mlp.down[...], np.float64)
    edges = np.cumsum(units.group_widths)[:-1]

    def per_unit(o_ch, down_ch, reduce):
        return (reduce(o_ch.reshape(units.num_heads, -1), axis=1),
                np.array([reduce(g) for g in np.split(down_ch, edges)]))

    def standard(x):
        return (x - x.mean()) / x.std()

    channels = {
        "flap": (heads.var(0) * (o ** 2).sum(0), hidden.var(0) * (down ** 2).sum(0)),
        "wanda_structured": (np.linalg.norm(heads, axis=0) * np.abs(o).sum(0),
                             np.linalg.norm(hidden, axis=0) * np.abs(down).sum(0)),
    }
    for method, (o_ch, down_ch) in channels.items():
        raw = unit_scores(model, method, stats, units)
        head, group = per_unit(o_ch, down_ch, np.sum)
        np.testing.assert_allclose(raw["head"][0], head, rtol=1e-4)
        np.testing.assert_allclose(raw["mlp_group"][0], group, rtol=1e-4)
        scores = structured_scores(model, method, stats=stats, units=units)
        head, group = per_unit(standard(o_ch), standard(down_ch), np.mean)
        np.testing.assert_allclose(scores["head"][0], head, rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(scores["mlp_group"][0], group, rtol=1e-3, atol=1e-6)
        assert np.all(np.isposinf(scores["attn_layer"])) and np.all(np.isposinf(scores["mlp_layer"]))


def test_flap_drops_a_dead_head_first():
    model = tiny_model(seed=3, num_layers=2)
    layer, dead = 1, 2
    o = model.blocks[layer].attn.o
    o.set_value(o[...].at[:, dead].set(0.0))
    units = Units(model.config, group_width=16)
    windows = calibration_windows(np.random.default_rng(1).integers(0, 97, 2_000), num_windows=4, seqlen=16)
    stats = layerwise(model, windows, progress=False)
    heads = structured_scores(model, "flap", stats=stats, units=units)["head"]
    assert np.argmin(heads[layer]) == dead and heads.min() == heads[layer, dead]
    some_head_dropped = False
    for size in np.linspace(0.99, 0.3, 24):
        keep = structured_keep(model, "flap", float(size), stats=stats, units=units)
        if not keep.heads.all():
            some_head_dropped = True
            assert not keep.heads[layer, dead], size
    assert some_head_dropped


def test_bad_input_is_refused(setup):
    model, units, _, stats = setup
    with pytest.raises(ValueError, match="unknown structured method 'obs'.*block_influence"):
        structured_scores(model, "obs", stats=stats, units=units)
    for method in ("block_influence", "flap", "wanda_structured"):
        with pytest.raises(ValueError, match=f"method '{method}' needs calibration stats"):
            structured_keep(model, method, 0.5, units=units)
    with pytest.raises(ValueError, match="stats cover 3 blocks"):
        structured_scores(model, "flap", stats=stats[:3], units=units)
    with pytest.raises(ValueError, match="another architecture"):
        structured_scores(model, "random", units=Units(tiny_model().config, group_width=16))
    for size in (0, -0.5):
        with pytest.raises(ValueError, match=r"fraction in \(0, 1\]"):
            structured_keep(model, "random", size, units=units)
    with pytest.raises(ValueError, match="must be whole"):
        structured_keep(model, "random", 1.5, units=units)
    with pytest.raises(ValueError, match="exceeds"):
        structured_keep(model, "random", units.total + 1, units=units)


def test_random_is_seeded():
    model = tiny_model()
    units = Units(model.config, group_width=16)
    a, b, c = (structured_scores(model, "random", units=units, seed=s)["head"] for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
