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
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ppn.console import progress_bar
from ppn.evaluate import perplexity
from ppn.gates import hard_gates

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
