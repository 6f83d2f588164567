"""The priors over the gates' intercepts alpha_g and slopes beta_g.

Each prior is a function of the unit registry that samples its latent sites and
returns (alpha, beta), dicts by kind ("attn_layer" (L,), "mlp_layer" (L,),
"head" (L, N), "mlp_group" (L, M)). The default, `hierarchical_prior`, ties units
to their layer (non-centred); `PRIORS` names every choice of `FitConfig.prior`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from ppn.models.config import LlamaConfig
from ppn.units import KINDS, Units

# A small architecture on which `register_prior` checks a prior's output shapes.
_PROBE_CONFIG = LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                            num_kv_heads=2, head_dim=8)


def _slopes(units: Units) -> dict[str, jax.Array]:
    """beta_g = softplus(b_kind + s * zeta_g), shared by every prior."""
    shapes = units.gate_shapes()
    b = numpyro.sample("beta_loc", dist.Normal(1.0, 1.0).expand([len(KINDS)]).to_event(1))
    s = numpyro.sample("beta_scale", dist.HalfNormal(0.5))
    beta = {}
    for i, kind in enumerate(KINDS):
        zeta = numpyro.sample(f"zeta_{kind}", dist.Normal(0.0, 1.0).expand(shapes[kind]).to_event(len(shapes[kind])))
        beta[kind] = jax.nn.softplus(b[i] + s * zeta)
    return beta


def _hierarchical(units: Units, unit_noise: dist.Distribution, margin: bool = True) -> tuple[dict, dict]:
    shapes = units.gate_shapes()
    L = units.num_layers
    tau_layer = numpyro.sample("tau_layer", dist.HalfNormal(1.0))
    tau_unit = numpyro.sample("tau_unit", dist.HalfNormal(1.0))
    delta = numpyro.sample("delta", dist.Normal(0.0, 1.0).expand([L, 2]).to_event(2))
    margin = _layer_margin() if margin else jnp.zeros(2)
    # No global intercept, and the layer deviations centred: the push offset absorbs
    # any common shift of the logits, so the data cannot see one (see `centred`).
    layer_level = tau_layer * centred(delta)  # (L, 2): attention, MLP
    alpha = {"attn_layer": layer_level[:, 0] + margin[0], "mlp_layer": layer_level[:, 1] + margin[1]}
    for i, kind in enumerate(("head", "mlp_group")):
        eps = numpyro.sample(f"eps_{kind}", unit_noise.expand(shapes[kind]).to_event(2))
        alpha[kind] = layer_level[:, i, None] + tau_unit * eps
    return alpha, _slopes(units)


def centred(x: jax.Array) -> jax.Array:
    """x minus its mean over every axis.

    Identification: with the push offset c(rho) solved at every step, the token
    likelihood is exactly invariant to adding one constant to every gate logit, so
    a global intercept (and the mean of the layer deviations) would get no
    gradient from the data and only echo its prior. The priors therefore place
    the layer levels as centred deviations, and what a posterior reports of the
    intercepts is identified. The slopes keep one invariant direction, a common
    additive shift of every beta_g (it adds beta * logit(rho) to every logit alike):
    `ppn.posterior.Posterior.summary` reports them centred, and each unit's
    crossing size, which no invariant direction moves.
    """
    return x - x.mean()


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
    """No pooling: every intercept alpha_g ~ Normal(0, 3) on its own (an ablation),
    centred over all gates like the hierarchical prior's (`centred`)."""
    raw = {kind: numpyro.sample(f"alpha_{kind}", dist.Normal(0.0, 3.0).expand(shape).to_event(len(shape)))
           for kind, shape in units.gate_shapes().items()}
    mean = jnp.concatenate([v.ravel() for v in raw.values()]).mean()
    alpha = {k: v - mean for k, v in raw.items()}
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
    """The prior registered as `name`."""
    if name not in PRIORS:
        raise ValueError(f"unknown prior {name!r}; choose one of {', '.join(PRIORS)}, or register your own "
                         "with ppn.priors.register_prior before fitting or loading a plan of it")
    return PRIORS[name]


def register_prior(name: str, prior: Callable[[Units], tuple[dict, dict]]) -> None:
    """Makes `prior` available as `FitConfig(prior=name)` and to plans that name it.

    A prior samples its latent sites with `numpyro.sample` (real or positive
    supports, which plans can store) and returns (alpha, beta), dicts by kind of
    the gate shapes (`Units.gate_shapes`), beta > 0. A plan file records the name
    only: register the same prior before `Plan.load`. Keep a common shift of every
    intercept out of it (see `centred`): the data cannot identify one.

    Raises:
        ValueError: `name` is already taken, or `prior` does not return every gate's
            alpha and beta in its shape.
    """
    if name in PRIORS:
        raise ValueError(f"a prior named {name!r} is registered already")
    units = Units(_PROBE_CONFIG, 16)
    with numpyro.handlers.seed(rng_seed=0):
        alpha, beta = prior(units)
    shapes = units.gate_shapes()
    for what, values in (("alpha", alpha), ("beta", beta)):
        if set(values) != set(KINDS) or any(jnp.shape(values[k]) != shapes[k] for k in KINDS):
            raise ValueError(f"prior {name!r} must return {what} by kind {KINDS} of shapes {shapes}")
    PRIORS[name] = prior
