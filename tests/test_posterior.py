"""The posterior: a plan is its posterior with provenance, ArviZ export, the marginals of
a low-rank guide, recovery of planted useless units, and identified summaries."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
from flax import nnx

import ppn
from ppn.fit import FitConfig, fit
from ppn.plan import Plan
from ppn import bayes, priors
from ppn.posterior import CROSSING_GRID, Posterior, crossing_sizes
from ppn.testing import random_plan, smoke_fit_config, tiny_config, tiny_model, tiny_tokens
from ppn.units import Units

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
    assert idata.posterior["crossing_head"].shape == (1, 30, 2, 4) and idata.prior["alpha_head"].shape == (1, 30, 2, 4)
    assert "not MCMC" in idata.attrs["inference"]
    # the prior's draws are not the posterior's, and are draws: they vary from one to the next as the prior's do
    assert not np.allclose(idata.prior["alpha_head"].values, idata.posterior["alpha_head"].values)
    reference = []  # 200 independent draws of the prior, one seed each
    for i in range(200):
        with numpyro.handlers.seed(rng_seed=i):
            reference.append(priors.get_prior(tiny_plan.prior)(tiny_plan.units))
    for what, kind in ((0, "head"), (1, "mlp_group")):
        expected = np.std([np.asarray(r[what][kind]) for r in reference], axis=0)
        drawn = idata.prior[f"{('alpha', 'beta')[what]}_{kind}"].values[0].std(0)
        assert 0.7 < np.mean(drawn / expected) < 1.3, kind


def _fit_guide_unpack(cfg: FitConfig):
    """How the fit's own guide splits its flat latent vector (D,) into sites: the
    guide of `init_fit`, set up as every fit sets it up (inside jit)."""
    from ppn.svi import init_fit

    return init_fit(tiny_model(), TOKENS, cfg)[0].svi.guide._unpack_latent


def test_lowrank_guide_gives_a_plan_of_its_marginals():
    """Each site of the plan is the slice of the low-rank guide's vectors that the
    fit's guide itself reads as that site (not the prior's trace order, which an
    eagerly set-up guide would use)."""
    cfg = FitConfig(**{**SMALL.__dict__, "steps": 3, "guide": "lowrank", "init": "prior"})
    result = fit(tiny_model(), TOKENS, cfg, progress=False)
    plan = Plan.from_fit(result)
    unpack, p = _fit_guide_unpack(cfg), {k: jnp.asarray(v) for k, v in result.guide_params.items()}
    loc, scale = unpack(p["auto_loc"]), unpack(p["auto_scale"])
    factor = jax.vmap(unpack, in_axes=1, out_axes=-1)(p["auto_scale"][:, None] * p["auto_cov_factor"])
    for name, site in plan.sites.items():
        np.testing.assert_allclose(site.loc, loc[name], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(site.scale, scale[name], rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(site.factor, factor[name], rtol=1e-6, err_msg=name)
    assert plan.keep(0.5).num_params() <= plan.units.budget(0.5)


def test_a_lowrank_plan_keeps_the_guide_covariance_through_its_file(tmp_path):
    """Draws of the plan's latents (unconstrained, in the guide's site order) have the
    guide's covariance diag(s) (W W^T + I) diag(s), also after a save and load."""
    from ppn.posterior import prior_shapes

    units = Units(tiny_config(num_layers=2), 16)
    dim = sum(int(np.prod(v)) for v in prior_shapes(units, "hierarchical").values())
    rng = np.random.default_rng(0)
    params = {"auto_loc": rng.normal(0, 1, dim), "auto_scale": rng.uniform(0.1, 0.5, dim),
              "auto_cov_factor": rng.normal(0, 1, (dim, 2))}
    plan = Plan.from_guide_params(units, "hierarchical", params)
    loaded = Plan.load(plan.save(tmp_path / "plan.json"))
    s, w = params["auto_scale"], params["auto_cov_factor"]
    expected = s[:, None] * (w @ w.T + np.eye(dim)) * s[None, :]
    layout = sorted(prior_shapes(units, "hierarchical"))  # the guide's vector: sites sorted by name
    for p in (plan, loaded):
        draws = p.latent_draws(40_000, seed=3)
        flat = np.concatenate([draws[n].reshape(40_000, -1) for n in layout], 1)
        np.testing.assert_allclose(np.cov(flat.T), expected, atol=0.05 * np.abs(expected).max())
        np.testing.assert_allclose(np.concatenate([p.sites[n].sd.ravel() for n in layout]),
                                   np.sqrt(np.diag(expected)), rtol=2e-3)


def test_a_guide_a_user_registers_fits_and_its_plan_loads(tmp_path):
    """AutoDiagonalNormal (one flat vector) registered with a reader: the fit runs,
    the plan holds the guide's medians and round-trips through its file."""
    from numpyro.infer.autoguide import AutoDiagonalNormal

    from ppn import posterior, svi

    def read(units, prior, params):
        return posterior.flat_sites(units, prior, params["auto_loc"], params["auto_scale"])

    svi.register_guide("diagonal", AutoDiagonalNormal, read)
    try:
        with pytest.raises(ValueError, match="'diagonal' is registered already"):
            svi.register_guide("diagonal", AutoDiagonalNormal)
        result = fit(tiny_model(), TOKENS, FitConfig(**{**SMALL.__dict__, "steps": 2, "guide": "diagonal"}),
                     progress=False)
        plan = Plan.from_fit(result)
        loc = _fit_guide_unpack(result.config)(jnp.asarray(result.guide_params["auto_loc"]))
        for name, site in plan.sites.items():
            np.testing.assert_allclose(site.loc, loc[name], rtol=1e-6, err_msg=name)
        loaded = Plan.load(plan.save(tmp_path / "plan.json"))
        assert loaded.keep(0.5) == plan.keep(0.5)
        with pytest.raises(ValueError, match="registered with a reader"):  # read as AutoNormal, it is not one
            Plan.from_guide_params(plan.units, plan.prior, result.guide_params)
    finally:
        svi.GUIDES.pop("diagonal", None)
        posterior.SITE_READERS.pop("diagonal", None)
    with pytest.raises(ValueError, match="unknown guide 'diagonal'"):
        FitConfig(guide="diagonal")


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
                    rho_min=0.3, init="prior", diagnostics_every=0)
    plan = Plan.from_fit(fit(teacher, tokens, cfg, progress=False))
    # Each unit's median crossing size (the size below which it is more likely closed
    # than open): within its layer (the hierarchy pools units toward their layer, so a
    # dead unit of a vital layer may still outrank live units of a weak one), a dead
    # unit closes at a larger size than the live ones.
    cross = {k: np.median(v, 0) for k, v in plan.crossing_sizes(200).items()}
    for layer, head in dead_heads:
        live = np.delete(cross["head"][layer], head)
        assert cross["head"][layer, head] > live.mean(), (layer, cross["head"])
    for layer in (0, 1):
        assert cross["mlp_group"][layer, 0] > cross["mlp_group"][layer, 1:].mean(), cross["mlp_group"]
    assert not plan.keep(0.5).groups[:, 0].any()



# ------------------------------------------------------------- identification
@pytest.mark.parametrize("prior, site", [("hierarchical", "delta"), ("independent", None)])
def test_shifting_a_direction_the_data_cannot_see_changes_no_summary(prior, site):
    """A common shift of the layer deviations (or of every intercept of the independent
    prior) moves no gate: summaries, crossing sizes and keep-sets stay as they were."""
    plan = random_plan(tiny_config(num_layers=3), seed=4, prior=prior)
    names = [site] if site else [n for n in plan.sites if n.startswith("alpha_")]
    shifted = dataclasses.replace(plan, sites={
        n: dataclasses.replace(s, loc=s.loc + 2.5) if n in names else s for n, s in plan.sites.items()})
    a, b = plan.summary(60), shifted.summary(60)
    assert a.keys() == b.keys() and any(k.startswith("crossing_") for k in a)
    for k in a:
        np.testing.assert_allclose(np.asarray(b[k]["mean"]), np.asarray(a[k]["mean"]), atol=2e-3, err_msg=k)
    for size in (0.3, 0.7):
        assert plan.keep(size) == shifted.keep(size)


def test_crossing_sizes_ignore_a_common_shift_of_intercepts_or_slopes():
    plan = random_plan(tiny_config(num_layers=3), seed=5)
    alpha, beta = plan.draws(8)
    base = crossing_sizes(plan.units, alpha, beta)
    moved = crossing_sizes(plan.units, {k: v + 3.0 for k, v in alpha.items()}, {k: v + 0.8 for k, v in beta.items()})
    for k in base:
        np.testing.assert_allclose(moved[k], base[k], atol=1e-4, err_msg=k)
        assert ((base[k] >= CROSSING_GRID[0]) & (base[k] <= CROSSING_GRID[-1])).all()
    # a gate that crosses at rho is more likely closed below it and open above it
    p = plan.open_probability(0.5, num_samples=8)
    closed_at_half = {k: (base[k] > 0.5 + 0.02) for k in base}
    for k in base:
        assert (p[k][closed_at_half[k]] < 0.5 + 1e-3).all() and (p[k][base[k] < 0.5 - 0.02] > 0.5 - 1e-3).all()


def test_open_probabilities_give_the_target_size_in_every_draw():
    plan = random_plan(tiny_config(num_layers=3), seed=6)
    for size in (0.3, 0.8):
        p = plan.open_probability(size, num_samples=5)
        sizes = [float(bayes.expected_size(plan.units, {k: jnp.asarray(v[s], jnp.float32) for k, v in p.items()}))
                 for s in range(5)]
        np.testing.assert_allclose(np.asarray(sizes) / plan.units.total, size, atol=1e-4)


def test_a_map_fit_gives_a_plan_of_zero_spread(tmp_path):
    result = fit(tiny_model(), TOKENS, smoke_fit_config(guide="delta"), progress=False)
    plan = Plan.from_fit(result)
    assert all(not s.scale.any() for s in plan.sites.values())
    freq = plan.keep_frequency(0.5, num_samples=20)
    assert all(set(np.unique(v)) <= {0.0, 1.0} for v in freq.values())  # every draw is the MAP point
    loaded = Plan.load(plan.save(tmp_path / "map.json"))
    assert loaded.keep(0.5) == plan.keep(0.5) and loaded.sites.keys() == plan.sites.keys()
    # AutoDelta keeps positive sites in constrained space; the plan stores them unconstrained
    assert result.guide_params["tau_unit_auto_loc"] > 0
    np.testing.assert_allclose(plan.sites["tau_unit"].loc, np.log(result.guide_params["tau_unit_auto_loc"]), rtol=1e-6)


def test_undecided_share_counts_gates_the_posterior_leaves_open():
    plan = random_plan(tiny_config(num_layers=3), seed=4)
    sure = dataclasses.replace(plan, sites={n: dataclasses.replace(s, loc=s.loc * 50.0, scale=s.scale * 0.0)
                                            for n, s in plan.sites.items()})
    assert 0.0 <= sure.undecided_share(0.5) <= plan.undecided_share(0.5) <= 1.0
    p = np.concatenate([v.mean(0).ravel() for v in plan.open_probability(0.5, 200).values()])
    assert plan.undecided_share(0.5) == pytest.approx(((p > 0.05) & (p < 0.95)).mean())
