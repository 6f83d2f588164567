"""The exact reference posterior on a model with 12 gates: enumeration, NUTS against SVI, SBC."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numpyro.handlers import seed
from numpyro.infer.util import log_density

from ppn import reference as ref
from ppn.bayes import expected_size
from ppn.gates import unflatten
from ppn.prune import prune
from ppn.testing import tiny_config, tiny_model
from ppn.units import KeepSet, Units

SIZES = jnp.asarray([0.3, 0.6])


@pytest.fixture(scope="module")
def network():
    graphdef, state = nnx.split(tiny_model(seed=3, num_heads=2, num_kv_heads=1, intermediate_size=32))
    model = nnx.merge(graphdef, jax.tree.map(lambda x: x * 6.0 if x.ndim > 1 else x, state))
    units = Units(model.config, group_width=16)
    batches = [ref._simulate(graphdef, units, state, jnp.ones(units.num_gates), jax.random.PRNGKey(s), 3, 12)
               for s in range(2)]
    return model, units, batches, ref.mask_log_likelihoods(model, units, batches)


def _loglik(model, ids):
    logp = jax.nn.log_softmax(model(ids[:, :-1]).astype(jnp.float32), -1)
    return float(jnp.take_along_axis(logp, ids[:, 1:, None], -1).sum())


def test_every_mask_is_enumerated_and_tabulated_as_its_pruned_network(network):
    model, units, batches, table = network
    masks = ref.all_masks(units)
    assert masks.shape == (4096, 12) and len({m.tobytes() for m in masks}) == 4096
    assert table.shape == (2, 4096)
    for i in (4095, 1234, 77):  # all open, then two mixed masks
        z = {k: np.asarray(v, bool) for k, v in unflatten(units, jnp.asarray(masks[i])).items()}
        keep = KeepSet(units, z["attn_layer"], z["mlp_layer"], z["head"], z["mlp_group"])
        assert table[0, i] == pytest.approx(_loglik(prune(model, keep), batches[0]), rel=1e-5, abs=1e-3)
    with pytest.raises(ValueError, match="at most 12 gates"):
        ref.all_masks(Units(tiny_config(), group_width=16))


def test_open_probabilities_hold_each_size_and_the_exact_likelihood_bounds_the_fits(network):
    model, units, _, table = network
    alpha = {k: jax.random.normal(jax.random.PRNGKey(i), s) for i, (k, s) in enumerate(units.gate_shapes().items())}
    beta = {k: jnp.ones(s) for k, s in units.gate_shapes().items()}
    p = ref.open_probabilities(units, alpha, beta, SIZES)
    for s, rho in enumerate(SIZES):
        assert float(expected_size(units, unflatten(units, p[s]))) / units.total == pytest.approx(float(rho), abs=1e-4)
    args = (jnp.asarray(table), units, SIZES, "hierarchical")
    exact, trace = log_density(seed(ref.reference_model, rng_seed=0), args + (False,), {}, {})
    bound, _ = log_density(ref.reference_model, args + (True,), {}, {k: trace[k]["value"] for k in trace
                                                                         if trace[k]["type"] == "sample"})
    assert float(exact) >= float(bound)  # log E[p(y|m)] >= E[log p(y|m)]


def test_svi_on_the_exact_likelihood_recovers_the_nuts_posterior(network):
    _, units, _, table = network
    nuts = ref.nuts_draws(table, units, SIZES, num_samples=200, num_warmup=200)
    svi = ref.svi_draws(table, units, SIZES, jensen=False, steps=600, num_samples=200)
    assert nuts.shape == svi.shape == (200, 2, 12)
    assert np.abs(nuts.mean(0) - svi.mean(0)).max() < 0.1


def test_sbc_ranks_and_their_uniformity_test(tmp_path):
    model, units = ref_network_small()
    kw = dict(batch=1, length=8, method="nuts", num_draws=9, num_warmup=20, progress=False)
    ranks = ref.sbc_ranks(model, units, SIZES, replicates=2, **kw)
    assert ranks.shape == (2, 2, 12) and ranks.min() >= 0 and ranks.max() <= 9
    # interrupted after one replicate, then resumed: the same ranks as one unbroken run
    ckpt = tmp_path / "ranks.npy"
    np.testing.assert_array_equal(ref.sbc_ranks(model, units, SIZES, replicates=1, checkpoint=ckpt, **kw), ranks[:1])
    np.testing.assert_array_equal(ref.sbc_ranks(model, units, SIZES, replicates=2, checkpoint=ckpt, **kw), ranks)
    with pytest.raises(ValueError, match="another experiment's ranks"):
        ref.sbc_ranks(model, units, SIZES, replicates=1, checkpoint=ckpt, **kw)
    rng = np.random.default_rng(0)
    assert ref.rank_uniformity(rng.integers(0, 100, (200, 2, 12)), 99)["pooled_p"] > 0.01
    skewed = ref.rank_uniformity(np.minimum(rng.integers(0, 100, (200, 2, 12)), 50), 99)
    assert skewed["pooled_p"] < 0.01 and skewed["share_below_0.01"] == 1.0
    with pytest.raises(ValueError, match="unknown posterior method"):
        ref.sbc_ranks(model, units, SIZES, replicates=1, batch=1, length=4, method="laplace", progress=False)


def ref_network_small():
    model = tiny_model(seed=3, num_heads=2, num_kv_heads=1, intermediate_size=32)
    return model, Units(model.config, group_width=16)
