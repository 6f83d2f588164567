"""The plan: the fitted posterior over the push function, in a small JSON file.

A plan holds the dense model's config, the unit registry's group width, the
prior's name and the guide's variational parameters (a location and a scale per
latent coordinate, a few thousand numbers). From these alone, without weights:

- `keep(size)` ranks every unit by its posterior-median logit eta_g(rho) (a
  unit's score capped by its layer's) and fills the budget greedily, most
  important first, so the kept size is at most the target and within one
  unit's cost of it;
- `keep_probability(size)` repeats that ranking for posterior draws and gives
  each unit's probability of being kept;
- `summary()` gives posterior mean, sd and quantiles of every alpha_g and beta_g;
- with a fit that learned size-dependent rescaling, `keep(size)` also carries the
  factors at that size (`ppn.bayes.rescale_factors`), which `ppn.prune` folds
  into the kept weights;
- `to_arviz()` exports draws as `arviz.InferenceData` with dims (layer, head|group).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.distributions import biject_to

from ppn import bayes
from ppn.units import KINDS, RESCALE_KINDS, KeepSet, Units
from ppn.models.config import LlamaConfig
from ppn.runs import atomic_write_text

PLAN_FORMAT = "ppn-plan/1"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
RANKING_DRAWS = 256


@dataclasses.dataclass(frozen=True)
class Site:
    """The guide's Normal over one latent site, in unconstrained space.

    Attributes:
        loc, scale: arrays of the site's shape.
        positive: whether the site's support is positive (mapped through exp).
    """

    loc: np.ndarray
    scale: np.ndarray
    positive: bool


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """A fitted size-to-structure map.

    Attributes:
        units: the dense model's unit registry (config and group width).
        prior: the name of the prior the plan was fitted with.
        sites: the guide's per-site Normal (mean-field) posterior.
        meta: free-form provenance (fit config, tokens seen, seconds).
        rescale: the fitted rescaling exponents gamma by `RESCALE_KINDS` kind
            (point estimates), or None when the fit learned no rescaling.
    """

    units: Units
    prior: str
    sites: dict[str, Site]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    rescale: dict[str, np.ndarray] | None = None

    # -------------------------------------------------------------- creation
    @classmethod
    def from_guide_params(cls, units: Units, prior: str, guide_params: dict[str, np.ndarray],
                          meta: dict[str, Any] | None = None) -> Plan:
        """Builds a plan from AutoNormal parameters (`<site>_auto_loc`, `<site>_auto_scale`),
        or from AutoLowRankMultivariateNormal ones (`auto_loc`, `auto_cov_factor`,
        `auto_scale`), of which the plan keeps each site's marginal Normal: the
        ranking uses medians, which marginals keep exactly; draws lose the
        correlations between sites."""
        supports = _prior_supports(units, prior)
        if "auto_loc" in guide_params:
            guide_params = _lowrank_marginals(units, prior, guide_params)
        sites = {}
        for name, positive in supports.items():
            try:
                loc, scale = guide_params[f"{name}_auto_loc"], guide_params[f"{name}_auto_scale"]
            except KeyError as e:
                raise ValueError(f"guide parameters lack site {name!r} of the {prior!r} prior; "
                                 "plans are built from an AutoNormal or low-rank guide") from e
            sites[name] = Site(np.asarray(loc, np.float32), np.asarray(scale, np.float32), positive)
        rescale = ({k: np.asarray(guide_params[f"rescale_{k}"], np.float32) for k in RESCALE_KINDS}
                   if "rescale_head" in guide_params else None)
        return cls(units, prior, sites, dict(meta or {}), rescale)

    @classmethod
    def from_fit(cls, result, meta: dict[str, Any] | None = None) -> Plan:
        """The plan of a `ppn.fit.FitResult`."""
        cfg = result.config
        info = {"fit": dataclasses.asdict(cfg), "train_tokens": cfg.train_tokens,
                "nonfinite_steps": result.nonfinite_steps} | dict(meta or {})
        return cls.from_guide_params(result.units, cfg.prior, result.guide_params, info)

    # --------------------------------------------------------------- file I/O
    def to_json(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "config": self.units.config.to_hf(),
            "group_width": self.units.group_width,
            "prior": self.prior,
            "sites": {k: {"loc": _short(s.loc), "scale": _short(s.scale), "positive": s.positive}
                      for k, s in self.sites.items()},
            "gates": self.summary(),
            "meta": self.meta,
        } | ({} if self.rescale is None else {"rescale": {k: _short(v) for k, v in self.rescale.items()}})

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the plan as JSON, atomically."""
        return atomic_write_text(path, json.dumps(self.to_json(), separators=(",", ":"), default=_json_default))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Reads a plan file.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is not a valid plan (names the file and the problem).
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no plan file at {path}")
        try:
            doc = json.loads(path.read_text())
            _expect_dicts(doc, "the document")
            _expect_dicts(doc.get("config"), "config")
            _expect_dicts(doc.get("sites"), "sites", nested=True)
            if "rescale" in doc:
                _expect_dicts(doc["rescale"], "rescale")
            if doc.get("format") != PLAN_FORMAT:
                raise ValueError(f"format is {doc.get('format')!r}, expected {PLAN_FORMAT!r}")
            units = Units(LlamaConfig.from_hf(doc["config"]), int(doc["group_width"]))
            sites = {k: Site(np.asarray(v["loc"], np.float32), np.asarray(v["scale"], np.float32),
                             bool(v["positive"])) for k, v in doc["sites"].items()}
            rescale = doc.get("rescale")
            if rescale is not None:
                rescale = {k: np.asarray(v, np.float32) for k, v in rescale.items()}
                shapes = units.shapes()
                if set(rescale) != set(RESCALE_KINDS):
                    raise ValueError(f"rescale has kinds {sorted(rescale)}, expected {sorted(RESCALE_KINDS)}")
                for k, v in rescale.items():
                    if v.shape != shapes[k] or not np.all(np.isfinite(v)):
                        raise ValueError(f"rescale {k!r} has shape {v.shape} (expected {shapes[k]}) "
                                         "or non-finite values")
            plan = cls(units, doc["prior"], sites, doc.get("meta", {}), rescale)
            expected = _prior_supports(units, plan.prior)
            if set(expected) != set(sites):
                raise ValueError(f"sites {sorted(sites)} do not match the {plan.prior!r} prior's {sorted(expected)}")
            shapes = _prior_shapes(units, plan.prior)
            for k, s in sites.items():
                if s.loc.shape != shapes[k] or s.scale.shape != shapes[k]:
                    raise ValueError(f"site {k!r} has shape {s.loc.shape}, expected {shapes[k]}")
                if not (np.all(np.isfinite(s.loc)) and np.all(s.scale > 0)):
                    raise ValueError(f"site {k!r} has non-finite locations or non-positive scales")
        # A hand-edited config can fail deep in LlamaConfig (an attribute of a wrong
        # type, a zero head count); all of it is the file's fault, named as such.
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as e:
            raise ValueError(f"{path} is not a valid ppn plan: {e}") from e
        return plan

    # ----------------------------------------------------------------- draws
    def draws(self, num_samples: int, seed: int = 0) -> tuple[dict, dict]:
        """Posterior draws of every gate's alpha and beta: dicts by kind of arrays (S, ...)."""
        return _draws(self, num_samples, seed)

    @functools.cached_property
    def _ranking_draws(self) -> tuple[dict, dict]:
        return self.draws(RANKING_DRAWS, seed=0)

    def median_logits(self, rho: float) -> dict[str, np.ndarray]:
        """Posterior-median eta_g(rho) of every gate (no offset: it does not change the order)."""
        alpha, beta = self._ranking_draws
        lr = np.log(rho) - np.log1p(-rho)
        return {k: np.median(alpha[k] + beta[k] * lr, axis=0) for k in KINDS}

    # ------------------------------------------------------------- resizing
    def keep(self, size: float | int, uniform: bool = False) -> KeepSet:
        """The units to keep at `size` (a fraction of prunable parameters in (0, 1],
        or an absolute count of them). Deterministic; reads no weights.

        By default (`fill_budget`) each block keeps what the ranking gives it, and
        the kept size is at most the budget and within one unit's cost (a head
        with its KV head and norm, or an MLP group with its norm) of it.

        With `uniform=True` (`fill_uniform`) every block is kept, with the same
        number of whole KV groups and of MLP groups: the pruned model is a
        standard dense one that a Hugging Face config describes.
        """
        budget = self.units.budget(size)
        rho = float(np.clip(budget / self.units.total, 1e-6, 1 - 1e-6))
        if budget >= self.units.total:
            return self.units.full()
        keep = (fill_uniform if uniform else fill_budget)(self.units, self.median_logits(rho), budget)
        return keep if self.rescale is None else dataclasses.replace(keep, scales=self.scales(rho))

    def scales(self, size: float | int) -> dict[str, np.ndarray] | None:
        """The rescaling factors at `size` (`ppn.bayes.rescale_factors`), or None
        when the plan has no rescaling."""
        if self.rescale is None:
            return None
        rho = float(np.clip(self.units.budget(size) / self.units.total, 1e-6, 1.0))
        return {k: np.asarray(v) for k, v in bayes.rescale_factors(self.rescale, rho).items()}

    def soft_gates(self, size: float | int, temperature: float = 0.2, estimator: str = "louizos"):
        """Deterministic gates of the gated network at `size`, at the posterior-median
        logits eta with the push offset c solved so that the expected size at
        `temperature` is the target. Returns per-block `BlockGates`.

        estimator: "louizos", the hard-concrete test-time value of Louizos et al.
            clip(sigmoid(eta - c)(hi - lo) + lo, 0, 1), which ignores the
            temperature; or "median", the median of the gate's hard-concrete
            distribution at `temperature` (its sample at noise u = 1/2),
            clip(sigmoid((eta - c) / temperature)(hi - lo) + lo, 0, 1): at the
            fit's final temperature, the gate the network last trained around.
        """
        if estimator not in ("louizos", "median"):
            raise ValueError(f"unknown soft-gate estimator {estimator!r}; choose 'louizos' or 'median'")
        units = self.units
        rho = float(np.clip(units.budget(size) / units.total, 1e-6, 1 - 1e-6))
        logits = {k: jnp.asarray(v) for k, v in self.median_logits(rho).items()}
        c = bayes.push_offset(units, logits, jnp.float32(rho), temperature)
        scale = temperature if estimator == "median" else 1.0
        z = {k: jnp.clip(jax.nn.sigmoid((v - c) / scale) * (bayes.STRETCH_HI - bayes.STRETCH_LO) + bayes.STRETCH_LO,
                         0, 1)
             for k, v in logits.items()}
        scales = self.scales(size)
        return bayes.block_gates(units, z, None if scales is None else {k: jnp.asarray(v) for k, v in scales.items()})

    def keep_probability(self, size: float | int, num_samples: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
        """Each unit's posterior probability of being kept at `size`.

        Returns:
            {"attn_layer": (L,), "mlp_layer": (L,), "head": (L, N), "mlp_group": (L, M)}.
        """
        budget = self.units.budget(size)
        rho = float(np.clip(budget / self.units.total, 1e-6, 1 - 1e-6))
        alpha, beta = self.draws(num_samples, seed)
        lr = np.log(rho) - np.log1p(-rho)
        total = {k: 0.0 for k in KINDS}
        for s in range(num_samples):
            keep = fill_budget(self.units, {k: alpha[k][s] + beta[k][s] * lr for k in KINDS}, budget).effective()
            for k, v in zip(KINDS, (keep.attn, keep.mlp, keep.heads, keep.groups)):
                total[k] = total[k] + v
        return {k: np.asarray(v, np.float64) / num_samples for k, v in total.items()}

    # ------------------------------------------------------------- summaries
    def summary(self, num_samples: int = 1000) -> dict[str, dict[str, list]]:
        """Posterior mean, sd and quantiles of alpha and beta of every gate, by kind."""
        alpha, beta = self.draws(num_samples, seed=1)
        out = {}
        for name, values in (("alpha", alpha), ("beta", beta)):
            for k in KINDS:
                v = values[k]
                v = np.asarray(v, np.float64)
                out[f"{name}_{k}"] = {"mean": np.round(v.mean(0), 3).tolist(), "sd": np.round(v.std(0), 3).tolist(),
                                      **{f"q{int(q * 100):02d}": np.round(np.quantile(v, q, axis=0), 3).tolist()
                                         for q in QUANTILES}}
        return out

    def to_arviz(self, num_samples: int = 500, seed: int = 0):
        """Posterior draws of alpha and beta as `arviz.InferenceData` (one chain),
        with named dims: layer, head, group."""
        import arviz as az

        alpha, beta = self.draws(num_samples, seed)
        dims = {"attn_layer": ["layer"], "mlp_layer": ["layer"], "head": ["layer", "head"],
                "mlp_group": ["layer", "group"]}
        posterior = {f"{n}_{k}": v[k][None] for n, v in (("alpha", alpha), ("beta", beta)) for k in KINDS}
        return az.from_dict(
            posterior=posterior,
            dims={f"{n}_{k}": dims[k] for n in ("alpha", "beta") for k in KINDS},
            coords={"layer": np.arange(self.units.num_layers), "head": np.arange(self.units.num_heads),
                    "group": np.arange(self.units.num_groups)})

    def check_model(self, config: LlamaConfig) -> None:
        """Raises ValueError unless `config` is the dense architecture this plan was fitted on."""
        if config.replace(layers=None) != self.units.config or config.layers is not None:
            raise ValueError("the plan was fitted on another architecture than this model's "
                             f"(plan: {self.units.config}; model: {config})")


def _expect_dicts(value, what: str, nested: bool = False) -> None:
    """Raises ValueError unless `value` is a JSON object (and, with `nested`, so is each of its values)."""
    if not isinstance(value, dict) or (nested and not all(isinstance(v, dict) for v in value.values())):
        raise ValueError(f"{what} must be a JSON object{' of objects' if nested else ''}")


def fill_budget(units: Units, logits: dict[str, np.ndarray], budget: int) -> KeepSet:
    """Keeps units in decreasing order of score until the next one would exceed `budget`.

    A unit's score is its logit capped by its layer's logit (a unit can only be
    as important as the layer that carries it). Each unit's marginal cost adds
    its KV head when it is the first query head of that KV head, and the layer's
    fixed cost (norm) when it is the layer's first unit.
    """
    L, N, M = units.num_layers, units.num_heads, units.num_groups
    head_score = np.minimum(logits["head"], logits["attn_layer"][:, None]).reshape(-1)
    group_score = np.minimum(logits["mlp_group"], logits["mlp_layer"][:, None]).reshape(-1)
    score = np.concatenate([head_score, group_score])
    is_head = np.arange(score.size) < L * N
    layer = np.concatenate([np.repeat(np.arange(L), N), np.repeat(np.arange(L), M)])
    cost = np.concatenate([np.full(L * N, units.head_cost), np.tile(units.group_costs, L)]).astype(np.int64)
    kv_key = np.concatenate([np.repeat(np.arange(L), N) * units.config.num_kv_heads + np.tile(units.head_kv, L),
                             np.full(L * M, -1)])

    order = np.lexsort((np.arange(score.size), -score))  # stable: ties keep registry order
    first_layer = _first_occurrence(np.where(is_head, layer, L + layer)[order])
    first_kv = _first_occurrence(kv_key[order]) & is_head[order]
    fixed = np.where(is_head[order], units.attn_fixed_cost, units.mlp_fixed_cost)
    marginal = cost[order] + first_kv * units.kv_cost + first_layer * fixed
    fits = np.cumsum(marginal) <= budget
    n_kept = int(np.argmin(fits)) if not fits.all() else fits.size
    kept = np.zeros(score.size, bool)
    kept[order[:n_kept]] = True
    heads, groups = kept[: L * N].reshape(L, N), kept[L * N:].reshape(L, M)
    return KeepSet(units, heads.any(1), groups.any(1), heads, groups)


def fill_uniform(units: Units, logits: dict[str, np.ndarray], budget: int) -> KeepSet:
    """Keeps every block, each with its top k KV groups (all G query heads of each)
    and its top m MLP groups, for one k and one m shared by all blocks.

    Within a block, a KV group ranks by the mean logit of its G heads and an MLP
    group by its logit. The j-th best KV groups of all blocks form the j-th
    attention slice (cost L * (G * head_cost + kv_cost)), scored by the mean over
    blocks of their logits capped by their layer's, as in `fill_budget`; likewise
    the MLP slices. From the fewest of each kind, the next step of the
    better-scored kind is added while it fits; a kind stops at its first step that
    does not. So the ranking, not the arithmetic, splits the budget between
    attention and MLP, and at the end no further step of either kind fits.

    Two constraints keep the result a standard Hugging Face model: k only takes
    values with the hidden size a multiple of the k * G query heads (which
    transformers' config validation demands), an attention step adding the slices
    up to the next such k (scored by their mean); and when the last MLP group is
    narrower than the others (F not a multiple of the group width) it comes after
    them in every block, so that all blocks keep the same width.

    Raises:
        ValueError: the budget is below the smallest uniform model (the fewest KV
            groups and one MLP group in every block).
    """
    L, K, G, M = units.num_layers, units.config.num_kv_heads, units.config.group_size, units.num_groups
    kv_logit = logits["head"].reshape(L, K, G).mean(-1)
    group_key = logits["mlp_group"].copy()
    if units.group_widths[-1] < units.group_width:
        group_key[:, -1] = -np.inf

    def slices(unit_logit, layer_logit, key):
        order = np.argsort(-key, axis=1, kind="stable")  # (L, units) best first in each block
        capped = np.minimum(np.take_along_axis(unit_logit, order, 1), layer_logit[:, None])
        return order, np.minimum.accumulate(capped.mean(0))  # (units,) slice scores, non-increasing

    kv_order, kv_score = slices(kv_logit, logits["attn_layer"], kv_logit)
    group_order, group_score = slices(logits["mlp_group"], logits["mlp_layer"], group_key)
    kv_steps = [k for k in range(1, K + 1) if units.config.hidden_size % (k * G) == 0] or [K]
    kv_cost = L * (G * units.head_cost + units.kv_cost)
    group_cost = L * np.sort(units.group_costs)[::-1]  # a narrow last group is the last slice
    k, m = kv_steps[0], 1
    size = L * (units.attn_fixed_cost + units.mlp_fixed_cost) + k * kv_cost + int(group_cost[0])
    if size > budget:
        raise ValueError(f"a size of {budget:,} parameters is below the smallest uniform model ({size:,}: "
                         f"{k} KV group(s) and one MLP group in every block); use a larger size or uniform=False")
    open_kinds = {"attn", "mlp"}
    while True:
        k_next = next((s for s in kv_steps if s > k), None)
        options = [(kv_score[k:k_next].mean(), "attn")] if k_next and "attn" in open_kinds else []
        options += [(group_score[m], "mlp")] if m < M and "mlp" in open_kinds else []
        if not options:
            break
        kind = max(options, key=lambda o: o[0])[1]  # ties: attention (listed first)
        cost = (k_next - k) * kv_cost if kind == "attn" else int(group_cost[m])
        if size + cost > budget:
            open_kinds.discard(kind)
            continue
        size += cost
        k, m = (k_next, m) if kind == "attn" else (k, m + 1)

    kv = np.zeros((L, K), bool)
    np.put_along_axis(kv, kv_order[:, :k], True, 1)
    groups = np.zeros((L, M), bool)
    np.put_along_axis(groups, group_order[:, :m], True, 1)
    return KeepSet(units, np.ones(L, bool), np.ones(L, bool), np.repeat(kv, G, axis=1), groups)


def _first_occurrence(keys: np.ndarray) -> np.ndarray:
    first = np.zeros(keys.size, bool)
    first[np.unique(keys, return_index=True)[1]] = True
    return first


def _prior_trace(units: Units, prior: str):
    return numpyro.handlers.trace(numpyro.handlers.seed(bayes.get_prior(prior), 0)).get_trace(units)


def _prior_supports(units: Units, prior: str) -> dict[str, bool]:
    """Latent sites of the prior and whether each is positive-valued (else real)."""
    constraints = numpyro.distributions.constraints
    supports = {}
    for name, site in _prior_trace(units, prior).items():
        if site["type"] == "sample":
            support = site["fn"].support
            support = getattr(support, "base_constraint", support)  # unwrap to_event
            if support not in (constraints.real, constraints.positive):
                raise ValueError(f"prior site {name!r} has support {support}; plans handle real and positive")
            supports[name] = support is constraints.positive
    return supports


def _prior_shapes(units: Units, prior: str) -> dict[str, tuple]:
    return {n: tuple(np.shape(s["value"])) for n, s in _prior_trace(units, prior).items() if s["type"] == "sample"}


def _lowrank_marginals(units: Units, prior: str, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-site `<site>_auto_loc` / `_auto_scale` of a low-rank guide's marginals.

    The guide's latent vector (D,) concatenates the sites in the model's trace
    order; its covariance is diag(s) (W W^T + I) diag(s) with W (D, rank) the
    cov_factor and s the scale, so a coordinate's marginal sd is s_i sqrt(1 + |W_i|^2).
    """
    loc = np.asarray(params["auto_loc"], np.float64)
    w, s = np.asarray(params["auto_cov_factor"], np.float64), np.asarray(params["auto_scale"], np.float64)
    sd = s * np.sqrt(1.0 + (w ** 2).sum(-1))
    out, start = {}, 0
    for name, shape in _prior_shapes(units, prior).items():
        n = int(np.prod(shape))
        out[f"{name}_auto_loc"] = loc[start:start + n].reshape(shape)
        out[f"{name}_auto_scale"] = sd[start:start + n].reshape(shape)
        start += n
    if start != loc.size:
        raise ValueError(f"low-rank guide has {loc.size} latent values; the {prior!r} prior has {start}")
    return out


def _draws(plan: Plan, num_samples: int, seed: int) -> tuple[dict, dict]:
    keys = jax.random.split(jax.random.PRNGKey(seed), len(plan.sites))
    latents = {}
    for key, (name, site) in zip(keys, sorted(plan.sites.items())):
        u = site.loc + site.scale * jax.random.normal(key, (num_samples,) + site.loc.shape)
        latents[name] = biject_to(numpyro.distributions.constraints.positive)(u) if site.positive else u

    def one(values):
        with numpyro.handlers.seed(rng_seed=0), numpyro.handlers.substitute(data=values):
            return bayes.get_prior(plan.prior)(plan.units)

    alpha, beta = jax.vmap(one)(latents)
    return ({k: np.asarray(v) for k, v in alpha.items()}, {k: np.asarray(v) for k, v in beta.items()})


def _short(x: np.ndarray) -> list:
    """float32 values as nested lists of the shortest decimals that read back to the same float32."""
    return np.asarray(x, np.float32).astype(str).astype(np.float64).tolist()


def _json_default(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, jnp.ndarray):
        return np.asarray(o).tolist()
    raise TypeError(f"cannot serialise {type(o).__name__}")
