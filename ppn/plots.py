"""Plots of a plan and a fit, for people who would rather look than read.

Each function returns a matplotlib Figure (and saves it when given a path), so
notebooks display it and scripts write PNGs. The backend is left to matplotlib
(a notebook's inline one, Agg without a display): choosing one here would break
the notebooks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from ppn.plan import Plan

DEFAULT_SIZES = tuple(np.round(np.linspace(0.1, 1.0, 19), 3))


def save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """Saves `fig` as a PNG at `path` atomically (a temporary file beside it, then a
    rename), so a killed run never leaves half an image."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix or '.png'}")
    try:
        fig.savefig(tmp, dpi=120, format=(path.suffix[1:] or "png"), **savefig_kwargs)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _finish(fig, path):
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def keep_frequency_heatmap(plan: Plan, sizes: Sequence[float] = DEFAULT_SIZES, num_samples: int = 100,
                             path=None):
    """Layers x size: the expected fraction of each block's heads and MLP groups kept,
    averaged over posterior draws (two panels: attention, MLP)."""
    attn, mlp = [], []
    for s in sizes:
        p = plan.keep_frequency(float(s), num_samples)
        attn.append(p["head"].mean(1))
        mlp.append(p["mlp_group"].mean(1))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharey=True)
    for ax, values, title in zip(axes, (attn, mlp), ("attention heads kept", "MLP groups kept")):
        im = ax.imshow(np.asarray(values).T, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis",
                       extent=(sizes[0], sizes[-1], -0.5, plan.units.num_layers - 0.5))
        ax.set_xlabel("target size (fraction of prunable parameters)")
        ax.set_title(title)
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=axes, label="posterior expected fraction kept")
    fig.suptitle("Push puppet: which layers survive as the size is pushed down")
    if path is not None:
        save_figure(fig, path)
    return fig


def structure_curves(plan: Plan, sizes: Sequence[float] = DEFAULT_SIZES, path=None):
    """Kept query heads, KV heads, MLP groups and sub-layers against the target size."""
    rows = []
    for s in sizes:
        k = plan.keep(float(s)).effective()
        rows.append((k.heads.sum() / k.heads.size, k.kv_kept().mean(), k.groups.sum() / k.groups.size,
                     k.attn.mean(), k.mlp.mean()))
    rows = np.asarray(rows)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, label in enumerate(["query heads", "KV heads", "MLP groups", "attention layers", "MLP layers"]):
        ax.plot(sizes, rows[:, i], marker="o", ms=3, label=label)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="proportional")
    ax.set_xlabel("target size (fraction of prunable parameters)")
    ax.set_ylabel("fraction kept")
    ax.set_title("Size-to-structure map (posterior median ranking)")
    ax.legend(fontsize=8)
    return _finish(fig, path)


def forest(plan: Plan, num_samples: int = 1000, path=None):
    """Posterior medians and 90% intervals of the layer gates' intercepts and slopes."""
    alpha, beta = plan.draws(num_samples, seed=2)
    layers = np.arange(plan.units.num_layers)
    fig, axes = plt.subplots(1, 2, figsize=(9, 0.25 * len(layers) + 2), sharey=True)
    for ax, values, name in zip(axes, (alpha, beta), ("intercept alpha", "slope beta")):
        for kind, offset, color in (("attn_layer", -0.15, "C0"), ("mlp_layer", 0.15, "C1")):
            q = np.quantile(values[kind], [0.05, 0.5, 0.95], axis=0)
            ax.errorbar(q[1], layers + offset, xerr=[q[1] - q[0], q[2] - q[1]], fmt="o", ms=3, color=color,
                        label=kind.replace("_", " "))
        ax.set_xlabel(name)
    axes[0].set_ylabel("layer")
    axes[0].legend(fontsize=8)
    fig.suptitle("Layer gates: posterior median and 90% interval")
    return _finish(fig, path)


def training_curves(metrics: Sequence[dict], path=None):
    """NLL per token and achieved-minus-target expected size over the fit; with
    diagnostics (`FitConfig.diagnostics_every`), also the held-out ELBO per token at
    each diagnostic size and the quantiles of the guide's scales."""
    from ppn.diagnostics import DIAGNOSTIC_SIZES

    steps = [m["step"] for m in metrics]
    diag = [m for m in metrics if "heldout_elbo" in m]
    fig, axes = plt.subplots(1, 4 if diag else 2, figsize=(20 if diag else 10, 3.5))
    axes[0].plot(steps, [m["nll_per_token"] for m in metrics], lw=0.8)
    axes[0].set(xlabel="step", ylabel="NLL per token (gated, at the step's sizes)", title="likelihood")
    axes[1].scatter([m["rho"] for m in metrics], [m["expected_size"] for m in metrics], s=6)
    axes[1].plot([0, 1], [0, 1], color="grey", lw=0.8)
    axes[1].set(xlabel="target size rho (batch mean)", ylabel="expected kept size E[S]/S_total (mean)", title="size constraint")
    if diag:
        at = [m["step"] for m in diag]
        by_size = np.asarray([m["heldout_elbo_by_size"] for m in diag])
        for i, size in enumerate(DIAGNOSTIC_SIZES):
            axes[2].plot(at, by_size[:, i], "o-", ms=3, label=f"size {size}")
        axes[2].legend(fontsize=8)
        axes[2].set(xlabel="step", ylabel="held-out ELBO per token", title="convergence (final temperature)")
        for q, style in (("q05", ":"), ("q50", "-"), ("q95", ":")):
            axes[3].plot(at, [m[f"guide_scale_{q}"] for m in diag], style, color="C0", label=q)
        spread = any(m["guide_scale_q95"] > 0 for m in diag)  # a point guide (MAP) has none
        axes[3].set(xlabel="step", ylabel="guide scale (unconstrained)", yscale="log" if spread else "linear",
                    title="guide scales" if spread else "guide scales (a point guide: none)")
        axes[3].legend(fontsize=8)
    return _finish(fig, path)


def quality_band(band, path=None):
    """Perplexity against size: the 5-95% band over posterior keep-sets and
    bootstrapped windows (`ppn.decisions.QualityBand`), its median, and the median
    network (the one `ppn resize` cuts)."""
    q = band.quantiles()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.fill_between(band.sizes, q[:, 0], q[:, 2], color="C0", alpha=0.25, label="90% band")
    ax.plot(band.sizes, q[:, 1], color="C0", label="band median")
    ax.plot(band.sizes, band.median_network, "o", color="C3", ms=5, label="median network")
    ax.set(xlabel="size (fraction of prunable parameters)", ylabel="perplexity", yscale="log",
           title=f"Quality band: {band.num_samples} keep-sets x {band.num_bootstrap} window resamples per size")
    ax.legend(fontsize=8, loc="upper right")
    return _finish(fig, path)
