"""An exact reference for the gate posterior, on a model small enough to enumerate.

With the network's weights frozen and at most `MAX_GATES` gates, every mask's
likelihood can be computed, so the posterior over the gate parameters needs no
approximation. The reference model is the push puppet model with Bernoulli
gates (the hard-concrete's zero-temperature limit): at each size rho_s of the
data, gate g is open with probability p_g(rho_s) = sigmoid(eta_g(rho_s) - c(rho_s)),
c the push offset, and

    log p(y | theta) = sum_s log sum_m P(m | theta, rho_s) p(y_s | m)     (exact)

against the fit's objective, which replaces log E_m[p(y | m)] by E_m[log p(y | m)]
(a Jensen bound: the gates are guided by their own conditional prior) and the
posterior by a Gaussian guide. `mask_log_likelihoods` tabulates p(y_s | m) over all
2^G masks once; NUTS (`nuts_draws`) then samples the exact posterior and SVI
(`svi_draws`) fits the guide to either objective, both on the same table.
`sbc_ranks` runs simulation-based calibration (Talts et al., 2018): parameters
from the prior, masks and tokens from the model, a posterior, and the rank of
the truth among its draws, uniform when the posterior is right.

Quantities compared are the identified ones: every gate's open probability at
every size of the data ("p_open", (S, G) per draw).
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
from flax import nnx
from numpyro.infer import SVI, Predictive, Trace_ELBO
from numpyro.infer.hmc import hmc
from numpyro.infer.util import initialize_model
from numpyro.infer.autoguide import AutoNormal

from ppn.bayes import gate_logits, push_offset
from ppn.gates import block_gates, flatten, unflatten
from ppn.models.llama import Llama
from ppn.priors import get_prior
from ppn.runs import atomic_write
from ppn.units import Units

MAX_GATES = 12


def all_masks(units: Units) -> np.ndarray:
    """(2^G, G) float32: every open/closed pattern of the G gates, in `ppn.gates.flatten` order."""
    if units.num_gates > MAX_GATES:
        raise ValueError(f"{units.num_gates} gates make {2 ** units.num_gates:,} masks; the exact reference "
                         f"enumerates at most {MAX_GATES} gates (2^{MAX_GATES} masks)")
    g = units.num_gates
    return ((np.arange(2 ** g)[:, None] >> np.arange(g)) & 1).astype(np.float32)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _mask_loglik(graphdef, units: Units, state, masks: jax.Array, batch: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, state)

    def one(mask):
        logits = model(batch[:, :-1], gates=block_gates(units, unflatten(units, mask))).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, -1)
        return jnp.take_along_axis(logp, batch[:, 1:, None], -1).sum()

    return jax.lax.map(one, masks, batch_size=64)


def mask_log_likelihoods(model: Llama, units: Units, batches) -> np.ndarray:
    """(S, 2^G) log p(y_s | m): the tokens of each batch (B, T+1) under the network with mask m."""
    graphdef, state = nnx.split(model)
    masks = jnp.asarray(all_masks(units))
    return np.stack([np.asarray(_mask_loglik(graphdef, units, state, masks, jnp.asarray(b, jnp.int32)))
                     for b in batches])


def open_probabilities(units: Units, alpha: dict, beta: dict, sizes: jax.Array) -> jax.Array:
    """(S, G) Bernoulli open probabilities at each size, the push offset solved so
    the expected kept size is the size (zero temperature)."""
    def one(rho):
        logits = gate_logits(alpha, beta, rho)
        c = push_offset(units, logits, rho, 0.0)
        return jax.nn.sigmoid(flatten(logits) - c)

    return jax.vmap(one)(sizes)


def reference_model(table: jax.Array, units: Units, sizes: jax.Array, prior: str = "hierarchical",
                    jensen: bool = False):
    """The prior, and the tokens' log-likelihood by enumeration over masks (`jensen`:
    the fit's bound E_m[log p(y | m)] instead). Deterministic site "p_open" (S, G)."""
    alpha, beta = get_prior(prior)(units)
    p = numpyro.deterministic("p_open", open_probabilities(units, alpha, beta, sizes))
    masks = jnp.asarray(all_masks(units))
    log_pm = (jnp.log(jnp.clip(p, 1e-30)) @ masks.T + jnp.log(jnp.clip(1 - p, 1e-30)) @ (1 - masks).T)  # (S, 2^G)
    term = (jnp.exp(log_pm) * table).sum(-1) if jensen else jax.nn.logsumexp(log_pm + table, -1)
    numpyro.factor("tokens", term.sum())


def nuts_sampler(units: Units, sizes, prior: str = "hierarchical", num_samples: int = 500,
                 num_warmup: int = 500):
    """(table, seed) -> (num_samples, S, G) open probabilities under the exact posterior
    (NUTS with step-size and diagonal mass adaptation over `num_warmup`, one chain
    started uniformly in (-2, 2) on the unconstrained scale); warm-up and sampling one
    compiled program (numpyro's functional `hmc`), reused for every table of the
    same shape."""
    model = functools.partial(reference_model, units=units, sizes=jnp.asarray(sizes), prior=prior)
    dummy = jnp.zeros((len(sizes), 2 ** units.num_gates))
    info = initialize_model(jax.random.PRNGKey(0), model, model_args=(dummy,), dynamic_args=True)
    init_kernel, sample_kernel = hmc(potential_fn_gen=info.potential_fn, algo="NUTS")

    @jax.jit
    def run(table, key):
        k_start, k_init = jax.random.split(key)
        leaves, tree = jax.tree.flatten(info.param_info.z)
        start = [jax.random.uniform(k, x.shape, minval=-2.0, maxval=2.0)
                 for k, x in zip(jax.random.split(k_start, len(leaves)), leaves)]
        state = init_kernel(jax.tree.unflatten(tree, start), num_warmup, model_args=(table,), rng_key=k_init)

        def step(s, _):
            s = sample_kernel(s, model_args=(table,))
            return s, s.z

        _, zs = jax.lax.scan(step, state, None, length=num_warmup + num_samples)
        zs = jax.tree.map(lambda z: z[num_warmup:], zs)
        return jax.vmap(lambda z: info.postprocess_fn(table)(z)["p_open"])(zs)

    return lambda table, seed=0: np.asarray(run(jnp.asarray(table, jnp.float32), jax.random.PRNGKey(seed)))


def svi_sampler(units: Units, sizes, prior: str = "hierarchical", jensen: bool = True, steps: int = 2000,
                lr: float = 0.02, num_samples: int = 500):
    """(table, seed) -> (num_samples, S, G) open probabilities under an AutoNormal guide
    fitted by SVI to the exact likelihood or (`jensen`, the fit's objective) its
    bound; the whole fit one compiled program, reused for every table."""
    model = functools.partial(reference_model, units=units, sizes=jnp.asarray(sizes), prior=prior, jensen=jensen)
    guide = AutoNormal(model)
    svi = SVI(model, guide, optax.adam(lr), Trace_ELBO())

    @jax.jit
    def run(table, key):
        k_init, k_fit, k_draw = jax.random.split(key, 3)
        state = svi.init(k_init, table)
        state, _ = jax.lax.scan(lambda s, _: (svi.update(s, table)[0], None), state, None, length=steps)
        return Predictive(model, guide=guide, params=svi.get_params(state), num_samples=num_samples,
                          return_sites=["p_open"])(k_draw, table)["p_open"]

    return lambda table, seed=0: np.asarray(run(jnp.asarray(table, jnp.float32), jax.random.PRNGKey(seed)))


def nuts_draws(table, units: Units, sizes, prior: str = "hierarchical", num_samples: int = 500,
               num_warmup: int = 500, seed: int = 0) -> np.ndarray:
    """One table's exact posterior draws (`nuts_sampler`)."""
    return nuts_sampler(units, sizes, prior, num_samples, num_warmup)(table, seed)


def svi_draws(table, units: Units, sizes, prior: str = "hierarchical", jensen: bool = True, steps: int = 2000,
              lr: float = 0.02, num_samples: int = 500, seed: int = 0) -> np.ndarray:
    """One table's SVI draws (`svi_sampler`)."""
    return svi_sampler(units, sizes, prior, jensen, steps, lr, num_samples)(table, seed)


@functools.partial(jax.jit, static_argnums=(0, 1, 5, 6))
def _simulate(graphdef, units: Units, state, mask: jax.Array, key: jax.Array, batch: int, length: int):
    """(batch, length + 1) tokens sampled from the network with gates `mask`, the
    first uniformly; one causal pass over the whole buffer per position."""
    model = nnx.merge(graphdef, state)
    gates = block_gates(units, unflatten(units, mask))
    keys = jax.random.split(key, length + 1)
    ids = jnp.zeros((batch, length + 1), jnp.int32).at[:, 0].set(
        jax.random.randint(keys[0], (batch,), 0, model.config.vocab_size))

    def step(t, ids):
        logits = model(ids, gates=gates)[:, t].astype(jnp.float32)
        return ids.at[:, t + 1].set(jax.random.categorical(keys[t + 1], logits))

    return jax.lax.fori_loop(0, length, step, ids)


def sbc_ranks(model: Llama, units: Units, sizes, replicates: int = 100, batch: int = 2, length: int = 16,
              method: str = "svi", prior: str = "hierarchical", num_draws: int = 99, seed: int = 0,
              progress: bool = True, checkpoint: str | Path | None = None, **fit_kwargs) -> np.ndarray:
    """Simulation-based calibration of the gate posterior.

    Per replicate: parameters from the prior, a Bernoulli mask per size, `batch`
    sequences of `length` tokens per size from the network with that mask; the
    posterior (`method`: "nuts", exact, or "svi", the fit's Jensen bound and
    Gaussian guide) and the rank of the true open probabilities among its
    `num_draws` draws. With `checkpoint` (an .npy path) the ranks so far are saved
    after every replicate and a rerun starts after the last one saved: replicate r
    draws the same data and posterior whether or not the run was interrupted.

    Returns:
        (replicates, S, G) int ranks in [0, num_draws]; uniform if the posterior is calibrated.
    """
    from ppn.console import progress_bar

    sizes = jnp.asarray(sizes, jnp.float32)
    if method not in ("nuts", "svi"):
        raise ValueError(f"unknown posterior method {method!r}; choose 'nuts' or 'svi'")
    make = nuts_sampler if method == "nuts" else svi_sampler
    sample = make(units, sizes, prior, num_samples=num_draws, **fit_kwargs)
    graphdef, state = nnx.split(model)
    prior_p = Predictive(reference_model, num_samples=1, return_sites=["p_open"])
    dummy = jnp.zeros((sizes.size, 2 ** units.num_gates))  # the prior does not read the table
    shape = (sizes.size, units.num_gates)
    ranks = list(np.load(checkpoint)) if checkpoint is not None and Path(checkpoint).exists() else []
    if len(ranks) > replicates or (ranks and ranks[0].shape != shape):
        raise ValueError(f"{checkpoint} holds {len(ranks)} replicates of shape {ranks[0].shape}, not up to "
                         f"{replicates} of shape {shape}: another experiment's ranks")
    for r in progress_bar(range(len(ranks), replicates), desc=f"SBC ({method})", unit="replicate",
                          enabled=progress):
        # replicate r's keys depend on r alone, so a resumed run draws what an unbroken one would
        k_truth, k_mask, k_tokens = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), r), 3)
        truth = np.asarray(prior_p(k_truth, dummy, units, sizes, prior)["p_open"][0])  # (S, G)
        masks = jax.random.bernoulli(k_mask, truth).astype(jnp.float32)  # (S, G)
        batches = [_simulate(graphdef, units, state, masks[s], k, batch, length)
                   for s, k in enumerate(jax.random.split(k_tokens, sizes.size))]
        table = mask_log_likelihoods(model, units, batches)
        draws = sample(table, seed + r)
        ranks.append((draws < truth).sum(0))
        if checkpoint is not None:
            atomic_write(checkpoint, np.stack(ranks))
    return np.stack(ranks)


def rank_uniformity(ranks: np.ndarray, num_draws: int, bins: int = 10) -> dict[str, float]:
    """χ² tests of SBC ranks against uniformity: pooled over every quantity, and the
    smallest p-value over quantities (each tested alone)."""
    from scipy.stats import chisquare

    edges = np.linspace(0, num_draws + 1, bins + 1)
    flat = ranks.reshape(ranks.shape[0], -1)
    per_quantity = [chisquare(np.histogram(flat[:, q], edges)[0]).pvalue for q in range(flat.shape[1])]
    return {"pooled_p": float(chisquare(np.histogram(flat, edges)[0]).pvalue),
            "min_p": float(np.min(per_quantity)), "quantities": int(flat.shape[1]),
            "share_below_0.01": float(np.mean(np.asarray(per_quantity) < 0.01))}
