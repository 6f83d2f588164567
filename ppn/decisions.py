"""Decisions under uncertainty: how good a size will be, and how sure we are, before cutting.

A plan's posterior is over structures. At a size, `Plan.sample_keep` draws
keep-sets from it; `quality_band` runs each in the dense model with its 0/1 gates
(`ppn.gates.hard_gates`: the same logits as the pruned model, and one compiled
forward pass for every keep-set of every size) on the first `max_windows`
evaluation windows, and bootstraps those windows. Each (keep-set, bootstrap
resample) pair gives one perplexity draw, so the band's quantiles carry both
uncertainties: which structure the posterior would cut, and which text it is
measured on. The median network (`Plan.keep`, the one `ppn resize` cuts) is
measured beside it on the same windows.

`smallest_size` searches sizes for the smallest one whose perplexity is at most
a bar with a stated probability (the share of the band's draws within it).

`ensemble_metrics` averages the next-token distributions of sampled sub-networks
and measures their accuracy and calibration (ECE, Brier) against the median
network and the dense model, and the members' disagreement as a signal for
setting aside the least certain predictions.

`keep_disagreement` compares a refit's keep-sets (another seed) with what the
first posterior predicted about them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppn.console import progress_bar
from ppn.data import eval_windows
from ppn.evaluate import perplexity
from ppn.gates import hard_gates
from ppn.units import KeepSet

if TYPE_CHECKING:
    from ppn.models.llama import Llama
    from ppn.plan import Plan

QUANTILES = (0.05, 0.5, 0.95)


@dataclasses.dataclass(frozen=True)
class QualityBand:
    """Perplexity draws per size.

    Attributes:
        sizes: (S,) target sizes, fractions of prunable parameters, ascending.
        draws: (S, K * B) perplexity of each of K posterior keep-sets on each of B
            bootstrap resamples of the evaluation windows (the same resamples at every size).
        median_network: (S,) perplexity of the median network (`Plan.keep`) on all the windows.
        num_samples, num_windows, num_bootstrap, seqlen: K, the windows, B and their length.
    """

    sizes: np.ndarray
    draws: np.ndarray
    median_network: np.ndarray
    num_samples: int
    num_windows: int
    num_bootstrap: int
    seqlen: int

    def quantiles(self, q: Sequence[float] = QUANTILES) -> np.ndarray:
        """(S, len(q)) perplexity quantiles per size."""
        return np.quantile(self.draws, q, axis=1).T

    def probability_within(self, max_perplexity: float) -> np.ndarray:
        """(S,) the share of draws at each size with perplexity at most `max_perplexity`."""
        return (self.draws <= max_perplexity).mean(axis=1)

    def merged(self, other: QualityBand) -> QualityBand:
        """This band and `other` (same K, windows, B) as one, sorted by size; `other` wins a shared size."""
        mine = ~np.isin(self.sizes, other.sizes)
        sizes = np.concatenate([self.sizes[mine], other.sizes])
        order = np.argsort(sizes)
        return dataclasses.replace(
            self, sizes=sizes[order], draws=np.concatenate([self.draws[mine], other.draws])[order],
            median_network=np.concatenate([self.median_network[mine], other.median_network])[order])

    def to_json(self) -> dict:
        """Sizes, the 5/50/95% quantiles, the median network and the counts (not the draws)."""
        q = self.quantiles()
        return {"sizes": self.sizes.tolist(), "q05": q[:, 0].tolist(), "q50": q[:, 1].tolist(),
                "q95": q[:, 2].tolist(), "median_network": self.median_network.tolist(),
                "num_samples": self.num_samples, "num_windows": self.num_windows,
                "num_bootstrap": self.num_bootstrap, "seqlen": self.seqlen}


def quality_band(plan: Plan, model: Llama, tokens, sizes: Sequence[float] = (0.9, 0.7, 0.5, 0.4, 0.3),
                 num_samples: int = 8, *, seqlen: int = 512, max_windows: int | None = 16,
                 num_bootstrap: int = 200, seed: int = 0, batch_size: int = 4, progress: bool = True,
                 mesh=None) -> QualityBand:
    """Perplexity draws at each size over posterior keep-sets and bootstrapped windows.

    Costs (num_samples + 1) forward passes over `max_windows` windows per size.

    Args:
        plan: the fitted plan (`ppn.Plan`).
        model: the dense model the plan was fitted on (the fit's weights).
        tokens: token ids (N,), cut into windows of `seqlen` as `ppn.evaluate.perplexity` does.
        sizes: fractions of prunable parameters in (0, 1].
        num_samples: keep-sets drawn per size (`Plan.sample_keep`).
        max_windows: evaluation windows (the first ones); None: all.
        num_bootstrap: resamples of the windows.
        seed: seeds the keep-set draws (the same at every size) and the resamples.
        mesh: a ("data", "fsdp") mesh to evaluate on (`ppn.evaluate.perplexity`).

    Raises:
        ValueError: the plan belongs to another architecture, a size outside (0, 1],
            or fewer than one sample or resample.
    """
    plan.check_model(model.config)
    sizes = np.asarray(sorted(float(s) for s in sizes))
    if sizes.size == 0 or not all(0 < s <= 1 for s in sizes):
        raise ValueError(f"sizes must be fractions in (0, 1], got {sizes.tolist()}")
    if num_bootstrap < 1:
        raise ValueError(f"num_bootstrap must be at least 1, got {num_bootstrap}")
    draws, median = [], []
    resamples = None
    with progress_bar(total=sizes.size * (num_samples + 1), desc="quality band", unit="network",
                      enabled=progress) as bar:

        def window_nll(keep) -> np.ndarray:
            out = perplexity(model, tokens, seqlen=seqlen, max_windows=max_windows, batch_size=batch_size,
                             progress=False, gates=hard_gates(keep), mesh=mesh).window_nll
            bar.update(1)
            return out

        for size in sizes:
            keeps = plan.sample_keep(size, num_samples, seed)
            nll = np.stack([window_nll(k) for k in keeps])  # (K, W)
            if resamples is None:
                resamples = np.random.default_rng(seed).integers(0, nll.shape[1], (num_bootstrap, nll.shape[1]))
            draws.append(np.exp(nll[:, resamples].mean(-1)).reshape(-1))  # (K, B) -> (K * B,)
            median.append(math.exp(window_nll(plan.keep(size)).mean()))
    return QualityBand(sizes, np.stack(draws), np.asarray(median), num_samples, int(resamples.shape[1]),
                       num_bootstrap, seqlen)


@dataclasses.dataclass(frozen=True)
class SizeChoice:
    """The answer of `smallest_size`.

    Attributes:
        size: the smallest size found that meets the bar (to within the search's tolerance).
        probability: the share of its band's draws within the bar.
        band: the band at every size the search evaluated.
    """

    size: float
    probability: float
    band: QualityBand


def smallest_size(plan: Plan, max_perplexity: float, prob: float = 0.95, *, model: Llama, tokens,
                  low: float = 0.1, tol: float = 0.02, progress: bool = True, **band_kwargs) -> SizeChoice:
    """The smallest size whose perplexity is at most `max_perplexity` with probability
    at least `prob`, by bisection on the band (`quality_band`) between `low` and 1.

    Assumes quality falls with size (the band's draws share their keep-set seeds
    and window resamples across sizes, which keeps the comparison between sizes
    smooth). Stops when the bracket is narrower than `tol`; about
    log2((1 - low) / tol) + 2 bands.

    Raises:
        ValueError: `prob` outside (0, 1), a non-positive bar, `low` outside (0, 1),
            or a bar that even the dense network does not meet with probability
            `prob` (the message gives what it reaches).
    """
    if not 0 < prob < 1:
        raise ValueError(f"prob must be a probability in (0, 1), got {prob}")
    if not (math.isfinite(max_perplexity) and max_perplexity > 0):
        raise ValueError(f"max_perplexity must be a positive number, got {max_perplexity}")
    if not 0 < low < 1:
        raise ValueError(f"low must be a size in (0, 1), got {low}")

    band = None

    def meets(size: float) -> bool:
        nonlocal band
        one = quality_band(plan, model, tokens, [size], progress=progress, **band_kwargs)
        band = one if band is None else band.merged(one)
        return bool(one.probability_within(max_perplexity)[0] >= prob)

    if not meets(1.0):
        best = band.quantiles((0.5,))[0, 0]
        raise ValueError(
            f"no size meets perplexity <= {max_perplexity} with probability {prob}: the dense network reaches it "
            f"with probability {band.probability_within(max_perplexity)[0]:.3f} (median perplexity {best:.4g}); "
            "raise the bar or lower the probability")
    lo, hi = low, 1.0
    if meets(low):
        hi = low
    while hi - lo > tol:
        mid = round((lo + hi) / 2, 6)
        lo, hi = (lo, mid) if meets(mid) else (mid, hi)
    return SizeChoice(hi, float(band.probability_within(max_perplexity)[band.sizes == hi][0]), band)


# ------------------------------------------------------------ sub-network ensembles
ENSEMBLE_SIZES = (1, 4, 8)


@functools.partial(jax.jit, static_argnums=0)
def _log_probs(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, gates) -> jax.Array:
    """(B, T-1, V) float32 next-token log-probabilities of windows ids (B, T), gated by `gates`."""
    return jax.nn.log_softmax(nnx.merge(graphdef, state)(ids, gates=gates)[:, :-1].astype(jnp.float32), axis=-1)


def _token_stats(probs: jax.Array, mean_entropy: jax.Array, targets: jax.Array) -> dict[str, np.ndarray]:
    """Per token of a predictive distribution `probs` (B, T-1, V): its confidence, whether
    its argmax is right, NLL, Brier score and disagreement (H(mean) - mean H: the
    members' mutual information with the prediction; 0 for a single network)."""
    p_target = jnp.take_along_axis(probs, targets[..., None], -1)[..., 0]
    entropy = -(probs * jnp.log(jnp.clip(probs, 1e-30))).sum(-1)
    out = {"confidence": probs.max(-1), "correct": probs.argmax(-1) == targets,
           "nll": -jnp.log(jnp.clip(p_target, 1e-30)), "brier": (probs ** 2).sum(-1) - 2 * p_target + 1,
           "disagreement": entropy - mean_entropy}
    return {k: np.asarray(v).reshape(-1) for k, v in out.items()}


def calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: the token-weighted mean |accuracy - confidence| over
    `bins` equal-width bins of confidence."""
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total / confidence.size)


def selective_accuracy(certainty: np.ndarray, correct: np.ndarray, coverage: float = 0.9) -> float:
    """Accuracy on the `coverage` share of tokens the predictor is most certain of."""
    keep = np.argsort(-certainty, kind="stable")[: max(int(round(coverage * certainty.size)), 1)]
    return float(correct[keep].mean())


def ensemble_metrics(plan: Plan, model: Llama, tokens, size: float, sizes: Sequence[int] = ENSEMBLE_SIZES, *,
                     seqlen: int = 512, max_windows: int | None = 16, seed: int = 0,
                     progress: bool = True) -> list[dict]:
    """Sub-network ensembles as predictive uncertainty, on the first `max_windows` windows.

    Averages the next-token distributions of the first K of max(sizes) keep-sets
    drawn at `size` (`Plan.sample_keep`), for each K in `sizes`, and measures
    each ensemble, the median network (`Plan.keep`) and the dense model: next-token
    accuracy, NLL, ECE (15 bins), Brier score, and accuracy at 90% coverage
    when the least certain 10% of tokens are set aside, by confidence (max
    probability) and, for ensembles, by the members' disagreement.

    Returns:
        One row per predictor: "predictor", "members", "accuracy", "nll", "ece", "brier",
        "accuracy_at_90_confidence", "accuracy_at_90_disagreement" (None for one network).
    """
    plan.check_model(model.config)
    windows = eval_windows(np.asarray(tokens), seqlen, max_windows)
    keeps = plan.sample_keep(size, max(sizes), seed)
    graphdef, state = nnx.split(model)
    names = ["dense", "median network"] + [f"ensemble of {k}" for k in sizes]
    stats = {n: [] for n in names}
    with progress_bar(total=len(windows), desc="ensembles", unit="window", enabled=progress) as bar:
        for window in windows:
            ids = jnp.asarray(window[None], jnp.int32)
            targets = ids[:, 1:]

            def single(keep):
                logp = _log_probs(graphdef, state, ids, hard_gates(keep))
                probs = jnp.exp(logp)
                return probs, -(probs * logp).sum(-1)

            for name, keep in (("dense", plan.units.full()), ("median network", plan.keep(size))):
                probs, entropy = single(keep)
                stats[name].append(_token_stats(probs, entropy, targets))
            total, entropies = 0.0, 0.0
            for k, keep in enumerate(keeps, start=1):
                probs, entropy = single(keep)
                total, entropies = total + probs, entropies + entropy
                if k in sizes:
                    stats[f"ensemble of {k}"].append(_token_stats(total / k, entropies / k, targets))
            bar.update(1)
    rows = []
    for name in names:
        s = {key: np.concatenate([w[key] for w in stats[name]]) for key in stats[name][0]}
        members = 1 if not name.startswith("ensemble") else int(name.split()[-1])
        rows.append({"predictor": name, "members": members, "size": 1.0 if name == "dense" else size,
                     "accuracy": float(s["correct"].mean()), "nll": float(s["nll"].mean()),
                     "ece": calibration_error(s["confidence"], s["correct"]), "brier": float(s["brier"].mean()),
                     "accuracy_at_90_confidence": selective_accuracy(s["confidence"], s["correct"]),
                     "accuracy_at_90_disagreement": (None if members == 1 else
                                                     selective_accuracy(-s["disagreement"], s["correct"]))})
    return rows


# ------------------------------------------------------ calibration of keep decisions
def keep_margins(plan: Plan, size: float) -> dict[str, np.ndarray]:
    """Each head's and MLP group's margin at `size`: its posterior-median score (its
    logit capped by its layer's, the order `fill_budget` keeps in) minus the lowest
    score the median network keeps. >= 0 for kept units; how far each is from the cut.

    Returns:
        {"head": (L, N), "mlp_group": (L, M)}.
    """
    from ppn.plan import unit_scores  # plan imports this module

    score = unit_scores(plan.median_logits(min(plan.fraction(size), 1 - 1e-6)))
    keep = plan.keep(size).effective()
    threshold = min(score["head"][keep.heads].min(initial=np.inf), score["mlp_group"][keep.groups].min(initial=np.inf))
    return {k: v - threshold for k, v in score.items()}


def ablation_damage(plan: Plan, model: Llama, tokens, size: float, num_units: int = 200, *, seqlen: int = 512,
                    max_windows: int | None = 4, seed: int = 0, progress: bool = True) -> list[dict]:
    """The held-out NLL increase from removing single units of the median network at `size`.

    Draws `num_units` of its kept heads and MLP groups at random (all if fewer), and
    for each measures the NLL per token of the median network without it, minus the
    median network's own (hard gates in the dense model, one compiled pass).

    Returns:
        One row per unit: "kind", "layer", "index", "margin" (`keep_margins`),
        "keep_frequency" (`Plan.keep_frequency`), "damage_nll".
    """
    keep = plan.keep(size).effective()
    margins, frequency = keep_margins(plan, size), plan.keep_frequency(size)
    kept = [("head", l, i) for l, i in zip(*np.nonzero(keep.heads))]
    kept += [("mlp_group", l, i) for l, i in zip(*np.nonzero(keep.groups))]
    chosen = np.random.default_rng(seed).permutation(len(kept))[:num_units]

    def nll(k) -> float:
        return perplexity(model, tokens, seqlen=seqlen, max_windows=max_windows, progress=False,
                          gates=hard_gates(k)).nll

    base = nll(keep)
    rows = []
    for j in progress_bar(chosen, desc="ablations", unit="unit", enabled=progress):
        kind, l, i = kept[j]
        heads, groups = keep.heads.copy(), keep.groups.copy()
        (heads if kind == "head" else groups)[l, i] = False
        ablated = dataclasses.replace(keep, heads=heads, groups=groups, attn=heads.any(1), mlp=groups.any(1))
        rows.append({"kind": kind, "layer": int(l), "index": int(i), "margin": float(margins[kind][l, i]),
                     "keep_frequency": float(frequency[kind][l, i]), "damage_nll": nll(ablated) - base})
    return rows


# ------------------------------------------------------ a refit against the posterior
def mismatch(a, b) -> float:
    """How much two keep-sets disagree: the share of their kept prunable parameters that
    only one of them keeps, (|a| + |b| - 2|a and b|) / (|a| + |b|); 0 for equal sets, 1
    for disjoint ones (hierarchy resolved: a unit of a closed layer counts as dropped)."""
    a, b = a.effective(), b.effective()
    both = KeepSet(a.units, a.attn & b.attn, a.mlp & b.mlp, a.heads & b.heads, a.groups & b.groups).effective()
    na, nb = a.num_params(), b.num_params()
    return (na + nb - 2 * both.num_params()) / (na + nb)


def keep_disagreement(plan: Plan, other: Plan, sizes: Sequence[float] = (0.9, 0.7, 0.5, 0.4, 0.3),
                      num_samples: int = 200, seed: int = 0) -> list[dict]:
    """How far a refit's keep-set (`other`, the same fit with another seed) lies from
    `plan`'s, against how far `plan`'s posterior says a keep-set could lie.

    If the posterior described the uncertainty a refit resolves differently, the
    refit's median network would look like one more posterior draw. Per size (disagreement
    measured by `mismatch`, in kept parameters):
    "observed" is `mismatch(plan.keep(size), other.keep(size))`; "predicted_q05/q50/q95"
    are the quantiles of `mismatch(plan.keep(size), draw)` over `num_samples` draws at the
    guide's parameters (`Plan.sample_keep(..., gate_noise=False)`), and "noisy_q50/q95" the
    same with the gates' hard-concrete noise (the keep-sets of the quality band).
    "brier" scores each unit's keep frequency over the parameter draws as a forecast
    of whether the refit keeps it; "refit_keeps_if_p_below_0.05" / "..._between" /
    "..._above_0.95" are the shares the refit keeps among units the posterior calls
    dropped, undecided and kept ("units_..." count them): a coarse reliability table.

    Raises:
        ValueError: the plans index different units (another model or unit layout).
    """
    if plan.units != other.units:
        raise ValueError("the two plans index different units: a refit must prune the same model the same way")
    rows = []
    for size in sizes:
        median, refit = plan.keep(size), other.keep(size).effective()
        draws = plan.sample_keep(size, num_samples, seed, gate_noise=False)
        noisy = plan.sample_keep(size, num_samples, seed)
        predicted = np.quantile([mismatch(median, d) for d in draws], QUANTILES)
        noisy_q = np.quantile([mismatch(median, d) for d in noisy], QUANTILES)
        frequency = plan.keep_frequency(size, num_samples, seed)  # over the same parameter draws
        p = np.concatenate([frequency["head"].ravel(), frequency["mlp_group"].ravel()])
        kept = np.concatenate([refit.heads.ravel(), refit.groups.ravel()]).astype(float)
        observed = mismatch(median, refit)
        row = {"size": float(size), "observed": observed, "predicted_q05": float(predicted[0]),
               "predicted_q50": float(predicted[1]), "predicted_q95": float(predicted[2]),
               "observed_inside_90": bool(predicted[0] <= observed <= predicted[2]),
               "noisy_q50": float(noisy_q[1]), "noisy_q95": float(noisy_q[2]),
               "brier": float(np.mean((p - kept) ** 2))}
        for name, inside in (("below_0.05", p < 0.05), ("between", (p >= 0.05) & (p <= 0.95)),
                             ("above_0.95", p > 0.95)):
            row[f"units_{name}"] = int(inside.sum())
            row[f"refit_keeps_if_p_{name}"] = float(kept[inside].mean()) if inside.any() else None
        rows.append(row)
    return rows
