"""Where a fit starts: Taylor and activation importances and the guide's starting locations."""

import numpy as np

import jax.numpy as jnp

from ppn.models.llama import BlockGates
from ppn.start import gate_gradients, guide_start, output_energies
from ppn.testing import smoke_fit_config, tiny_model, tiny_tokens
from ppn.units import KINDS, Units

TOKENS = tiny_tokens()


def test_taylor_importance_of_a_dead_unit_is_zero():
    model = tiny_model(seed=3)
    model.blocks[0].attn.o[...] = model.blocks[0].attn.o[...].at[:, 2].set(0.0)
    model.blocks[1].mlp.down[...] = model.blocks[1].mlp.down[...].at[:, 16:32].set(0.0)
    g = gate_gradients(model, Units(model.config, 16), [TOKENS[:34].reshape(2, 17)])
    assert g["head"][0, 2] == 0 and g["mlp_group"][1, 1] == 0
    assert (np.delete(g["head"][0], 2) > 0).all() and (g["mlp_group"][0] > 0).all()


def test_output_energy_is_each_units_share_of_the_residual_stream():
    model = tiny_model(seed=3)
    units = Units(model.config, 16)
    model.blocks[0].attn.o[...] = model.blocks[0].attn.o[...].at[:, 2].set(0.0)
    model.blocks[1].mlp.down[...] = model.blocks[1].mlp.down[...].at[:, 16:32].set(0.0)
    batch = TOKENS[:34].reshape(2, 17)
    e = output_energies(model, units, [batch])
    assert e["head"].shape == (2, 4) and e["mlp_group"].shape == (2, 3)
    assert e["head"][0, 2] == 0 and e["mlp_group"][1, 1] == 0
    assert (np.delete(e["head"][0], 2) > 0).all() and (e["mlp_group"][0] > 0).all()
    # a head's energy is the squared norm of what removing it takes from block 0's output
    block, ids = model.blocks[0], jnp.asarray(batch[:, :-1])
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    x = model.embed[...][ids]
    full = block.attn(block.input_norm(x), positions)[0]
    gates = jnp.ones(4).at[1].set(0.0)
    without = block.attn(block.input_norm(x), positions, head_gates=jnp.broadcast_to(gates, (2, 4)))[0]
    np.testing.assert_allclose(e["head"][0, 1], float(((full - without) ** 2).sum()), rtol=1e-4)
    # a group's energy: sum of hidden_c^2 ||down_c||^2 over its channels, on what the MLP reads (the residual
    # after the attention: the block with its MLP branch shut)
    mid = block(x, positions, gates=BlockGates(mlp=jnp.float32(0.0)))[0]
    hidden = block.mlp.hidden(block.post_attention_norm(mid))
    channel = np.asarray((hidden ** 2).sum((0, 1)) * (block.mlp.down[...] ** 2).sum(0))
    np.testing.assert_allclose(e["mlp_group"][0], channel.reshape(3, 16).sum(1), rtol=1e-4)


def test_an_activation_start_ranks_a_dead_unit_last():
    model = tiny_model(seed=3)
    model.blocks[1].mlp.down[...] = model.blocks[1].mlp.down[...].at[:, 16:32].set(0.0)
    start = guide_start(model, Units(model.config, 16), TOKENS, smoke_fit_config(init="activation"))
    assert start["eps_mlp_group"][1, 1] == start["eps_mlp_group"].min() == -3


def test_the_independent_prior_starts_from_the_same_ranking_as_the_hierarchical_one():
    model = tiny_model(seed=3)
    units = Units(model.config, 16)
    hier = guide_start(model, units, TOKENS, smoke_fit_config())
    ind = guide_start(model, units, TOKENS, smoke_fit_config(prior="independent"))
    assert set(hier) == {"delta", "eps_head", "eps_mlp_group"} and set(ind) == {f"alpha_{k}" for k in KINDS}
    tau = 0.6745  # both spreads at their prior median
    np.testing.assert_allclose(ind["alpha_attn_layer"], tau * hier["delta"][:, 0], rtol=1e-6)
    np.testing.assert_allclose(ind["alpha_head"] - ind["alpha_attn_layer"][:, None], tau * hier["eps_head"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ind["alpha_mlp_group"] - ind["alpha_mlp_layer"][:, None], tau * hier["eps_mlp_group"],
                               rtol=1e-5, atol=1e-6)
    assert guide_start(model, units, TOKENS, smoke_fit_config(prior="independent", init="prior")) == {}


def test_a_guide_without_a_start_begins_at_the_prior_medians():
    """Not at a median of a few random draws: the spreads at HalfNormal(1)'s 0.6745, the
    margin and the Normal sites at their means, whatever the seed."""
    from ppn.svi import init_fit

    for seed in (0, 1):
        setup, state = init_fit(tiny_model(), TOKENS, smoke_fit_config(init="prior", seed=seed))
        params = setup.svi.get_params(state.svi)
        for name in ("tau_layer", "tau_unit"):
            np.testing.assert_allclose(np.exp(params[f"{name}_auto_loc"]), 0.6745, rtol=1e-4, err_msg=name)
        np.testing.assert_allclose(params["layer_margin_auto_loc"], 3.0, rtol=1e-6)
        for name in ("delta", "eps_head", "eps_mlp_group", "zeta_head", "zeta_mlp_group"):
            np.testing.assert_array_equal(params[f"{name}_auto_loc"], 0.0, err_msg=name)
