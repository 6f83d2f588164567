"""The posterior: a plan is its posterior with provenance, ArviZ export, the marginals of
a low-rank guide, and recovery of planted useless units."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from flax import nnx

import ppn
from ppn.fit import FitConfig, fit
from ppn.plan import Plan
from ppn.posterior import Posterior
from ppn.testing import smoke_fit_config, tiny_model, tiny_tokens

TOKENS = tiny_tokens()
SMALL = smoke_fit_config()


def test_a_plan_is_its_posterior_with_provenance(tiny_fit, tiny_plan):
    posterior = Posterior.from_guide_params(tiny_fit.units, tiny_fit.config.prior, tiny_fit.guide_params)
    assert type(posterior) is Posterior and isinstance(tiny_plan, Posterior)
    assert tiny_plan.meta["train_tokens"] == tiny_fit.config.train_tokens
    for k, v in posterior.median_logits(0.4).items():
        np.testing.assert_array_equal(v, tiny_plan.median_logits(0.4)[k])
    assert posterior.summary(50) == tiny_plan.summary(50)


def test_arviz_export_has_named_dims(tiny_plan):
    idata = tiny_plan.to_arviz(num_samples=30)
    assert idata.posterior["alpha_head"].dims == ("chain", "draw", "layer", "head")
    assert idata.posterior["beta_mlp_group"].shape == (1, 30, 2, 3)


def test_lowrank_guide_gives_a_plan_of_its_marginals():
    from numpyro.infer.autoguide import AutoLowRankMultivariateNormal

    from ppn.svi import _network_model

    cfg = FitConfig(**{**SMALL.__dict__, "steps": 3, "guide": "lowrank", "init": "prior"})
    result = fit(tiny_model(), TOKENS, cfg, progress=False)
    plan = Plan.from_fit(result)
    # the guide's own per-site medians (constrained) equal the plan's site locations
    guide = AutoLowRankMultivariateNormal(_network_model(result.model, result.units, cfg, len(TOKENS)))
    batch = jnp.zeros((cfg.batch_size, cfg.seqlen + 1), jnp.int32)
    with numpyro.handlers.seed(rng_seed=0):
        guide(batch, jnp.float32(0.5), jnp.float32(0.5))
    medians = guide.median({k: jnp.asarray(v) for k, v in result.guide_params.items()})
    for name, site in plan.sites.items():
        expected = np.log(medians[name]) if site.positive else medians[name]
        np.testing.assert_allclose(site.loc, expected, rtol=1e-5, atol=1e-5, err_msg=name)
        assert np.all(site.scale > 0)
    assert plan.keep(0.5).num_params() <= plan.units.budget(0.5)


def test_synthetic_recovery_useless_units_are_dropped_first():
    """Units whose weights are zero contribute nothing; the fit must rank them last."""
    teacher = tiny_model(seed=7, num_kv_heads=4)
    graphdef, state = nnx.split(teacher)
    teacher = nnx.merge(graphdef, jax.tree.map(lambda x: x * 12.0 if x.ndim > 1 else x, state))
    dead_heads = [(0, 1), (1, 2)]
    for layer, head in dead_heads:
        o = teacher.blocks[layer].attn.o
        o[...] = o[...].at[:, head].set(0.0)
    for layer in (0, 1):
        down = teacher.blocks[layer].mlp.down
        down[...] = down[...].at[:, :16].set(0.0)  # group 0 of width 16
    tokens = ppn.generate(teacher, np.zeros((64, 1), np.int32), 63, temperature=1.0, seed=0).reshape(-1)
    # init="prior": every unit starts equal, so the ranking must come from SVI itself.
    cfg = FitConfig(steps=150, batch_size=8, seqlen=32, group_width=16, train_weights=False, lr_gates=0.05,
                    rho_min=0.3, init="prior")
    plan = Plan.from_fit(fit(teacher, tokens, cfg, progress=False))
    p = plan.keep_probability(0.5, num_samples=100)
    # Within its layer (the hierarchy pools units toward their layer, so a dead unit
    # of a vital layer may still outrank live units of a weak one), a dead unit is
    # less likely to be kept than the live ones.
    for layer, head in dead_heads:
        live = np.delete(p["head"][layer], head)
        assert p["head"][layer, head] < live.mean(), (layer, p["head"])
    for layer in (0, 1):
        assert p["mlp_group"][layer, 0] < p["mlp_group"][layer, 1:].mean(), p["mlp_group"]
    assert not plan.keep(0.5).groups[:, 0].any()

