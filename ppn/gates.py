"""Hard-concrete gates (Louizos et al., 2018), written once, and the per-block
`BlockGates` through which they drive the gated network.

A gate at location (logit) eta and temperature T is

    s = sigmoid((logit(u) + eta) / T),  u ~ Uniform(0, 1),    z = clip(s (hi - lo) + lo, 0, 1)

with the stretch (lo, hi) = (-0.1, 1.1), so z is exactly 0 or exactly 1 with
positive probability and continuous in between. The fit trains on samples
(`sample_hard_concrete`) and holds the expected size through `open_probability`
(`ppn.bayes`); a plan evaluates deterministic soft gates (`soft_gates`) or the
0/1 gates of a keep-set (`hard_gates`), whose network `ppn.prune` cuts out exactly.

Gate values are dicts keyed by kind (`ppn.units.KINDS`): "attn_layer" (L,),
"mlp_layer" (L,), "head" (L, N), "mlp_group" (L, M), each optionally with a
leading batch axis B (a size per sequence).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ppn.models.llama import BlockGates
from ppn.units import KINDS, KeepSet, Units

# Stretch limits of the hard-concrete distribution.
STRETCH_LO, STRETCH_HI = -0.1, 1.1
# Deterministic estimators of a gate: see `soft_gates`.
ESTIMATORS = ("louizos", "median")


def _stretch(s: jax.Array) -> jax.Array:
    """A concrete value s in (0, 1) stretched to (lo, hi) and clipped to [0, 1]."""
    return jnp.clip(s * (STRETCH_HI - STRETCH_LO) + STRETCH_LO, 0.0, 1.0)


def open_probability(logit: jax.Array, temperature) -> jax.Array:
    """P(z > 0) of a hard-concrete gate with location `logit` (any shape)."""
    return jax.nn.sigmoid(logit - temperature * jnp.log(-STRETCH_LO / STRETCH_HI))


def sample_hard_concrete(key: jax.Array, logit: jax.Array, temperature) -> jax.Array:
    """A gate in [0, 1] with point masses at 0 and 1, reparameterised in `logit` (any shape)."""
    u = jax.random.uniform(key, logit.shape, minval=1e-6, maxval=1 - 1e-6)
    return _stretch(jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + logit) / temperature))


def median_hard_concrete(logit: jax.Array, temperature) -> jax.Array:
    """The median of the hard-concrete gate (its value at noise u = 1/2), any shape."""
    return _stretch(jax.nn.sigmoid(logit / temperature))


def flatten(values: dict) -> jax.Array:
    """Gate values by kind as one array (..., G) in `KINDS` order, G = 2L + L*N + L*M;
    a leading batch axis (a size per sequence) stays in front."""
    lead = values["attn_layer"].ndim - 1
    return jnp.concatenate([values[k].reshape(values[k].shape[:lead] + (-1,)) for k in KINDS], axis=-1)


def unflatten(units: Units, flat: jax.Array) -> dict:
    """The inverse of `flatten`: (..., G) -> gate values by kind, shaped as `Units.gate_shapes`
    behind the leading axes (for instance the draws of `numpyro.infer.Predictive`)."""
    out, start = {}, 0
    for k, shape in units.gate_shapes().items():
        n = int(np.prod(shape))
        out[k] = flat[..., start:start + n].reshape(flat.shape[:-1] + shape)
        start += n
    return out


def block_gates(units: Units, z: dict, scales: dict | None = None) -> list[BlockGates]:
    """Per-block gates of the network from gate values (MLP groups spread over their channels).

    Args:
        z: gate values by kind, shaped as `Units.shapes`, or with a leading batch axis B.
        scales: optional `ppn.bayes.rescale_factors` of the same leading shape, by
            `ppn.units.RESCALE_KINDS` kind, multiplied into the gates; their input
            scales become the blocks' `attn_in` / `mlp_in`.

    Returns:
        L `BlockGates`, block l holding z[kind][..., l] (channels (F,) or (B, F)).
    """
    if scales is not None:
        z = {k: z[k] * scales[k] for k in KINDS}
    widths = units.group_widths
    channels = jnp.repeat(z["mlp_group"], widths, axis=-1, total_repeat_length=int(widths.sum()))
    batched = z["attn_layer"].ndim == 2

    def at(x, l):
        return None if x is None else (x[:, l] if batched else x[l])

    scales = scales or {}
    return [BlockGates(attn=at(z["attn_layer"], l), heads=at(z["head"], l), mlp=at(z["mlp_layer"], l),
                       channels=at(channels, l), attn_in=at(scales.get("attn_in"), l),
                       mlp_in=at(scales.get("mlp_in"), l)) for l in range(units.num_layers)]


def soft_gates(units: Units, logits: dict, temperature: float, estimator: str = "louizos",
               scales: dict | None = None) -> list[BlockGates]:
    """Deterministic gates at locations `logits` (by kind, push offset included).

    estimator: "louizos", the hard-concrete test-time value of Louizos et al.,
        clip(sigmoid(eta)(hi - lo) + lo, 0, 1), which ignores the temperature;
        or "median", the median of the gate's hard-concrete distribution at
        `temperature` (its sample at noise u = 1/2),
        clip(sigmoid(eta / temperature)(hi - lo) + lo, 0, 1).
    scales: optional rescaling factors, as in `block_gates`.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown soft-gate estimator {estimator!r}; choose 'louizos' or 'median'")
    return block_gates(units, {k: median_hard_concrete(v, temperature if estimator == "median" else 1.0)
                               for k, v in logits.items()}, scales)


def hard_gates(keep: KeepSet, dtype=jnp.float32) -> list[BlockGates]:
    """0/1 gates that reproduce `keep` (times its rescaling factors, if it has any)
    in the dense model's gated forward pass: the network `ppn.prune.prune(model, keep)` is."""
    eff = keep.effective()
    z = {"attn_layer": eff.attn, "mlp_layer": eff.mlp, "head": eff.heads, "mlp_group": eff.groups}
    scales = keep.scales
    return block_gates(keep.units, {k: jnp.asarray(v, dtype) for k, v in z.items()},
                       None if scales is None else {k: jnp.asarray(v, dtype) for k, v in scales.items()})
