"""The fitted posterior over the push function, and what it says without weights.

A fit's guide is a Normal over every latent site of the prior in unconstrained
space: mean-field (AutoNormal), low-rank (its factor kept, so draws keep the
correlations between sites), or a point (AutoDelta, zero scale). Pushed through
the prior (`ppn.priors.PRIORS`), its draws give every gate's intercept alpha_g
and slope beta_g, hence its logit eta_g(rho) = alpha_g + beta_g * logit(rho) at
any size rho (before the push offset, which shifts all gates alike). From a
`Posterior`:

- `draws(S)`: alpha and beta, dicts by kind of arrays (S, ...);
- `logit_draws(rho, S)` and `median_logits(rho)`: eta at a size, drawn or the
  posterior median (the ranking `ppn.plan.Plan.keep` fills the budget by);
- `open_probability(size)`: draws of every gate's P(z_g > 0) at a size, the push
  offset solved per draw;
- `crossing_sizes()`: draws of the size at which each gate becomes more likely
  closed than open;
- `summary()`: posterior mean, sd and quantiles of what the data identify: the
  intercepts (centred by the prior, `ppn.priors.centred`), the slopes relative
  to their mean, and the crossing sizes;
- `to_arviz()`: draws as `arviz.InferenceData` with dims (layer, head|group).

Shapes: L blocks, N query heads, M MLP groups; by kind "attn_layer" (L,),
"mlp_layer" (L,), "head" (L, N), "mlp_group" (L, M) (`ppn.units.KINDS`).
`ppn.plan.Plan` is a posterior with provenance, kept in a file, that turns sizes
into structures.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.distributions import biject_to, constraints

from ppn import bayes, priors
from ppn.gates import STRETCH_HI, STRETCH_LO
from ppn.units import KINDS, RESCALE_KINDS, Units

SITE_READERS: dict[str, Callable] = {}
"""Readers of registered guides' parameters into sites (`ppn.svi.register_guide`)."""

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
# Draws behind `median_logits`, fixed (seed 0) so that a posterior always ranks alike.
RANKING_DRAWS = 256


@dataclasses.dataclass(frozen=True)
class Site:
    """The guide's Normal over one latent site, in unconstrained space:
    u = loc + factor @ e + scale * n, with n (the site's shape) and e (K,)
    standard Normal, e shared by every site of a low-rank guide.

    Attributes:
        loc, scale: arrays of the site's shape (scale: the diagonal part).
        positive: whether the site's support is positive (mapped through exp).
        factor: the site's rows of a low-rank guide's covariance factor, shape
            (*loc.shape, K), or None (mean-field).
    """

    loc: np.ndarray
    scale: np.ndarray
    positive: bool
    factor: np.ndarray | None = None

    @property
    def sd(self) -> np.ndarray:
        """The marginal standard deviation, of the site's shape."""
        return self.scale if self.factor is None else np.sqrt(self.scale ** 2 + (self.factor ** 2).sum(-1))


@dataclasses.dataclass(frozen=True, eq=False)
class Posterior:
    """The posterior over every gate's alpha_g and beta_g (and the rescaling point estimates).

    Attributes:
        units: the dense model's unit registry (config and group width).
        prior: the name of the prior the fit used (`ppn.priors.PRIORS`).
        sites: the guide's per-site Normal (mean-field) posterior, by latent site name.
        rescale: the fitted rescaling exponents gamma by `RESCALE_KINDS` kind
            (point estimates shaped as `Units.shapes`), or None when the fit learned no rescaling.
    """

    units: Units
    prior: str
    sites: dict[str, Site]
    rescale: dict[str, np.ndarray] | None = None

    @classmethod
    def from_guide_params(cls, units: Units, prior: str, guide_params: dict[str, np.ndarray], guide: str | None = None):
        """Builds the posterior from AutoNormal parameters (`<site>_auto_loc`, `<site>_auto_scale`),
        from AutoLowRankMultivariateNormal ones (`auto_loc`, `auto_cov_factor`,
        `auto_scale`: each site keeps its rows of the factor), or from AutoDelta
        ones (`<site>_auto_loc` alone: the MAP point, a Normal of zero scale).
        Rescaling exponents come from `rescale_<kind>`. A guide registered with
        its own reader (`ppn.svi.register_guide`) is read by it when `guide` names it."""
        supports = prior_supports(units, prior)
        rescale = ({k: np.asarray(guide_params[f"rescale_{k}"], np.float32) for k in RESCALE_KINDS}
                   if "rescale_head" in guide_params else None)
        if guide in SITE_READERS:
            return cls(units, prior, SITE_READERS[guide](units, prior, guide_params), rescale)
        if "auto_cov_factor" in guide_params:
            return cls(units, prior, flat_sites(units, prior, guide_params["auto_loc"], guide_params["auto_scale"],
                                                guide_params["auto_cov_factor"]), rescale)
        sites = {}
        for name, positive in supports.items():
            if f"{name}_auto_loc" not in guide_params:
                raise ValueError(f"guide parameters lack site {name!r} of the {prior!r} prior; "
                                 "plans read AutoNormal, low-rank and AutoDelta guides, and guides registered "
                                 "with a reader (ppn.svi.register_guide)")
            loc = np.asarray(guide_params[f"{name}_auto_loc"], np.float32)
            if f"{name}_auto_scale" in guide_params:
                scale = np.asarray(guide_params[f"{name}_auto_scale"], np.float32)
            else:  # AutoDelta: the MAP point, kept in constrained space, as a Normal of zero scale
                loc, scale = (np.log(loc) if positive else loc), np.zeros_like(loc)
            sites[name] = Site(loc, scale, positive)
        return cls(units, prior, sites, rescale)

    def check(self) -> None:
        """Raises ValueError unless the sites are the prior's (names, shapes, finite
        locations, scales >= 0, one low-rank factor rank or none) and the rescaling,
        if any, has every kind at its shape with finite values."""
        if self.rescale is not None:
            shapes = self.units.shapes()
            if set(self.rescale) != set(RESCALE_KINDS):
                raise ValueError(f"rescale has kinds {sorted(self.rescale)}, expected {sorted(RESCALE_KINDS)}")
            for k, v in self.rescale.items():
                if v.shape != shapes[k] or not np.all(np.isfinite(v)):
                    raise ValueError(f"rescale {k!r} has shape {v.shape} (expected {shapes[k]}) or non-finite values")
        sites, shapes = self.sites, prior_shapes(self.units, self.prior)
        if set(shapes) != set(sites):
            raise ValueError(f"sites {sorted(sites)} do not match the {self.prior!r} prior's {sorted(shapes)}")
        ranks = {s.factor.shape[-1:] for s in sites.values() if s.factor is not None}
        for k, s in sites.items():
            if s.loc.shape != shapes[k] or s.scale.shape != shapes[k]:
                raise ValueError(f"site {k!r} has shape {s.loc.shape}, expected {shapes[k]}")
            if not (np.all(np.isfinite(s.loc)) and np.all(np.isfinite(s.scale) & (s.scale >= 0))):  # 0: MAP
                raise ValueError(f"site {k!r} has non-finite locations or scales, or negative scales")
            if s.factor is not None and (s.factor.shape[:-1] != shapes[k] or len(ranks) > 1
                                         or not np.all(np.isfinite(s.factor))):
                raise ValueError(f"site {k!r} has a low-rank factor of shape {s.factor.shape} (expected "
                                 f"{shapes[k]} + (rank,), one rank for every site) or non-finite values")
        if ranks and any(s.factor is None for s in sites.values()):
            raise ValueError("some sites have a low-rank factor and some do not")

    # ----------------------------------------------------------------- draws
    def draws(self, num_samples: int, seed: int = 0) -> tuple[dict, dict]:
        """Posterior draws of every gate's alpha and beta: dicts by kind of arrays (S, ...)."""
        latents = {name: biject_to(constraints.positive)(u) if self.sites[name].positive else u
                   for name, u in self.latent_draws(num_samples, seed).items()}

        def one(values):
            with numpyro.handlers.seed(rng_seed=0), numpyro.handlers.substitute(data=values):
                return priors.get_prior(self.prior)(self.units)

        alpha, beta = jax.vmap(one)(latents)
        return ({k: np.asarray(v) for k, v in alpha.items()}, {k: np.asarray(v) for k, v in beta.items()})

    def latent_draws(self, num_samples: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Draws of the guide in unconstrained space, by site (S, *site shape); a
        low-rank guide's sites share their factor's draw, so they keep its correlations."""
        keys = jax.random.split(jax.random.PRNGKey(seed), len(self.sites) + 1)
        rank = max((s.factor.shape[-1] for s in self.sites.values() if s.factor is not None), default=0)
        shared = np.asarray(jax.random.normal(keys[-1], (num_samples, rank)))  # e, shared by every site
        out = {}
        for key, (name, site) in zip(keys, sorted(self.sites.items())):
            u = site.loc + site.scale * np.asarray(jax.random.normal(key, (num_samples,) + site.loc.shape))
            if site.factor is not None:
                u = u + np.einsum("...k,sk->s...", site.factor, shared)
            out[name] = u
        return out

    @functools.cached_property
    def _ranking_draws(self) -> tuple[dict, dict]:
        return self.draws(RANKING_DRAWS, seed=0)

    def logit_draws(self, rho: float, num_samples: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Posterior draws of every gate's eta_g(rho) at a size rho in (0, 1): dict by kind of (S, ...)."""
        return _logits(*self.draws(num_samples, seed), rho)

    def median_logits(self, rho: float) -> dict[str, np.ndarray]:
        """Posterior-median eta_g(rho) of every gate (no offset: it does not change the order)."""
        return {k: np.median(v, axis=0) for k, v in _logits(*self._ranking_draws, rho).items()}

    # ------------------------------------------------------------- summaries
    def open_probability(self, size: float, num_samples: int = 200, temperature: float = 0.2,
                         seed: int = 0) -> dict[str, np.ndarray]:
        """Draws of every gate's P(z_g > 0) at `size` in (0, 1), the push offset solved
        per draw at the hard-concrete `temperature` (the fit's final one by default):
        dict by kind of (S, ...). Identified: no invariant direction moves it."""
        alpha, beta = self.draws(num_samples, seed)
        return {k: v[:, 0] for k, v in _open_probabilities(self.units, alpha, beta, [size], temperature).items()}

    def undecided_share(self, size: float, low: float = 0.05, high: float = 0.95, num_samples: int = 200) -> float:
        """The share of gates whose posterior-mean open probability at `size` lies in
        (low, high): units whose keep decision the posterior leaves open. Near 0 the
        posterior's spread changes no decision at that size."""
        means = np.concatenate([v.mean(0).ravel() for v in self.open_probability(size, num_samples).values()])
        return float(((means > low) & (means < high)).mean())

    def crossing_sizes(self, num_samples: int = 200, temperature: float = 0.2, seed: int = 0) -> dict[str, np.ndarray]:
        """Draws of every gate's crossing size: the largest size at which it is more
        likely closed than open (`crossing_sizes`); dict by kind of (S, ...)."""
        return crossing_sizes(self.units, *self.draws(num_samples, seed), temperature)

    def summary(self, num_samples: int = 400, temperature: float = 0.2) -> dict[str, dict[str, list]]:
        """Posterior mean, sd and quantiles of what the data identify, for every gate by kind:
        "alpha_<kind>" (intercepts, centred by the prior), "beta_<kind>" (slopes minus
        their mean over all gates: a common shift of every slope changes no gate) and
        "crossing_<kind>" (`crossing_sizes` at `temperature`):
        {"alpha_head": {"mean": ..., "sd": ..., "q05": ..., ...}, ...}, nested lists of the gate shape."""
        alpha, beta = self.draws(num_samples, seed=1)
        mean_beta = np.concatenate([beta[k].reshape(num_samples, -1) for k in KINDS], 1).mean(1)
        beta_rel = {k: v - mean_beta.reshape((-1,) + (1,) * (v.ndim - 1)) for k, v in beta.items()}
        crossing = crossing_sizes(self.units, alpha, beta, temperature)
        out = {}
        for name, values in (("alpha", alpha), ("beta", beta_rel), ("crossing", crossing)):
            for k in KINDS:
                v = np.asarray(values[k], np.float64)
                out[f"{name}_{k}"] = {"mean": np.round(v.mean(0), 3).tolist(), "sd": np.round(v.std(0), 3).tolist(),
                                      **{f"q{int(q * 100):02d}": np.round(np.quantile(v, q, axis=0), 3).tolist()
                                         for q in QUANTILES}}
        return out

    def to_arviz(self, num_samples: int = 500, seed: int = 0, temperature: float = 0.2):
        """Posterior and prior draws as `arviz.InferenceData`, with named dims (layer,
        head, group): alpha, beta and (posterior only) the crossing sizes.

        The posterior draws are independent draws from the variational guide, stored
        as one chain; they are not MCMC samples, so R-hat and ESS do not apply (the
        attrs say so). The prior group lets `az.plot_dist_comparison` show how far
        the data moved each quantity.
        """
        alpha, beta = self.draws(num_samples, seed)
        return _arviz(self.units, self.prior, alpha, beta, seed, temperature)


def inference_data(result, batch, size: float = 0.5, num_samples: int = 100, seed: int = 0):
    """A fit at one size as `arviz.InferenceData`, for posterior-predictive checks
    and `az.loo` / `az.waic` on tokens: every group from the same guide draws.

    Groups: posterior (alpha, beta and crossing sizes by kind, as `to_arviz`),
    prior, observed_data ("tokens", the batch's next tokens (B, T)),
    posterior_predictive ("tokens" drawn from the gated network, gates drawn at
    the fit's final temperature) and log_likelihood ("tokens", each draw's
    per-token log-likelihood, its gates at their medians). Draws come from the
    variational guide (one chain), at target size `size`.

    Args:
        result: a `ppn.fit.FitResult`.
        batch: int (B, T+1) token windows, ideally held out.
    """
    from numpyro.infer import Predictive, log_likelihood

    from ppn import svi
    from ppn.gates import unflatten

    model, guide, params = svi.model_and_guide(result)
    temperature = result.config.temperature_end
    batch = jnp.asarray(batch)
    key_draw, key_predict = jax.random.split(jax.random.PRNGKey(seed))
    latents = Predictive(guide, params=params, num_samples=num_samples)(key_draw, batch, size, temperature)
    drawn = Predictive(model, posterior_samples=latents, return_sites=["tokens", "alpha", "beta"])(
        key_predict, batch, size, temperature, predict=True)
    loglik = log_likelihood(model, latents, batch, size, temperature)["tokens"]
    alpha, beta = ({k: np.asarray(v) for k, v in unflatten(result.units, drawn[n]).items()} for n in ("alpha", "beta"))
    return _arviz(result.units, result.config.prior, alpha, beta, seed, temperature, guide=result.config.guide,
                  size=size,
                  observed_data={"tokens": np.asarray(batch[:, 1:])},
                  posterior_predictive={"tokens": np.asarray(drawn["tokens"])[None]},
                  log_likelihood={"tokens": np.asarray(loglik)[None]})


def _arviz(units: Units, prior: str, alpha: dict, beta: dict, seed: int, temperature: float,
           guide: str | None = None, size: float | None = None, **token_groups):
    """InferenceData of draws of alpha and beta (by kind, (S, ...)), their crossing
    sizes, the prior's draws, and `token_groups` (arviz group -> {"tokens": array})."""
    import arviz as az

    num_samples = next(iter(alpha.values())).shape[0]
    crossing = crossing_sizes(units, alpha, beta, temperature)
    prior_alpha, prior_beta = jax.vmap(lambda key: numpyro.handlers.seed(priors.get_prior(prior), key)(units))(
        jax.random.split(jax.random.PRNGKey(seed), num_samples))  # a key per draw, inside the vmap
    dims = {"attn_layer": ["layer"], "mlp_layer": ["layer"], "head": ["layer", "head"],
            "mlp_group": ["layer", "group"]}

    def group(**named):
        return {f"{n}_{k}": np.asarray(v[k])[None] for n, v in named.items() for k in KINDS}

    token_dims = {"tokens": ["sequence", "position"]} if token_groups else {}
    return az.from_dict(
        posterior=group(alpha=alpha, beta=beta, crossing=crossing),
        prior=group(alpha=prior_alpha, beta=prior_beta), **token_groups,
        dims={f"{n}_{k}": dims[k] for n in ("alpha", "beta", "crossing") for k in KINDS} | token_dims,
        coords={"layer": np.arange(units.num_layers), "head": np.arange(units.num_heads),
                "group": np.arange(units.num_groups)},
        attrs={"inference_library": "numpyro", "inference": "variational: independent draws from the guide, one "
               "chain; not MCMC, so R-hat and ESS do not apply", "prior": prior,
               "guide": guide or "unknown", **({} if size is None else {"size": size})})


def _logits(alpha: dict, beta: dict, rho: float) -> dict[str, np.ndarray]:
    """eta_g(rho) = alpha_g + beta_g * logit(rho) of draws (S, ...) by kind, before the offset
    (`ppn.bayes.gate_logits` in NumPy, on draws)."""
    lr = np.log(rho) - np.log1p(-rho)
    return {k: alpha[k] + beta[k] * lr for k in KINDS}


CROSSING_GRID = np.round(np.linspace(0.02, 0.98, 49), 4)
"""Sizes at which `crossing_sizes` solves the push offset; crossings between them are interpolated."""


@functools.partial(jax.jit, static_argnums=0)
def _offsets(units: Units, alpha: dict, beta: dict, sizes: jax.Array, temperature) -> jax.Array:
    """Push offsets (S, R) of draws (S, ...) at R sizes."""
    def one(a, b, rho):
        return bayes.push_offset(units, bayes.gate_logits(a, b, rho), rho, temperature)

    per_size = jax.vmap(one, in_axes=(None, None, 0))
    return jax.vmap(per_size, in_axes=(0, 0, None))(alpha, beta, sizes)


def _margins(units: Units, alpha: dict, beta: dict, sizes, temperature: float) -> dict[str, np.ndarray]:
    """eta_g(rho) - c(rho) - temperature * log(-lo / hi) of draws (S, ...) at R sizes, by
    kind (S, R, ...): positive where the gate is more likely open than closed."""
    sizes = np.asarray(sizes, np.float32)
    jalpha = {k: jnp.asarray(v, jnp.float32) for k, v in alpha.items()}
    jbeta = {k: jnp.asarray(v, jnp.float32) for k, v in beta.items()}
    c = np.asarray(_offsets(units, jalpha, jbeta, jnp.asarray(sizes), jnp.float32(temperature)))
    lr = np.log(sizes) - np.log1p(-sizes)
    shift = temperature * np.log(-STRETCH_LO / STRETCH_HI)
    out = {}
    for k in KINDS:
        extra = (1,) * (alpha[k].ndim - 1)
        out[k] = (alpha[k][:, None] + beta[k][:, None] * lr.reshape((1, -1) + extra)
                  - c.reshape(c.shape + extra) - shift)
    return out


def _open_probabilities(units: Units, alpha: dict, beta: dict, sizes, temperature: float) -> dict[str, np.ndarray]:
    """P(z_g > 0) of draws (S, ...) at R sizes with the offset solved at each, by kind (S, R, ...)."""
    return {k: 1.0 / (1.0 + np.exp(-m)) for k, m in _margins(units, alpha, beta, sizes, temperature).items()}


def crossing_sizes(units: Units, alpha: dict, beta: dict, temperature: float = 0.2,
                   grid=CROSSING_GRID) -> dict[str, np.ndarray]:
    """Each gate's crossing size for draws of alpha and beta (S, ...) by kind: the
    largest size on `grid` below which it is more likely closed than open, with
    the push offset solved at every size and the crossing interpolated linearly
    between grid sizes; the grid's ends where the gate never (or always) closes.

    Identified whatever the invariant directions of the model (a common shift of
    every intercept, or of every slope): the offset absorbs both.
    """
    grid = np.asarray(grid, np.float64)
    out = {}
    for k, m in _margins(units, alpha, beta, grid, temperature).items():
        m = np.moveaxis(m, 1, -1)  # (S, ..., R)
        closed = m <= 0
        # the last closed grid index, -1 when open everywhere
        last = np.where(closed.any(-1), closed.shape[-1] - 1 - np.argmax(closed[..., ::-1], -1), -1)
        nxt = np.minimum(last + 1, len(grid) - 1)
        m0 = np.take_along_axis(m, np.maximum(last, 0)[..., None], -1)[..., 0]
        m1 = np.take_along_axis(m, nxt[..., None], -1)[..., 0]
        frac = np.where((last >= 0) & (nxt > last), m0 / np.where(m0 == m1, -1.0, m0 - m1), 0.0)
        x = grid[np.maximum(last, 0)] + np.clip(frac, 0.0, 1.0) * (grid[nxt] - grid[np.maximum(last, 0)])
        out[k] = np.where(last < 0, grid[0], np.where(last == len(grid) - 1, grid[-1], x)).astype(np.float32)
    return out


# ------------------------------------------------------- the prior's structure
def _prior_trace(units: Units, prior: str):
    return numpyro.handlers.trace(numpyro.handlers.seed(priors.get_prior(prior), 0)).get_trace(units)


def prior_supports(units: Units, prior: str) -> dict[str, bool]:
    """Latent sites of the prior and whether each is positive-valued (else real)."""
    supports = {}
    for name, site in _prior_trace(units, prior).items():
        if site["type"] == "sample":
            support = site["fn"].support
            support = getattr(support, "base_constraint", support)  # unwrap to_event
            if support not in (constraints.real, constraints.positive):
                raise ValueError(f"prior site {name!r} has support {support}; plans handle real and positive")
            supports[name] = support is constraints.positive
    return supports


def prior_shapes(units: Units, prior: str) -> dict[str, tuple]:
    """Latent sites of the prior and their shapes, in the model's trace order."""
    return {n: tuple(np.shape(s["value"])) for n, s in _prior_trace(units, prior).items() if s["type"] == "sample"}


def flat_sites(units: Units, prior: str, loc, scale, factor=None) -> dict[str, Site]:
    """The sites of a guide over one flat latent vector (D,), sorted by name: a
    diagonal Normal (loc, scale), or a low-rank one whose covariance is
    diag(s) (W W^T + I) diag(s), W = `factor` (D, K), s = `scale`, i.e.
    u = loc + diag(s) W e + s * n: a site's factor is its rows of diag(s) W.

    numpyro's flat guides pack sites in the key order of their initial values, and
    `ppn.svi.init_fit` sets the guide up inside `jax.jit`, whose dicts come back sorted.
    """
    loc, scale = np.asarray(loc, np.float32), np.asarray(scale, np.float32)
    w = None if factor is None else np.asarray(factor, np.float32)
    supports = prior_supports(units, prior)
    out, start = {}, 0
    for name, shape in sorted(prior_shapes(units, prior).items()):
        part = slice(start, start + int(np.prod(shape)))
        rows = None if w is None else (scale[part, None] * w[part]).reshape(shape + (w.shape[-1],))
        out[name] = Site(loc[part].reshape(shape), scale[part].reshape(shape), supports[name], rows)
        start = part.stop
    if start != loc.size:
        raise ValueError(f"the guide has {loc.size} latent values; the {prior!r} prior has {start}")
    return out
