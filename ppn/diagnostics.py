"""Diagnostics of a fit: a held-out ELBO on a fixed grid of sizes and the guide's scales.

The logged training loss mixes a random size and an annealed temperature, so it
cannot show convergence. Every `FitConfig.diagnostics_every` steps `diagnose`
estimates the ELBO per data token of a fixed held-out batch at each of
`DIAGNOSTIC_SIZES`, at the final temperature, with several particles and fixed
noise (two diagnostics differ by the parameters alone), and the quantiles of the
guide's scales; `ppn.runs.elbo_trend` then tells whether it still moves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from numpyro.infer import SVI

from ppn import data, sharding

if TYPE_CHECKING:
    from ppn.fit import FitConfig
    from ppn.svi import FitSetup, FitState

DIAGNOSTIC_SIZES = (0.3, 0.5, 0.7, 0.9)
"""The fixed sizes at which `diagnose` estimates the held-out ELBO."""


def diagnostic_batch(tokens: np.ndarray, cfg: FitConfig) -> np.ndarray:
    """The diagnostics' fixed batch: the first `batch_size` windows (seed 0) of `tokens`, int (B, T+1)."""
    return next(data.train_batches(tokens, cfg.batch_size, cfg.seqlen + 1, seed=0))


def diagnose(setup: FitSetup, state: FitState, batch: np.ndarray) -> dict:
    """The held-out ELBO per data token on `batch` at each of `DIAGNOSTIC_SIZES`
    (final temperature, `diagnostic_particles` particles; fixed noise, so two
    diagnostics differ by the parameters alone) and the 5/50/95% quantiles of
    the guide's scales: {"heldout_elbo": mean over sizes, "heldout_elbo_by_size":
    [R], "guide_scale_q05": ..., "guide_scale_q50": ..., "guide_scale_q95": ...}."""
    params = setup.svi.get_params(state.svi)
    mesh = setup.mesh
    elbo = np.asarray(setup.heldout_elbo(params, jnp.asarray(batch) if mesh is None else
                                         sharding.global_batch(batch, mesh), setup.weights, setup.teacher,
                                         jax.random.PRNGKey(setup.config.seed + 1)), np.float64)
    # AutoNormal's "<site>_auto_scale"; the low-rank guide's diagonal part "auto_scale"
    scales = [np.ravel(sharding.to_host(v)) for k, v in params.items() if k.endswith("auto_scale")]
    q05, q50, q95 = np.quantile(np.concatenate(scales), (0.05, 0.5, 0.95)) if scales else (0.0, 0.0, 0.0)
    return {"heldout_elbo": float(elbo.mean()), "heldout_elbo_by_size": [round(float(e), 6) for e in elbo],
            "guide_scale_q05": float(q05), "guide_scale_q50": float(q50), "guide_scale_q95": float(q95)}


def heldout_elbo(svi: SVI, teacher_logits, mesh: Mesh | None, temperature: float, particles: int, data_tokens: int,
                 params, batch, weights, teacher, key) -> jax.Array:
    """ELBO / data_tokens at every `DIAGNOSTIC_SIZES` size (R,), averaged over `particles`
    single-particle estimates of the fit's own ELBO (`svi.loss`)."""
    if weights is not None:
        weights = sharding.gather(weights, mesh)
    t_logits = teacher_logits(teacher, batch)
    sizes = jnp.repeat(jnp.asarray(DIAGNOSTIC_SIZES, jnp.float32), particles)

    def one(args):
        rho, k = args
        return -svi.loss.loss(k, params, svi.model, svi.guide, batch, rho, jnp.float32(temperature), t_logits,
                              weights=weights)

    values = jax.lax.map(one, (sizes, jax.random.split(key, sizes.shape[0])))
    return values.reshape(len(DIAGNOSTIC_SIZES), particles).mean(1) / data_tokens
