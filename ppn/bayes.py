"""The push puppet model in NumPyro: gates that open with the target size.

Every gate g (see `ppn.units`) has an intercept alpha_g and a slope beta_g > 0;
its logit at size rho is

    eta_g(rho) = alpha_g + beta_g * logit(rho) - c(rho)

where the push offset c(rho) is solved at every step so that the expected kept
size equals rho * S_total exactly. alpha and beta therefore only decide the
order in which units close as rho is pushed down, and the size constraint holds
whatever the scale of the token likelihood (which is scaled to the whole data
set and would otherwise simply open every gate).

Gates are hard-concrete samples at eta_g (`ppn.gates`), so the network trains
on exact zeros and ones. The hierarchical prior (non-centred) ties units to their layer and
layers to the model; its negative log density is the "hierarchical penalty".
Beyond the original formulation (ppn/METHOD.md), layer gates sit a learned margin above their
units (`_layer_margin`), so that units close before whole sub-layers do.
`push_puppet_model` is public so that `numpyro.infer.Predictive` can run it.

Shapes: L blocks, N query heads, M MLP groups per block. Gate arrays are dicts
keyed by kind: "attn_layer" (L,), "mlp_layer" (L,), "head" (L, N), "mlp_group" (L, M).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.contrib.module import nnx_module
from numpyro.primitives import mutable as numpyro_mutable

from ppn.gates import block_gates, open_probability, sample_hard_concrete
from ppn.models.llama import Llama
from ppn.units import KINDS, RESCALE_KINDS, Units

# The offset is bracketed by [min logit - margin, max logit + margin]: there every
# gate is almost surely open (resp. closed), whatever the temperature up to ~5.
OFFSET_MARGIN = 60.0
BISECTION_STEPS = 48


def _shapes(units: Units) -> dict[str, tuple[int, ...]]:
    """Gate shapes by kind."""
    return {k: units.shapes()[k] for k in KINDS}


def _slopes(units: Units) -> dict[str, jax.Array]:
    """beta_g = softplus(b_kind + s * zeta_g), shared by every prior."""
    shapes = _shapes(units)
    b = numpyro.sample("beta_loc", dist.Normal(1.0, 1.0).expand([len(KINDS)]).to_event(1))
    s = numpyro.sample("beta_scale", dist.HalfNormal(0.5))
    beta = {}
    for i, kind in enumerate(KINDS):
        zeta = numpyro.sample(f"zeta_{kind}", dist.Normal(0.0, 1.0).expand(shapes[kind]).to_event(len(shapes[kind])))
        beta[kind] = jax.nn.softplus(b[i] + s * zeta)
    return beta


def _hierarchical(units: Units, unit_noise: dist.Distribution, margin: bool = True) -> tuple[dict, dict]:
    shapes = _shapes(units)
    L = units.num_layers
    alpha0 = numpyro.sample("alpha0", dist.Normal(0.0, 3.0))
    tau_layer = numpyro.sample("tau_layer", dist.HalfNormal(1.0))
    tau_unit = numpyro.sample("tau_unit", dist.HalfNormal(1.0))
    delta = numpyro.sample("delta", dist.Normal(0.0, 1.0).expand([L, 2]).to_event(2))
    margin = _layer_margin() if margin else jnp.zeros(2)
    layer_level = alpha0 + tau_layer * delta  # (L, 2): attention, MLP
    alpha = {"attn_layer": layer_level[:, 0] + margin[0], "mlp_layer": layer_level[:, 1] + margin[1]}
    for i, kind in enumerate(("head", "mlp_group")):
        eps = numpyro.sample(f"eps_{kind}", unit_noise.expand(shapes[kind]).to_event(2))
        alpha[kind] = layer_level[:, i, None] + tau_unit * eps
    return alpha, _slopes(units)


def _layer_margin() -> jax.Array:
    """How much more open a layer gate is than its units, per kind (attention, MLP).

    Without it a layer gate and its units would share one intercept, so at size
    rho each would open with probability about sqrt(rho): whole sub-layers would
    be dropped at random from the first step and the network would collapse.
    A positive margin (prior mean 3 logits) makes units close before their layer;
    the data can still pull a layer's intercept down.
    """
    return numpyro.sample("layer_margin", dist.Normal(3.0, 1.0).expand([2]).to_event(1))


def hierarchical_prior(units: Units) -> tuple[dict, dict]:
    """The formulation's prior (model -> layer -> unit intercepts, Normal unit
    deviations) with layer gates a learned margin above their units: the default."""
    return _hierarchical(units, dist.Normal(0.0, 1.0))


def design_prior(units: Units) -> tuple[dict, dict]:
    """The original formulation's prior exactly as written: layer gates share their units'
    layer intercept, with no margin (the ablation of `_layer_margin`)."""
    return _hierarchical(units, dist.Normal(0.0, 1.0), margin=False)


def laplace_prior(units: Units) -> tuple[dict, dict]:
    """Like `hierarchical_prior` with Laplace unit deviations: most units sit at
    their layer's intercept, a few stand out."""
    return _hierarchical(units, dist.Laplace(0.0, 1.0))


def independent_prior(units: Units) -> tuple[dict, dict]:
    """No pooling: every intercept alpha_g ~ Normal(0, 3) on its own (an ablation)."""
    alpha = {kind: numpyro.sample(f"alpha_{kind}", dist.Normal(0.0, 3.0).expand(shape).to_event(len(shape)))
             for kind, shape in _shapes(units).items()}
    margin = _layer_margin()
    alpha["attn_layer"] = alpha["attn_layer"] + margin[0]
    alpha["mlp_layer"] = alpha["mlp_layer"] + margin[1]
    return alpha, _slopes(units)


PRIORS: dict[str, Callable[[Units], tuple[dict, dict]]] = {
    "hierarchical": hierarchical_prior,
    "design": design_prior,
    "laplace": laplace_prior,
    "independent": independent_prior,
}


def get_prior(name: str) -> Callable[[Units], tuple[dict, dict]]:
    if name not in PRIORS:
        raise ValueError(f"unknown prior {name!r}; choose one of {', '.join(PRIORS)}")
    return PRIORS[name]


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
    """E[S]: expected kept prunable parameters given each gate's open probability.

    A unit is kept if it and its layer are open (independent gates); a KV head
    if any of its query heads is; a layer's norm if the layer is open.
    """
    L, K, G = units.num_layers, units.config.num_kv_heads, units.config.group_size
    heads = p["attn_layer"][:, None] * p["head"]
    # The layer gate is shared by a KV head's query heads: P(kv) = P(layer) P(any head).
    kv = p["attn_layer"][:, None] * (1.0 - jnp.prod(1.0 - p["head"].reshape(L, K, G), axis=-1))
    groups = p["mlp_layer"][:, None] * p["mlp_group"]
    return (units.attn_fixed_cost * p["attn_layer"].sum() + units.head_cost * heads.sum()
            + units.kv_cost * kv.sum() + units.mlp_fixed_cost * p["mlp_layer"].sum()
            + (groups * jnp.asarray(units.group_costs, groups.dtype)).sum())


def push_offset(units: Units, logits: dict, rho: jax.Array, temperature) -> jax.Array:
    """c(rho) with E[S](eta - c) = rho * S_total, differentiable in `logits`.

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
    target = jnp.clip(rho, 1e-4, 1 - 1e-4) * units.total

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
                      weights=None, distill_weight: float = 0.0, teacher_weight: float = 0.0,
                      teacher_temperature: float = 1.0, rescale: bool = False, constraint: str = "offset",
                      compute_dtype=None):
    """One step's joint density: prior on gates, hard-concrete gates at size rho,
    and the tokens of `batch` under the gated network.

    The token term is a generalised (Gibbs) likelihood: exp(-scale * loss) with
    loss = (1 - w) * NLL + w * tau^2 * KL(teacher || gated network), summed over
    the batch's tokens and scaled by data_tokens / (B*T) / likelihood_temperature,
    so that, like the plain likelihood, it counts as the whole data set. With
    w = 0 it is the token likelihood itself.

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
        weights: the network's `nnx.Param` state when `train_weights` is False.
        distill_weight: weight of a self-distillation KL from the ungated pass
            (stop-gradient teacher) to the gated pass, in nats per token.
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

    Returns:
        The gate samples, a dict by kind (with a leading B axis when rho is (B,)).
    """
    from flax import nnx

    if teacher_weight > 0 and teacher_logits is None:
        raise ValueError("teacher_weight > 0 needs teacher_logits")
    rho = jnp.asarray(rho, jnp.float32)
    alpha, beta = get_prior(prior)(units)
    logits = gate_logits(alpha, beta, rho)
    if constraint == "offset":
        solve = functools.partial(push_offset, units, temperature=temperature)
        offset = jax.vmap(solve)(logits, rho) if rho.ndim else solve(logits, rho)
    elif constraint == "lagrange":
        offset = jnp.zeros(rho.shape)
    else:
        raise ValueError(f"unknown size constraint {constraint!r}; choose 'offset' or 'lagrange'")
    shifted = {k: v - _per_size(offset, alpha[k]) for k, v in logits.items()}
    keys = jax.random.split(numpyro.prng_key(), len(KINDS))
    z = {k: sample_hard_concrete(key, shifted[k], temperature) for k, key in zip(KINDS, keys)}
    scales = None
    if rescale:
        gamma = {k: numpyro.param(f"rescale_{k}", jnp.zeros(units.shapes()[k])) for k in RESCALE_KINDS}
        scales = rescale_factors(gamma, rho)

    if train_weights:
        net = nnx_module("llama", network)
        if compute_dtype is not None and compute_dtype != network.dtype:
            graphdef, state, rest = nnx.split(net, nnx.Param, ...)
            net = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(compute_dtype), state), rest)
    else:
        graphdef, _ = nnx.split(network, nnx.Param)
        net = nnx.merge(graphdef, jax.lax.stop_gradient(weights))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    out = net(inputs, gates=block_gates(units, z, scales))
    nll, teacher_kl = token_losses(out, targets, None if teacher_weight == 0 else teacher_logits,
                                   teacher_temperature)
    n_tokens = targets.size
    scale = data_tokens / n_tokens / likelihood_temperature
    numpyro.factor("tokens", -((1 - teacher_weight) * nll + teacher_weight * teacher_kl) * scale)
    kl = jnp.zeros(())
    if distill_weight > 0:
        teacher = jax.lax.stop_gradient(net(inputs))
        logp_t = jax.nn.log_softmax(teacher, -1)
        kl = (jnp.exp(logp_t) * (logp_t - jax.nn.log_softmax(out.astype(jnp.float32), -1))).sum()
        numpyro.factor("distill", -distill_weight * kl * scale)

    p_open = {k: open_probability(v, temperature) for k, v in shifted.items()}
    expected = (jax.vmap(functools.partial(expected_size, units))(p_open) if rho.ndim
                else expected_size(units, p_open))
    if constraint == "lagrange":
        numpyro.factor("size", -lagrange_penalty(expected / units.total - rho) * data_tokens / likelihood_temperature)
    metrics = numpyro_mutable("ppn$metrics", {"nll": jnp.zeros(()), "expected_size": jnp.zeros(rho.shape),
                                              "offset": jnp.zeros(rho.shape), "distill_kl": jnp.zeros(()),
                                              "teacher_kl": jnp.zeros(())})
    metrics["nll"] = jax.lax.stop_gradient(nll / n_tokens)
    metrics["expected_size"] = jax.lax.stop_gradient(expected / units.total)
    metrics["offset"] = jax.lax.stop_gradient(offset)
    metrics["distill_kl"] = jax.lax.stop_gradient(kl / n_tokens)
    metrics["teacher_kl"] = jax.lax.stop_gradient(teacher_kl / n_tokens)
    return z
