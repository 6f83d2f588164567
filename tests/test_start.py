"""Where a fit starts: Taylor importances and the guide's starting locations."""

import numpy as np

from ppn.start import gate_gradients, guide_start
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
