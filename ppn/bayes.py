"""The push puppet model in NumPyro: gates that open with the target size.

Every gate g (see `ppn.units`) has an intercept alpha_g and a slope beta_g > 0;
its logit at size rho is

    eta_g(rho) = alpha_g + beta_g * logit(rho) - c(rho)

where the push offset c(rho) is solved at every step so that the expected kept
size equals rho * S_total exactly (S: prunable parameters, or FLOPs per token
when `Units.currency` is "flops"). alpha and beta therefore only decide the
order in which units close as rho is pushed down, and the size constraint holds
whatever the scale of the token likelihood (which is scaled to the whole data
set and would otherwise simply open every gate).

Gates are hard-concrete samples at eta_g (`ppn.gates`), so the network trains
on exact zeros and ones. alpha and beta come from a prior of `ppn.priors` (by
default hierarchical: units tied to their layer). `push_puppet_model` is public,
with an observed "tokens" site and deterministic sites, so that
`numpyro.infer.Predictive` and `numpyro.infer.log_likelihood` can run it.

Shapes: L blocks, N query heads, M MLP groups per block. Gate arrays are dicts
keyed by kind: "attn_layer" (L,), "mlp_layer" (L,), "head" (L, N), "mlp_group" (L, M).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.contrib.module import nnx_module
from numpyro.primitives import mutable as numpyro_mutable

from ppn.gates import block_gates, flatten, median_hard_concrete, open_probability, sample_hard_concrete
from ppn.models.llama import Llama
from ppn.priors import get_prior
from ppn.units import KINDS, RESCALE_KINDS, Units

# The offset is bracketed by [min logit - margin, max logit + margin]: there every
# gate is almost surely open (resp. closed), whatever the temperature up to ~5.
OFFSET_MARGIN = 60.0
BISECTION_STEPS = 48


# ---------------------------------------------------------- push function
def _per_size(x: jax.Array, like: jax.Array) -> jax.Array:
    """x () or (B,), one value per size, shaped to broadcast against `like` (gate shape)."""
    return x.reshape(x.shape + (1,) * like.ndim)


def gate_logits(alpha: dict, beta: dict, rho: jax.Array) -> dict:
    """eta_g(rho) = alpha_g + beta_g * logit(rho), before the push offset.

    rho is a scalar, or (B,) sizes for B sequences (the logits then get a leading
    B axis); it is clipped to [1e-4, 1 - 1e-4], where logit(rho) is finite."""
    rho = jnp.clip(jnp.asarray(rho, jnp.float32), 1e-4, 1 - 1e-4)
    lr = jnp.log(rho) - jnp.log1p(-rho)
    return {k: alpha[k] + beta[k] * _per_size(lr, alpha[k]) for k in alpha}


def rescale_factors(gamma: dict, rho: jax.Array) -> dict:
    """s_g(rho) = rho ** -gamma_g: how much a kept unit's output (or an input
    dimension) is scaled at size rho, so that survivors compensate for what was
    removed (the draft's "amplitude and input scaling"). Monotone in rho for any
    gamma, and exactly 1 at rho = 1, so the full network is untouched.

    Args:
        gamma: exponents by `ppn.units.RESCALE_KINDS` kind, shaped as `Units.shapes`.
        rho: scalar, or (B,) (the factors then get a leading B axis).
    """
    log_inv = -jnp.log(jnp.clip(jnp.asarray(rho, jnp.float32), 1e-4, 1.0))
    return {k: jnp.exp(_per_size(log_inv, g) * g) for k, g in gamma.items()}


def expected_size(units: Units, p: dict) -> jax.Array:
    """E[S]: the expected kept cost of the blocks given each gate's open probability,
    in `units.currency` (prunable parameters, or FLOPs per token).

    A unit is kept if it and its layer are open (independent gates); a KV head
    if any of its query heads is; a layer's norm if the layer is open.
    """
    c = units.size_costs
    L, K, G = units.num_layers, units.config.num_kv_heads, units.config.group_size
    heads = p["attn_layer"][:, None] * p["head"]
    # The layer gate is shared by a KV head's query heads: P(kv) = P(layer) P(any head).
    kv = p["attn_layer"][:, None] * (1.0 - jnp.prod(1.0 - p["head"].reshape(L, K, G), axis=-1))
    groups = p["mlp_layer"][:, None] * p["mlp_group"]
    return (c.attn_fixed * p["attn_layer"].sum() + c.head * heads.sum() + c.kv * kv.sum()
            + c.mlp_fixed * p["mlp_layer"].sum() + (groups * jnp.asarray(c.groups, groups.dtype)).sum())


def push_offset(units: Units, logits: dict, rho: jax.Array, temperature) -> jax.Array:
    """c(rho) with E[S](eta - c) = rho * S_total (`units.size_total`), differentiable in `logits`.

    Bisection finds c (E[S] falls as c grows) between the smallest logit minus a
    margin and the largest plus it: a fixed bracket would not do, since the
    logits drift far from zero in long fits (the likelihood pushes every gate
    open, the offset pulls them back; -46 after 200 steps on SmolLM2-135M). The
    gradient follows the implicit function theorem, dc/dtheta = -(dE/dtheta) /
    (dE/dc), written as one Newton step around the stopped solution so its value
    is exactly the bisection's.
    """
    # At rho = 1 the target would be reached only at c = -inf; 1 - 1e-4 is the
    # largest size gate_logits distinguishes anyway.
    target = jnp.clip(rho, 1e-4, 1 - 1e-4) * units.size_total

    def size(c, lg):
        return expected_size(units, {k: open_probability(v - c, temperature) for k, v in lg.items()})

    fixed = jax.lax.stop_gradient(logits)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        too_big = size(mid, fixed) > target
        return jnp.where(too_big, mid, lo), jnp.where(too_big, hi, mid)

    leaves = jax.tree.leaves(fixed)
    bracket = (jnp.min(jnp.stack([x.min() for x in leaves])) - OFFSET_MARGIN,
               jnp.max(jnp.stack([x.max() for x in leaves])) + OFFSET_MARGIN)
    lo, hi = jax.lax.fori_loop(0, BISECTION_STEPS, bisect, bracket)
    c_star = jax.lax.stop_gradient(0.5 * (lo + hi))
    slope = jax.lax.stop_gradient(jax.grad(size)(c_star, fixed))
    return c_star - (size(c_star, logits) - jax.lax.stop_gradient(size(c_star, fixed))) / slope


@jax.custom_vjp
def _ascend(x: jax.Array) -> jax.Array:
    """Identity whose gradient is negated: an optimiser that descends the loss
    ascends it in x (the Lagrange multipliers of the size constraint)."""
    return x


_ascend.defvjp(lambda x: (x, None), lambda _, g: (-g,))


def lagrange_penalty(size_error: jax.Array) -> jax.Array:
    """lambda_1 (s - rho) + lambda_2 (s - rho)^2 with multipliers that the same
    optimiser step ascends (targeted structured pruning's constraint, the alternative to the push offset).
    With several sizes in a step, both terms are averaged over them."""
    lam = _ascend(numpyro.param("size_lagrange", jnp.zeros(2)))
    return lam[0] * size_error.mean() + lam[1] * (size_error ** 2).mean()


# ------------------------------------------------------------------ model
def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Summed negative log-likelihood of `targets` (B, T) under float32 `logits` (B, T, V)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).sum()


def token_losses(logits: jax.Array, targets: jax.Array, teacher_logits: jax.Array | None = None,
                 teacher_temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Summed NLL of `targets` (B, T) and summed forward KL(teacher || student) over
    the full vocabulary at softmax temperature tau, times tau^2 (so its gradient
    keeps the NLL's scale whatever tau); the KL is 0 without a teacher."""
    nll = token_nll(logits, targets)
    if teacher_logits is None:
        return nll, jnp.zeros(())
    tau = teacher_temperature
    logp_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / tau, -1)
    logp_s = jax.nn.log_softmax(logits.astype(jnp.float32) / tau, -1)
    return nll, (jnp.exp(logp_t) * (logp_t - logp_s)).sum() * tau ** 2


def push_puppet_model(batch: jax.Array, rho: jax.Array, temperature: jax.Array, teacher_logits=None, *,
                      network: Llama, units: Units, prior: str = "hierarchical", data_tokens: int,
                      likelihood_temperature: float = 1.0, train_weights: bool = True,
                      weights=None, teacher_weight: float = 0.0,
                      teacher_temperature: float = 1.0, rescale: bool = False, constraint: str = "offset",
                      compute_dtype=None, predict: bool = False):
    """One step's joint density: prior on gates, hard-concrete gates at size rho,
    and the tokens of `batch` under the gated network.

    The token term is a generalised (Gibbs) likelihood: exp(-scale * loss) with
    loss = (1 - w) * NLL + w * tau^2 * KL(teacher || gated network), summed over
    the batch's tokens and scaled by data_tokens / (B*T) / likelihood_temperature,
    so that, like the plain likelihood, it counts as the whole data set. With
    w = 0 it is the token likelihood itself.

    Sites, for `numpyro.infer.Predictive` and `numpyro.infer.log_likelihood`:
    "tokens", the observed next tokens (B, T) under Categorical(logits of the gated
    network) at scale data_tokens / (B*T) / likelihood_temperature * (1 - w)
    (absent when w = 1), sampled instead with `predict=True`; "teacher", the
    KL factor; deterministic "alpha" (G,), "beta" (G,), "eta" (G,) or (B, G),
    "p_open" and "gates" like eta, and "offset" () or (B,), gates flattened in
    `ppn.units.KINDS` order (`ppn.gates.flatten`).

    Args:
        batch: int32 (B, T+1) token windows; each predicts its tokens 1..T.
        rho: scalar target size in (0, 1], or (B,): a size per sequence, each
            with its own gates and push offset (one batch trains B sizes).
        temperature: scalar hard-concrete temperature.
        teacher_logits: float (B, T, V) logits of a frozen teacher on
            batch[:, :-1], or None (then `teacher_weight` must be 0).
        network: the Flax model (its weights are the initial values of the
            `llama$params` site when trained).
        units: the gate registry of `network`.
        prior: a name in `PRIORS`.
        data_tokens: tokens in the whole training set: the loss of the B*T
            batch tokens is scaled by data_tokens / (B*T).
        likelihood_temperature: divides the scaled log-likelihood (a tempered posterior).
        train_weights: fit the network weights (point estimates) with the gates.
            When False the weights come in through `weights` and get no gradient.
        weights: the network's `nnx.Param` state when `train_weights` is False; when
            True, optional initial values of the `llama$params` site (`ppn.svi.init_fit`).
        teacher_weight: w above, in [0, 1].
        teacher_temperature: tau above.
        rescale: scale every kept unit, sub-layer and normalised input dimension
            by `rescale_factors` (exponents `rescale_<kind>`, point estimates
            starting at 0, i.e. no scaling).
        constraint: how the expected size is held at rho: "offset" (the push
            offset c(rho), exact at every step) or "lagrange" (no offset;
            multipliers ascended by the optimiser, in units of the data scale,
            so the constraint is met only as they converge).
        compute_dtype: run the network in this dtype (e.g. bfloat16) while its
            trained weights, the `llama$params` site, stay in `network`'s dtype
            (float32 master weights: an Adam step of 1e-4 is below bfloat16's
            resolution for most weights, which would never move). None: as stored.
        predict: draw the "tokens" site from the gated network instead of
            observing the batch's next tokens (posterior predictive).

    Returns:
        The gate samples, a dict by kind (with a leading B axis when rho is (B,)).
    """
    if teacher_weight > 0 and teacher_logits is None:
        raise ValueError("teacher_weight > 0 needs teacher_logits")
    rho = jnp.asarray(rho, jnp.float32)
    alpha, beta = get_prior(prior)(units)
    offset, eta = _locations(units, alpha, beta, rho, temperature, constraint)
    z = _gates(eta, temperature)
    scales = None
    if rescale:
        gamma = {k: numpyro.param(f"rescale_{k}", jnp.zeros(units.shapes()[k])) for k in RESCALE_KINDS}
        scales = rescale_factors(gamma, rho)
    net = _network(network, train_weights, weights, compute_dtype)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    out = net(inputs, gates=block_gates(units, z, scales)).astype(jnp.float32)
    n_tokens = targets.size
    scale = data_tokens / n_tokens / likelihood_temperature
    nll, teacher_kl = token_losses(out, targets, None if teacher_weight == 0 else teacher_logits, teacher_temperature)
    if teacher_weight < 1:
        with numpyro.handlers.scale(scale=scale * (1 - teacher_weight)):
            # unvalidated: non-finite logits are the fit's to report (`ppn.svi`), not a distribution error
            numpyro.sample("tokens", dist.Categorical(logits=out, validate_args=False),
                           obs=None if predict else targets)
    if teacher_weight > 0:
        numpyro.factor("teacher", -teacher_weight * teacher_kl * scale)

    p_open = {k: open_probability(v, temperature) for k, v in eta.items()}
    expected = (jax.vmap(functools.partial(expected_size, units))(p_open) if rho.ndim
                else expected_size(units, p_open))
    if constraint == "lagrange":
        numpyro.factor("size", -lagrange_penalty(expected / units.size_total - rho) * data_tokens / likelihood_temperature)
    for name, value in (("alpha", alpha), ("beta", beta), ("eta", eta), ("p_open", p_open), ("gates", z)):
        numpyro.deterministic(name, flatten(value))
    numpyro.deterministic("offset", offset)
    metrics = numpyro_mutable("ppn$metrics", {"nll": jnp.zeros(()), "expected_size": jnp.zeros(rho.shape),
                                              "offset": jnp.zeros(rho.shape), "teacher_kl": jnp.zeros(())})
    metrics["nll"] = jax.lax.stop_gradient(nll / n_tokens)
    metrics["expected_size"] = jax.lax.stop_gradient(expected / units.size_total)
    metrics["offset"] = jax.lax.stop_gradient(offset)
    metrics["teacher_kl"] = jax.lax.stop_gradient(teacher_kl / n_tokens)
    return z


def _locations(units: Units, alpha: dict, beta: dict, rho: jax.Array, temperature, constraint: str):
    """The offset () or (B,) and every gate's location eta_g(rho) = alpha_g + beta_g
    logit(rho) - offset (by kind, with a leading B axis for B sizes). Under
    "lagrange" the offset is a learned point estimate, `size_level`: the common
    level the push offset otherwise solves for."""
    logits = gate_logits(alpha, beta, rho)
    if constraint == "offset":
        solve = functools.partial(push_offset, units, temperature=temperature)
        offset = jax.vmap(solve)(logits, rho) if rho.ndim else solve(logits, rho)
    elif constraint == "lagrange":
        # (1,), not (): with a 0-d parameter the donated step met one buffer twice (its zero Adam moments)
        offset = jnp.broadcast_to(numpyro.param("size_level", jnp.zeros(1))[0], rho.shape)
    else:
        raise ValueError(f"unknown size constraint {constraint!r}; choose 'offset' or 'lagrange'")
    return offset, {k: v - _per_size(offset, alpha[k]) for k, v in logits.items()}


def _gates(eta: dict, temperature) -> dict:
    """Hard-concrete gates at locations `eta`, drawn with the model's random key;
    unseeded (as `numpyro.infer.log_likelihood` runs a model) their medians."""
    key = numpyro.prng_key()
    if key is None:
        return {k: median_hard_concrete(v, temperature) for k, v in eta.items()}
    keys = jax.random.split(key, len(KINDS))
    return {k: sample_hard_concrete(subkey, eta[k], temperature) for k, subkey in zip(KINDS, keys)}


def _network(network: Llama, train_weights: bool, weights, compute_dtype):
    """The network the model runs: its weights the `llama$params` site (computed in
    `compute_dtype` when given), or the fixed `weights` without gradient.

    When trained, `weights` (if given) are the site's initial values: passed in, they
    are arguments of a compiled initialisation, where `network`'s own arrays would be
    constants of it (the whole model, which XLA then folds)."""
    from flax import nnx

    if not train_weights:
        graphdef, _ = nnx.split(network, nnx.Param)
        return nnx.merge(graphdef, jax.lax.stop_gradient(weights))
    if weights is not None:
        graphdef, _, rest = nnx.split(network, nnx.Param, ...)
        network = nnx.merge(graphdef, weights, rest)
    net = nnx_module("llama", network)
    if compute_dtype is not None and compute_dtype != network.dtype:
        graphdef, state, rest = nnx.split(net, nnx.Param, ...)
        net = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(compute_dtype), state), rest)
    return net
