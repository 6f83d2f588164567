"""The plan: a fitted posterior with its provenance, in a small JSON file, and the
map from a size to the structure to keep.

A plan (`Plan`) is a `ppn.posterior.Posterior` (the dense model's config and unit
group width, the prior's name, the guide's location and scale for every latent
coordinate, a few thousand numbers, and any rescaling exponents) plus free-form
provenance `meta`. From it alone, without weights:

- `keep(size)` ranks every unit by its posterior-median logit eta_g(rho) (a
  unit's score capped by its layer's) and fills the budget greedily, most
  important first (`fill_budget`), so the kept size is at most the target and
  within one unit's cost of it; `keep(size, uniform=True)` keeps the same counts
  in every block (`fill_uniform`), a standard Hugging Face architecture;
- `keep_frequency(size)` repeats that fill for posterior draws and gives the
  share of draws that keep each unit (the keep decision's stability);
- with a fit that learned size-dependent rescaling, `keep(size)` also carries the
  factors at that size (`scales`, `ppn.bayes.rescale_factors`), which `ppn.prune`
  folds into the kept weights;
- `soft_gates(size)` gives deterministic gates of the gated network (`ppn.gates`).

`save` / `load` write and read the file (format `PLAN_FORMAT`); `load` validates
every field against the prior, and refuses plans of the older, unidentified
priors (`OLD_FORMATS`) with a message that says to refit.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from ppn import bayes, decisions, gates, speed
from ppn.models.config import LlamaConfig
from ppn.posterior import Posterior, Site
from ppn.runs import atomic_write
from ppn.units import KINDS, Costs, KeepSet, Units

PLAN_FORMAT = "ppn-plan/2"
# Plans of the priors before they were identified (a global intercept alpha0), which no longer load.
OLD_FORMATS = ("ppn-plan/1",)


@dataclasses.dataclass(frozen=True, eq=False)
class Plan(Posterior):
    """A fitted size-to-structure map: a posterior with its provenance.

    Attributes (besides `Posterior`'s units, prior, sites and rescale):
        meta: free-form provenance (fit config, tokens seen, seconds).
    """

    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    # -------------------------------------------------------------- creation
    @classmethod
    def from_guide_params(cls, units: Units, prior: str, guide_params: dict[str, np.ndarray],
                          guide: str | None = None, meta: dict[str, Any] | None = None) -> Plan:
        """`Posterior.from_guide_params` with provenance `meta`."""
        return dataclasses.replace(super().from_guide_params(units, prior, guide_params, guide),
                                   meta=dict(meta or {}))

    @classmethod
    def from_fit(cls, result, meta: dict[str, Any] | None = None) -> Plan:
        """The plan of a `ppn.fit.FitResult`."""
        cfg = result.config
        info = {"fit": dataclasses.asdict(cfg), "train_tokens": cfg.train_tokens,
                "nonfinite_steps": result.nonfinite_steps} | dict(meta or {})
        return cls.from_guide_params(result.units, cfg.prior, result.guide_params, cfg.guide, info)

    # --------------------------------------------------------------- file I/O
    def to_json(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "config": self.units.config.to_hf(),
            "group_width": self.units.group_width,
            "size": {"currency": self.units.currency, "context": self.units.context},
            "prior": self.prior,
            "sites": {k: {"loc": _short(s.loc), "scale": _short(s.scale), "positive": s.positive}
                      | ({} if s.factor is None else {"factor": _short(s.factor)}) for k, s in self.sites.items()},
            "gates": self.summary(),
            "meta": self.meta,
        } | ({} if self.rescale is None else {"rescale": {k: _short(v) for k, v in self.rescale.items()}})

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the plan as JSON, atomically."""
        return atomic_write(path, json.dumps(self.to_json(), separators=(",", ":"), default=_json_default))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Reads a plan file. A relative `meta["checkpoint"]` found beside the plan (the
        main job writes "model") becomes absolute: found from any working directory.

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
            if doc.get("format") in OLD_FORMATS:
                raise ValueError(f"format {doc['format']!r} comes from an older ppn whose priors had a global "
                                 "intercept the data cannot identify; refit to get a plan of this version")
            if doc.get("format") != PLAN_FORMAT:
                raise ValueError(f"format is {doc.get('format')!r}, expected {PLAN_FORMAT!r}")
            size = doc.get("size", {"currency": "params", "context": 2048})  # plans before fits in FLOPs
            _expect_dicts(size, "size")
            units = Units(LlamaConfig.from_hf(doc["config"]), int(doc["group_width"]), str(size["currency"]),
                          int(size["context"]))
            sites = {k: Site(np.asarray(v["loc"], np.float32), np.asarray(v["scale"], np.float32),
                             bool(v["positive"]), None if "factor" not in v else np.asarray(v["factor"], np.float32))
                     for k, v in doc["sites"].items()}
            rescale = doc.get("rescale")
            rescale = None if rescale is None else {k: np.asarray(v, np.float32) for k, v in rescale.items()}
            plan = cls(units, doc["prior"], sites, rescale=rescale, meta=_resolve_checkpoint(doc.get("meta", {}), path))
            plan.check()
        # A hand-edited config can fail deep in LlamaConfig (an attribute of a wrong
        # type, a zero head count); all of it is the file's fault, named as such.
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as e:
            raise ValueError(f"{path} is not a valid ppn plan: {e}") from e
        return plan

    # ------------------------------------------------------------- resizing
    def keep(self, size: float | int, uniform: bool = False, cost: str | Costs | None = None) -> KeepSet:
        """The units to keep at `size`. Deterministic; reads no weights.

        By default (`fill_budget`) each block keeps what the ranking gives it, and
        the kept size is at most the budget and within one unit's cost (a head
        with its KV head and norm, or an MLP group with its norm) of it.

        With `uniform=True` (`fill_uniform`) every block is kept, with the same
        number of whole KV groups and of MLP groups: the pruned model is a
        standard dense one that a Hugging Face config describes.

        Args:
            size: with `cost="params"`, a fraction of prunable parameters in (0, 1]
                or an absolute count of them; in another currency, a fraction of the
                blocks' cost in it, or an amount for the whole model (`Costs.budget`;
                milliseconds are always an amount).
            cost: what the size measures: "params", "flops" (per token at 2048 keys),
                "bytes" (bfloat16), a latency table's path ("costs.json" from `ppn profile`:
                decode milliseconds per token), or a `Costs` (`Units.costs`,
                `ppn.speed.load_costs` for prefill) with other settings. None: the
                currency the fit's sizes measured (`Units.currency`; parameters
                unless the fit set `cost="flops"`). In another currency than the
                fit's, the ranking is the posterior's at the fit's fraction the fill
                reaches (one refinement from the requested currency's fraction).
        """
        costs, budget, rho = self._target(size, cost)
        if rho >= 1:
            return self.units.full()
        fill = fill_uniform if uniform else fill_budget
        keep = fill(self.units, self.median_logits(rho), budget, costs)
        if (costs.currency if costs is not None else "params") != self.units.currency:
            # the ranking at the fraction of the fit's currency that the budget buys
            rho = float(np.clip(self.units.size_costs.of(keep) / self.units.size_total, 1e-6, 1 - 1e-6))
            keep = fill(self.units, self.median_logits(rho), budget, costs)
        return keep if self.rescale is None else dataclasses.replace(keep, scales=self._scales_at(rho))

    def _target(self, size, cost=None) -> tuple[Costs | None, float, float]:
        """(costs, or None for parameters; the blocks' budget in them; the size's fraction in them, capped
        below 1: where the posterior is read when `cost` is the fit's currency). `cost` None: the fit's."""
        cost = self.units.currency if cost is None else cost
        if isinstance(cost, str) and cost == "params":
            budget = self.units.budget(size)
            return None, budget, 1.0 if budget >= self.units.total else float(np.clip(budget / self.units.total,
                                                                                      1e-6, 1 - 1e-6))
        if isinstance(cost, (str, os.PathLike)) and str(cost).endswith(".json"):
            cost = speed.load_costs(cost, self.units)  # a latency table's decode milliseconds
        costs = (self.units.size_costs if cost == self.units.currency else self.units.costs(cost)) \
            if isinstance(cost, str) else cost
        budget, total = costs.budget(self.units, size), costs.of(self.units.full())
        return costs, budget, 1.0 if budget >= total else float(np.clip(budget / total, 1e-6, 1 - 1e-6))

    def sample_keep(self, size: float | int, num_samples: int = 8, seed: int = 0,
                    gate_noise: bool = True) -> list[KeepSet]:
        """Keep-sets drawn from the posterior at `size`, each at the exact size of `keep(size)`.

        Each draw takes the gate parameters from the guide (`logit_draws`) and a
        hard-concrete noise per gate, logit(u) with u ~ U(0, 1): the noise the fit
        trains under (`ppn.gates.sample_hard_concrete`), whose ordering of the
        gates is that of a gate sample at any temperature. The noisy logits then
        fill the budget like `keep` (`fill_budget`). `ppn.prune` and
        `ppn.load_pruned` accept each keep-set; `ppn.gates.hard_gates` runs one
        in the dense model without cutting it.

        gate_noise: False fills at the drawn parameters alone: the spread of the
            decision from the posterior's uncertainty about the parameters, without
            the gates' own randomness (`keep_frequency`).
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        costs, budget, rho = self._target(size)
        if rho >= 1:
            return [self.units.full()] * num_samples
        logits = self.logit_draws(rho, num_samples, seed)
        noise = np.random.default_rng(seed)
        scales = self._scales_at(rho)
        draws = []
        for s in range(num_samples):
            noisy = {k: v[s] + (noise.logistic(size=v[s].shape) if gate_noise else 0) for k, v in logits.items()}
            keep = fill_budget(self.units, noisy, budget, costs)
            draws.append(keep if scales is None else dataclasses.replace(keep, scales=scales))
        return draws

    def quality_band(self, model, tokens, sizes=(0.9, 0.7, 0.5, 0.4, 0.3), num_samples: int = 8, **kwargs):
        """Perplexity quantiles per size over posterior keep-sets and bootstrapped
        evaluation windows: `ppn.decisions.quality_band(self, model, tokens, ...)`."""
        return decisions.quality_band(self, model, tokens, sizes, num_samples, **kwargs)

    def smallest_size(self, max_perplexity: float, prob: float = 0.95, *, model, tokens, **kwargs):
        """The smallest size whose perplexity is at most `max_perplexity` with
        probability `prob`: `ppn.decisions.smallest_size(self, ...)`."""
        return decisions.smallest_size(self, max_perplexity, prob, model=model, tokens=tokens, **kwargs)

    def scales(self, size: float | int) -> dict[str, np.ndarray] | None:
        """The rescaling factors at `size` (in the fit's currency; `ppn.bayes.rescale_factors`),
        or None when the plan has no rescaling."""
        return self._scales_at(self.fraction(size))

    def fraction(self, size: float | int) -> float:
        """`size` (in the fit's currency: a fraction or an amount) as the fraction rho
        in (0, 1] of the dense blocks' cost at which the posterior is read."""
        return self._target(size)[2]

    def _scales_at(self, rho: float) -> dict[str, np.ndarray] | None:
        """The rescaling factors at the fit's size fraction `rho`, or None."""
        if self.rescale is None:
            return None
        return {k: np.asarray(v) for k, v in bayes.rescale_factors(self.rescale, rho).items()}

    def soft_gates(self, size: float | int, temperature: float = 0.2, estimator: str = "louizos"):
        """Deterministic gates of the gated network at `size` (`ppn.gates.soft_gates`), at
        the posterior-median logits eta with the push offset c solved so that the
        expected size at `temperature` is the target, times the rescaling factors
        at `size` if the plan has them. Returns per-block `BlockGates`.

        estimator: "louizos" (the hard-concrete test-time value, which ignores the
            temperature) or "median" (the gate's median at `temperature`: at the
            fit's final temperature, the gate the network last trained around).
        """
        units = self.units
        rho = min(self.fraction(size), 1 - 1e-6)
        logits = {k: jnp.asarray(v) for k, v in self.median_logits(rho).items()}
        c = bayes.push_offset(units, logits, jnp.float32(rho), temperature)
        scales = self.scales(size)
        return gates.soft_gates(units, {k: v - c for k, v in logits.items()}, temperature, estimator,
                                None if scales is None else {k: jnp.asarray(v) for k, v in scales.items()})

    def keep_frequency(self, size: float | int, num_samples: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
        """The share of posterior draws whose fill (`fill_budget` at `size`) keeps each unit: how
        stable the keep decision is given the fitted weights (a refit moves it more, METHOD.md).
        Not P(z > 0), the open probability of the unit's gate (`open_probability`).

        Returns:
            {"attn_layer": (L,), "mlp_layer": (L,), "head": (L, N), "mlp_group": (L, M)}.
        """
        draws = [k.effective() for k in self.sample_keep(size, num_samples, seed, gate_noise=False)]
        return {k: np.mean([getattr(d, f) for d in draws], axis=0, dtype=np.float64)
                for k, f in zip(KINDS, ("attn", "mlp", "heads", "groups"))}

    def check_model(self, config: LlamaConfig) -> None:
        """Raises ValueError unless `config` is the dense architecture this plan was fitted on."""
        if config.replace(layers=None) != self.units.config or config.layers is not None:
            raise ValueError("the plan was fitted on another architecture than this model's "
                             f"(plan: {self.units.config}; model: {config})")


def _resolve_checkpoint(meta: dict, plan_path: Path) -> dict:
    """`meta` with a checkpoint relative to the plan's folder made absolute (see `Plan.load`)."""
    checkpoint = meta.get("checkpoint")
    if not isinstance(checkpoint, str) or os.path.isabs(checkpoint) or not (plan_path.parent / checkpoint).exists():
        return meta
    return meta | {"checkpoint": str((plan_path.parent / checkpoint).resolve())}


def _expect_dicts(value, what: str, nested: bool = False) -> None:
    """Raises ValueError unless `value` is a JSON object (and, with `nested`, so is each of its values)."""
    if not isinstance(value, dict) or (nested and not all(isinstance(v, dict) for v in value.values())):
        raise ValueError(f"{what} must be a JSON object{' of objects' if nested else ''}")


def fill_budget(units: Units, logits: dict[str, np.ndarray], budget: float, costs: Costs | None = None) -> KeepSet:
    """Keeps units in decreasing order of score until the next one would exceed `budget`.

    A unit's score is its logit capped by its layer's logit (a unit can only be
    as important as the layer that carries it). Each unit's marginal cost adds
    its KV head when it is the first query head of that KV head, and the layer's
    fixed cost (norm) when it is the layer's first unit. Costs are `costs`
    (`Units.costs`; default: parameters).
    """
    costs = costs or units.costs()
    L, N, M = units.num_layers, units.num_heads, units.num_groups
    scores = unit_scores(logits)
    score = np.concatenate([scores["head"].reshape(-1), scores["mlp_group"].reshape(-1)])
    is_head = np.arange(score.size) < L * N
    layer = np.concatenate([np.repeat(np.arange(L), N), np.repeat(np.arange(L), M)])
    cost = np.concatenate([np.full(L * N, costs.head), np.tile(costs.groups, L)]).astype(np.float64)
    kv_key = np.concatenate([np.repeat(np.arange(L), N) * units.config.num_kv_heads + np.tile(units.head_kv, L),
                             np.full(L * M, -1)])

    order = np.lexsort((np.arange(score.size), -score))  # stable: ties keep registry order
    first_layer = _first_occurrence(np.where(is_head, layer, L + layer)[order])
    first_kv = _first_occurrence(kv_key[order]) & is_head[order]
    fixed = np.where(is_head[order], costs.attn_fixed, costs.mlp_fixed)
    marginal = cost[order] + first_kv * costs.kv + first_layer * fixed
    fits = np.cumsum(marginal) <= budget
    n_kept = int(np.argmin(fits)) if not fits.all() else fits.size
    kept = np.zeros(score.size, bool)
    kept[order[:n_kept]] = True
    heads, groups = kept[: L * N].reshape(L, N), kept[L * N:].reshape(L, M)
    return KeepSet(units, heads.any(1), groups.any(1), heads, groups)


def unit_scores(logits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each head's and MLP group's score: its logit capped by its layer's (a unit can only
    be as important as the layer that carries it). {"head": (L, N), "mlp_group": (L, M)}."""
    return {"head": np.minimum(logits["head"], logits["attn_layer"][:, None]),
            "mlp_group": np.minimum(logits["mlp_group"], logits["mlp_layer"][:, None])}


def fill_uniform(units: Units, logits: dict[str, np.ndarray], budget: float, costs: Costs | None = None) -> KeepSet:
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

    Costs are `costs` (`Units.costs`; default: parameters).

    Raises:
        ValueError: the budget is below the smallest uniform model (the fewest KV
            groups and one MLP group in every block).
    """
    costs = costs or units.costs()
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
    kv_cost = L * (G * costs.head + costs.kv)
    group_cost = L * np.sort(costs.groups)[::-1]  # a narrow last group is the last slice
    k, m = kv_steps[0], 1
    size = L * (costs.attn_fixed + costs.mlp_fixed) + k * kv_cost + group_cost[0]
    if size > budget:
        raise ValueError(f"a size of {budget:,.0f} {costs.currency} is below the smallest uniform model ({size:,.0f}: "
                         f"{k} KV group(s) and one MLP group in every block); use a larger size or uniform=False")
    open_kinds = {"attn", "mlp"}
    while True:
        k_next = next((s for s in kv_steps if s > k), None)
        options = [(kv_score[k:k_next].mean(), "attn")] if k_next and "attn" in open_kinds else []
        options += [(group_score[m], "mlp")] if m < M and "mlp" in open_kinds else []
        if not options:
            break
        kind = max(options, key=lambda o: o[0])[1]  # ties: attention (listed first)
        cost = (k_next - k) * kv_cost if kind == "attn" else group_cost[m]
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
