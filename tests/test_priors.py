"""The priors: identification (no global intercept), and priors a user registers."""

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from ppn import priors
from ppn.plan import Plan
from ppn.testing import random_plan, tiny_config
from ppn.units import KINDS, Units


def student_t_prior(units):
    """The hierarchical prior with heavy-tailed unit deviations: a user's own."""
    return priors._hierarchical(units, dist.StudentT(3.0, 0.0, 1.0))


@pytest.fixture
def registered():
    priors.register_prior("student_t", student_t_prior)
    yield "student_t"
    priors.PRIORS.pop("student_t")


def test_a_registered_prior_fits_plans_and_loads_by_name(registered, tmp_path):
    plan = random_plan(tiny_config(), prior=registered)
    path = plan.save(tmp_path / "p.json")
    loaded = Plan.load(path)
    assert loaded.prior == registered and loaded.keep(0.5) == plan.keep(0.5)
    with pytest.raises(ValueError, match="already"):
        priors.register_prior(registered, student_t_prior)
    priors.PRIORS.pop(registered)
    with pytest.raises(ValueError, match="register_prior"):
        Plan.load(path)
    priors.register_prior(registered, student_t_prior)  # for the fixture's clean-up


def test_a_prior_of_the_wrong_shapes_is_refused():
    def flat(units):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0).expand([units.num_gates]).to_event(1))
        return {k: a for k in KINDS}, {k: a for k in KINDS}

    with pytest.raises(ValueError, match="must return alpha"):
        priors.register_prior("flat", flat)
    assert "flat" not in priors.PRIORS


@pytest.mark.parametrize("name", list(priors.PRIORS))
def test_no_prior_has_a_global_level_the_data_cannot_see(name):
    """Shifting every built-in prior's latents along the direction of a common level
    (the layer deviations, or the independent intercepts) leaves every alpha as it was."""
    units = Units(tiny_config(num_layers=3), 16)
    with numpyro.handlers.seed(rng_seed=0), numpyro.handlers.trace() as tr:
        alpha, _ = priors.get_prior(name)(units)
    assert "alpha0" not in tr
    shifted = {n: s["value"] + 1.7 if n in ("delta", *(f"alpha_{k}" for k in KINDS)) else s["value"]
               for n, s in tr.items() if s["type"] == "sample"}
    with numpyro.handlers.seed(rng_seed=0), numpyro.handlers.substitute(data=shifted):
        moved, _ = priors.get_prior(name)(units)
    for k in KINDS:
        np.testing.assert_allclose(np.asarray(moved[k]), np.asarray(alpha[k]), atol=1e-5, err_msg=k)
