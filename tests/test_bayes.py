"""The NumPyro model's pieces: the generalised likelihood with a teacher, gates
per sequence, size-dependent rescaling, the push offset, the expected size, and the priors."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
from numpyro.infer import Predictive, log_likelihood

import ppn
from ppn import bayes, gates, priors, svi
from ppn.fit import FitConfig
from ppn.testing import tiny_config, tiny_model, tiny_tokens
from ppn.units import RESCALE_KINDS, Units

TOKENS = tiny_tokens()


def test_token_losses_kl_is_zero_against_itself_and_matches_its_definition():
    rng = np.random.default_rng(0)
    student, teacher = (jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32) for _ in range(2))
    targets = jnp.asarray(rng.integers(0, 11, (2, 5)))
    nll, kl = bayes.token_losses(student, targets, student)
    assert abs(float(kl)) < 1e-4
    np.testing.assert_allclose(float(nll), float(bayes.token_nll(student, targets)))
    tau = 2.0
    p = jax.nn.softmax(teacher / tau, -1)
    expected = (p * (jnp.log(p) - jax.nn.log_softmax(student / tau, -1))).sum() * tau ** 2
    np.testing.assert_allclose(float(bayes.token_losses(student, targets, teacher, tau)[1]), float(expected),
                               rtol=1e-5)
    assert float(bayes.token_losses(student, targets)[1]) == 0.0


def _trace(rho, **kwargs):
    model = tiny_model()
    units = Units(model.config, 16)
    batch = jnp.asarray(TOKENS[:51].reshape(3, 17))
    with numpyro.handlers.seed(rng_seed=1), numpyro.handlers.trace() as tr:
        z = bayes.push_puppet_model(batch, jnp.asarray(rho, jnp.float32), jnp.float32(0.5),
                                    kwargs.pop("teacher_logits", None), network=model, units=units,
                                    data_tokens=1000, **kwargs)
    return tr, z, model, units, batch


def test_the_token_factor_is_the_stated_gibbs_likelihood():
    teacher = tiny_model(seed=7)(jnp.asarray(TOKENS[:51].reshape(3, 17))[:, :-1])
    tr, z, model, units, batch = _trace(0.6, teacher_logits=teacher, teacher_weight=0.25, teacher_temperature=1.5)
    out = model(batch[:, :-1], gates=gates.block_gates(units, z))
    nll, kl = bayes.token_losses(out, batch[:, 1:], teacher, 1.5)
    expected = -(0.75 * nll + 0.25 * kl) * 1000 / batch[:, 1:].size
    tokens = tr["tokens"]
    assert tokens["is_observed"] and np.array_equal(tokens["value"], batch[:, 1:])
    observed = tokens["scale"] * tokens["fn"].log_prob(tokens["value"]).sum()
    np.testing.assert_allclose(float(observed + tr["teacher"]["fn"].log_factor), float(expected), rtol=1e-5)
    with pytest.raises(ValueError, match="needs teacher_logits"):
        _trace(0.6, teacher_weight=0.5)


def test_each_sequence_meets_its_own_size_and_runs_on_its_own_gates():
    rho = [0.3, 0.55, 0.9]
    tr, z, model, units, batch = _trace(rho)
    np.testing.assert_allclose(np.asarray(tr["ppn$metrics"]["value"]["expected_size"]), rho, atol=1e-4)
    assert z["head"].shape == (3, 2, 4)
    together = model(batch[:, :-1], gates=gates.block_gates(units, z))
    for b in range(3):
        alone = model(batch[b:b + 1, :-1], gates=gates.block_gates(units, {k: v[b] for k, v in z.items()}))
        np.testing.assert_allclose(np.asarray(together[b]), np.asarray(alone[0]), atol=1e-5)


def test_rescale_factors_are_one_at_full_size_and_monotone():
    units = Units(tiny_model().config, 16)
    rng = np.random.default_rng(0)
    gamma = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in units.shapes().items()}
    assert set(gamma) == set(RESCALE_KINDS)
    full = bayes.rescale_factors(gamma, 1.0)
    assert all(np.allclose(v, 1.0) for v in full.values())
    sizes = jnp.asarray([0.2, 0.5, 0.8])
    s = bayes.rescale_factors(gamma, sizes)
    assert s["head"].shape == (3, 2, 4)
    sign = np.sign(np.asarray(gamma["head"]))
    assert (np.diff(np.asarray(s["head"]), axis=0) * sign <= 1e-7).all()  # gamma > 0: larger when smaller


def test_rescaling_starts_as_the_identity_and_is_a_parameter():
    tr, *_ = _trace(0.5, rescale=True)
    plain, *_ = _trace(0.5)
    assert all(f"rescale_{k}" in tr and tr[f"rescale_{k}"]["type"] == "param" for k in RESCALE_KINDS)
    def token_term(trace):
        return float(trace["tokens"]["fn"].log_prob(trace["tokens"]["value"]).sum())

    np.testing.assert_allclose(token_term(tr), token_term(plain), rtol=1e-6)


# ------------------------------------------------------- push offset, size, priors
@pytest.mark.parametrize("prior", list(priors.PRIORS))
def test_expected_size_equals_rho_whatever_the_likelihood_scale(prior):
    model = tiny_model()
    units = Units(model.config, 16)
    batch = jnp.asarray(TOKENS[:34].reshape(2, 17))
    for data_tokens in (10, 10**7):
        for rho in (0.25, 0.6, 0.95):
            with numpyro.handlers.seed(rng_seed=1):
                tr = numpyro.handlers.trace(bayes.push_puppet_model).get_trace(
                    batch, jnp.float32(rho), jnp.float32(0.5), network=model, units=units, prior=prior,
                    data_tokens=data_tokens)
            assert abs(float(tr["ppn$metrics"]["value"]["expected_size"]) - rho) < 1e-4


def test_push_offset_gradient_follows_the_implicit_function():
    units = Units(tiny_config(), 16)
    rng = np.random.default_rng(0)
    logits = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in units.gate_shapes().items()}
    rho, temp = jnp.float32(0.4), 0.5

    def offset(scale):
        return bayes.push_offset(units, {k: v * scale for k, v in logits.items()}, rho, temp)

    eps = 1e-2
    numeric = (offset(1 + eps) - offset(1 - eps)) / (2 * eps)
    assert abs(float(jax.grad(offset)(1.0)) - float(numeric)) < 2e-2 * max(1.0, abs(float(numeric)))


@pytest.mark.parametrize("shift", [-300.0, 0.0, 250.0])
def test_push_offset_meets_the_size_wherever_the_logits_drift(shift):
    units = Units(tiny_config(), 16)
    rng = np.random.default_rng(1)
    logits = {k: jnp.asarray(rng.normal(size=s) * 3 + shift, jnp.float32) for k, s in units.gate_shapes().items()}
    for rho in (0.2, 0.7):
        c = bayes.push_offset(units, logits, jnp.float32(rho), 0.3)
        p = {k: gates.open_probability(v - c, 0.3) for k, v in logits.items()}
        assert abs(float(bayes.expected_size(units, p)) / units.total - rho) < 1e-4


def test_a_fit_in_flops_holds_the_expected_flops_at_rho():
    units = Units(tiny_config(), 16, currency="flops", context=512)
    assert units.size_total == units.costs("flops", 512).of(units.full()) and units.size_total > 2 * units.total
    assert Units(tiny_config(), 16).size_total == units.total  # parameters: the prunable count
    rng = np.random.default_rng(2)
    logits = {k: jnp.asarray(rng.normal(size=s) * 2, jnp.float32) for k, s in units.gate_shapes().items()}
    for rho in (0.3, 0.8):
        c = bayes.push_offset(units, logits, jnp.float32(rho), 0.3)
        p = {k: gates.open_probability(v - c, 0.3) for k, v in logits.items()}
        assert abs(float(bayes.expected_size(units, p)) / units.size_total - rho) < 1e-4
        # the same gates hold another share of the parameters: the currency moves the offset
        params = float(bayes.expected_size(Units(tiny_config(), 16), p)) / units.total
        assert abs(params - rho) > 1e-3


def test_expected_size_matches_monte_carlo_over_bernoulli_gates():
    units = Units(tiny_config(), 16)
    rng = np.random.default_rng(1)
    p = {k: rng.uniform(0.1, 0.9, s) for k, s in units.gate_shapes().items()}
    draws = 4000
    total = 0
    for _ in range(draws):
        z = {k: rng.random(v.shape) < v for k, v in p.items()}
        total += ppn.KeepSet(units, z["attn_layer"], z["mlp_layer"], z["head"], z["mlp_group"]).num_params()
    expected = float(bayes.expected_size(units, {k: jnp.asarray(v) for k, v in p.items()}))
    # exact up to the norms, which the expectation counts with the layer gate alone
    assert abs(total / draws - expected) < 0.01 * units.total


def test_unknown_prior_is_refused():
    with pytest.raises(ValueError, match="unknown prior 'horse'"):
        FitConfig(prior="horse")



# ------------------------------------------------------- Predictive and log_likelihood
def test_predictive_draws_tokens_and_the_gates_of_the_fitted_model(tiny_fit):
    model, guide, params = svi.model_and_guide(tiny_fit)
    batch = jnp.asarray(tiny_tokens()[:34].reshape(2, 17))
    units = tiny_fit.units
    draws = Predictive(model, guide=guide, params=params, num_samples=4)(
        jax.random.PRNGKey(0), batch, 0.5, 0.2, predict=True)
    assert draws["tokens"].shape == (4, 2, 16) and 0 <= int(draws["tokens"].min()) <= int(draws["tokens"].max()) < 97
    assert not np.array_equal(draws["tokens"][0], draws["tokens"][1])  # drawn, not the observed batch
    for name in ("alpha", "beta", "eta", "p_open", "gates"):
        assert draws[name].shape == (4, units.num_gates), name
    assert draws["offset"].shape == (4,) and np.ptp(np.asarray(draws["eta"]), axis=0).max() > 0
    assert ((draws["gates"] >= 0) & (draws["gates"] <= 1)).all()
    # every draw meets the size: its open probabilities give an expected size of exactly rho
    p = gates.unflatten(units, draws["p_open"])
    assert {k: v.shape[1:] for k, v in p.items()} == units.gate_shapes()
    sizes = jax.vmap(lambda q: bayes.expected_size(units, q))(p) / units.total
    np.testing.assert_allclose(np.asarray(sizes), 0.5, atol=1e-4)


def test_log_likelihood_gives_each_draw_its_token_log_probabilities(tiny_fit):
    model, guide, params = svi.model_and_guide(tiny_fit)
    batch = jnp.asarray(tiny_tokens()[:34].reshape(2, 17))
    latents = Predictive(guide, params=params, num_samples=3)(jax.random.PRNGKey(1), batch, 0.5, 0.2)
    loglik = log_likelihood(model, latents, batch, 0.5, 0.2)["tokens"]
    assert loglik.shape == (3, 2, 16) and bool((loglik < 0).all())
    # unseeded, the gates are their medians: the first draw's values are its network's log-probabilities
    one = {k: v[0] for k, v in latents.items()}
    with numpyro.handlers.substitute(data=one), numpyro.handlers.trace() as tr:
        model(batch, 0.5, 0.2)
    # the fit's own likelihood: scaled to its training tokens, per batch token
    assert tr["tokens"]["scale"] == pytest.approx(len(tiny_tokens()) / 32 / tiny_fit.config.likelihood_temperature)
    eta = gates.unflatten(tiny_fit.units, tr["eta"]["value"])
    median = {k: gates.median_hard_concrete(v, 0.2) for k, v in eta.items()}
    out = tiny_fit.model(batch[:, :-1], gates=gates.block_gates(tiny_fit.units, median))
    expected = jnp.take_along_axis(jax.nn.log_softmax(out, -1), batch[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(loglik[0]), np.asarray(expected), rtol=1e-4, atol=1e-5)



def test_inference_data_has_every_group_from_the_same_draws_and_loo_runs(tiny_fit):
    import arviz as az

    from ppn.posterior import inference_data

    batch = tiny_tokens()[:51].reshape(3, 17)
    idata = inference_data(tiny_fit, batch, size=0.5, num_samples=6)
    assert {"posterior", "prior", "observed_data", "posterior_predictive", "log_likelihood"} <= set(idata.groups())
    assert idata.posterior_predictive["tokens"].shape == (1, 6, 3, 16)
    assert idata.log_likelihood["tokens"].shape == (1, 6, 3, 16) and float(idata.log_likelihood["tokens"].max()) < 0
    np.testing.assert_array_equal(idata.observed_data["tokens"].values, batch[:, 1:])
    assert idata.posterior["alpha_head"].dims == ("chain", "draw", "layer", "head")
    assert idata.attrs["inference_library"] == "numpyro" and idata.attrs["guide"] == tiny_fit.config.guide
    # the posterior group holds distinct guide draws
    assert np.ptp(idata.posterior["alpha_head"].values[0], axis=0).max() > 0
    loo = az.loo(idata, pointwise=True)
    assert np.isfinite(loo.elpd_loo)


def test_trained_weights_start_from_the_weights_argument_not_the_networks_arrays():
    """`ppn.svi.init_fit` passes the start weights in, so a compiled initialisation holds no copy of the model."""
    from flax import nnx

    halves = jax.tree.map(lambda w: w / 2, nnx.state(tiny_model(), nnx.Param))
    tr, *_ = _trace(0.6, train_weights=True, weights=halves)
    started = tr[svi.WEIGHTS_SITE]["value"]
    assert jax.tree.structure(started) == jax.tree.structure(nnx.to_pure_dict(halves))
    for got, want in zip(jax.tree.leaves(started), jax.tree.leaves(halves)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    traced, *_ = _trace(0.6, train_weights=True)  # without them: the network's own arrays
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(traced[svi.WEIGHTS_SITE]["value"])[0]),
                                  np.asarray(jax.tree.leaves(nnx.state(tiny_model(), nnx.Param))[0]))
