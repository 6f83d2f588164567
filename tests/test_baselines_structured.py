"""Structured baselines: Block Influence layer removal, FLAP and Wanda-sp unit scores, random structure."""

import jax.numpy as jnp
import numpy as np
import pytest

import ppn
from ppn import prune
from ppn.harness.baselines.calibration import calibration_windows, layerwise
from ppn.harness.baselines.structured import (STRUCTURED_METHODS, prune_compensated, structured_keep, structured_scores,
                                      unit_scores)
from ppn.hf_format import hf_tensors
from ppn.units import KeepSet, Units
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


def test_a_random_structure_for_a_fit_in_flops_costs_the_same_flops():
    """The main job's random floor sits at the plan's size in the plan's currency."""
    model = tiny_model()
    units = Units(model.config, group_width=16, currency="flops", context=256)
    flops = units.size_costs
    unit = max(flops.head + flops.kv + flops.attn_fixed, flops.groups.max() + flops.mlp_fixed)
    for size in (0.3, 0.6):
        keep = structured_keep(model, "random", size, units=units)
        assert size * units.size_total - unit < flops.of(keep) <= size * units.size_total


# ------------------------------------------------------------- FLAP's bias compensation
# Two blocks, 4 heads, 3 MLP groups of 16. Block 0 is the first cut: it loses heads 1
# and 3 ("attention") or MLP groups 1 ("mlp"), with the other sub-layer whole, so its
# input is the dense model's. Block 1 loses units and a whole sub-layer, which is
# dropped without compensation.
CUTS = {
    "attention": dict(attn=[1, 1], mlp=[1, 0], heads=[[1, 0, 1, 0], [1, 1, 0, 1]], groups=[[1, 1, 1], [1, 1, 1]]),
    "mlp": dict(attn=[1, 0], mlp=[1, 1], heads=[[1, 1, 1, 1], [1, 1, 1, 1]], groups=[[1, 0, 1], [0, 1, 1]]),
}
DENSE_BIASES = {"no-biases": {}, "biases": dict(qkv_bias=True, o_bias=True, mlp_bias=True)}


@pytest.fixture(scope="module", params=DENSE_BIASES)
def calibrated(request):
    """A dense tiny model (with random biases or none), calibration windows and its stats."""
    model = tiny_model(seed=5, **DENSE_BIASES[request.param])
    windows = calibration_windows(np.random.default_rng(2).integers(0, 97, 2_000), num_windows=4, seqlen=16)
    return model, windows, layerwise(model, windows, progress=False)


def _cut(model, name):
    units = Units(model.config, group_width=16)
    return KeepSet(units, **{k: np.asarray(v, bool) for k, v in CUTS[name].items()})


def _block0_output_mean(model, windows, sublayer):
    """(D,) mean over the calibration tokens of block 0's attention or MLP output."""
    block = model.blocks[0]
    x = model.embed[...][jnp.asarray(windows)]
    positions = jnp.broadcast_to(jnp.arange(windows.shape[1]), windows.shape)
    y = block.attn(block.input_norm(x), positions)[0]
    if sublayer == "mlp":
        y = block.mlp(block.post_attention_norm(x + y))
    return np.asarray(y, np.float64).mean(axis=(0, 1))


def test_calibration_means_are_those_of_the_models_own_forward_pass(calibrated):
    """The input means the compensation uses, in block 1: the calibration pass applies
    every bias of block 0, the MLP's included, as the model does."""
    model, windows, stats = calibrated
    positions = jnp.broadcast_to(jnp.arange(windows.shape[1]), windows.shape)
    x = model.blocks[0](model.embed[...][jnp.asarray(windows)], positions)[0]
    block = model.blocks[1]
    heads = block.attn.head_outputs(block.input_norm(x), positions)[0]
    hidden = block.mlp.hidden(block.post_attention_norm(x + block.attn(block.input_norm(x), positions)[0]))
    for name, inputs in (("o_in", heads), ("down_in", hidden)):
        mean = np.asarray(inputs, np.float64).reshape(windows.size, -1).mean(0)
        np.testing.assert_allclose(stats[1].inputs[name].mean, mean, rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("sublayer", CUTS)
def test_compensation_keeps_the_mean_output_of_the_first_cut_sublayer(calibrated, sublayer):
    model, windows, stats = calibrated
    keep = _cut(model, sublayer)
    dense = _block0_output_mean(model, windows, sublayer)
    compensated = _block0_output_mean(prune_compensated(model, keep, stats), windows, sublayer)
    uncompensated = _block0_output_mean(prune(model, keep), windows, sublayer)
    shift = np.abs(uncompensated - dense).max()
    assert shift > 1e-3 * np.abs(dense).max()  # the cut does move the mean ...
    assert np.abs(compensated - dense).max() < 1e-4 * shift  # ... and the bias moves it back (float32 rounding)


@pytest.mark.parametrize("sublayer", CUTS)
def test_compensation_adds_only_the_output_biases(calibrated, sublayer):
    """Every tensor of the plain cut is unchanged but the o and down biases; the biases it
    turns on are zeros but those; the parameter count grows by exactly these biases."""
    model, _, stats = calibrated
    keep = _cut(model, sublayer)
    plain, compensated = prune(model, keep), prune_compensated(model, keep, stats)
    cut, had = plain.config, model.config
    # only the sub-layer kind that lost units gets an output bias (and a llama's attention_bias)
    assert compensated.config.o_bias == (had.o_bias or sublayer == "attention")
    assert compensated.config.qkv_bias == compensated.config.o_bias
    assert compensated.config.mlp_bias == (had.mlp_bias or sublayer == "mlp")
    assert compensated.config == cut.replace(o_bias=compensated.config.o_bias, qkv_bias=compensated.config.qkv_bias,
                                             mlp_bias=compensated.config.mlp_bias)
    before = dict(hf_tensors(plain))
    moved = {"self_attn.o_proj.bias": sublayer == "attention", "mlp.down_proj.bias": sublayer == "mlp"}
    added = 0
    for name, value in hf_tensors(compensated):
        value = np.asarray(value)
        was = np.asarray(before[name]) if name in before else np.zeros_like(value)
        added += 0 if name in before else value.size
        assert name in before or name.endswith(".bias"), name
        if moved.get(name.split(".", 3)[-1]):  # both kept sub-layers of the cut kind lost units
            assert not np.allclose(value, was), name
        else:
            np.testing.assert_array_equal(value, was, err_msg=name)
    assert ppn.count_params(compensated) == ppn.count_params(plain) + added
    assert compensated.config.num_params() == ppn.count_params(compensated)
    if not had.o_bias:  # D per kept attention, q, k, v biases of its kept heads; D and 2 F_l per kept MLP
        h, d = had.head_dim, had.hidden_size
        attn = sum(d + (s.num_heads + 2 * s.num_kv_heads) * h for s in cut.layer_shapes() if s.has_attention)
        mlp = sum(d + 2 * s.intermediate_size for s in cut.layer_shapes() if s.has_mlp)
        assert added == (attn if sublayer == "attention" else mlp)


def test_a_compensated_model_saves_and_reloads(calibrated, tmp_path):
    model, windows, stats = calibrated
    for sublayer in CUTS:
        compensated = prune_compensated(model, _cut(model, sublayer), stats)
        reloaded = ppn.load_model(ppn.save_model(compensated, tmp_path / sublayer))
        assert reloaded.config == compensated.config
        np.testing.assert_array_equal(np.asarray(reloaded(windows)), np.asarray(compensated(windows)))


def test_flap_keep_sets_compensate_at_every_size(setup):
    """From the search: the compensated model is the plain cut plus biases, of the promised size."""
    model, units, windows, stats = setup
    for size in SIZES:
        keep = structured_keep(model, "flap", size, stats=stats, units=units)
        plain, compensated = prune(model, keep), prune_compensated(model, keep, stats)
        assert plain.config.num_prunable_params() == keep.num_params()
        assert compensated.config.num_prunable_params() > keep.num_params()
        assert np.isfinite(np.asarray(compensated(windows))).all()


def test_compensation_refuses_stats_of_another_model(calibrated):
    model, _, stats = calibrated
    with pytest.raises(ValueError, match="stats cover 1 blocks"):
        prune_compensated(model, _cut(model, "mlp"), stats[:1])
    with pytest.raises(ValueError, match="another architecture"):
        prune_compensated(tiny_model(num_layers=4), _cut(model, "mlp"), stats)
