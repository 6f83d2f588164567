"""Cutting a model down to a keep-set: a physically smaller dense model.

The cut is described once, in the Hugging Face tensor layout, as "take these
indices along this axis of this tensor" (`gather_spec`). `prune` applies it to
weights in memory with a jitted `jnp.take`; loading straight from a checkpoint
can apply the same description to memory-mapped slices.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ppn.checkpoint import build_model, hf_layout, hf_tensors
from ppn.gates import KeepSet
from ppn.models.llama import BlockGates, Llama


@dataclasses.dataclass(frozen=True)
class Take:
    """Rows or columns to keep of one tensor: `indices` along `axis`, or all of it when None."""

    axis: int = 0
    indices: np.ndarray | None = None


def gather_spec(keep: KeepSet) -> dict[str, Take]:
    """For every tensor of the pruned checkpoint, what to take from the dense one.

    Names are shared by both checkpoints (pruned blocks keep their index l);
    removed sub-layers simply have no entry.
    """
    units, eff, kv = keep.units, keep.effective(), keep.kv_kept()
    h = units.config.head_dim
    channels = keep.channels()

    def rows(kept: np.ndarray) -> np.ndarray:  # head ids -> their H rows each
        return (np.flatnonzero(kept)[:, None] * h + np.arange(h)).reshape(-1)

    spec: dict[str, Take] = {}
    for name in hf_layout(keep.config()):
        parts = name.split(".")
        if not name.startswith("model.layers."):
            spec[name] = Take()
            continue
        l, leaf = int(parts[2]), ".".join(parts[3:])
        if leaf in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
            spec[name] = Take(0, rows(eff.heads[l]))
        elif leaf.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            spec[name] = Take(0, rows(kv[l]))
        elif leaf == "self_attn.o_proj.weight":
            spec[name] = Take(1, rows(eff.heads[l]))
        elif leaf in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            spec[name] = Take(0, np.flatnonzero(channels[l]))
        elif leaf == "mlp.down_proj.weight":
            spec[name] = Take(1, np.flatnonzero(channels[l]))
        else:  # norms, o bias: whole
            spec[name] = Take()
    return spec


@functools.partial(jax.jit, static_argnums=2)
def _take(x: jax.Array, indices: jax.Array, axis: int) -> jax.Array:
    return jnp.take(x, indices, axis=axis)


def prune(model: Llama, keep, size: float | int | None = None) -> Llama:
    """The smaller dense model that keeps exactly the chosen units.

    Its logits equal those of `model` run with `hard_gates(keep)`, and its
    prunable parameter count is `keep.num_params()`. The gathers are jitted,
    compiled once per (tensor shape, kept count).

    Args:
        model: the dense model.
        keep: a `KeepSet`, or a `ppn.Plan` together with `size`.
        size: with a plan: a fraction of prunable parameters in (0, 1] or a count.

    Raises:
        ValueError: the keep-set or plan belongs to another architecture, or the size is invalid.
    """
    if size is not None:
        keep.check_model(model.config)
        keep = keep.keep(size)
    elif not isinstance(keep, KeepSet):
        raise TypeError("prune(model, plan, size) needs a size when given a plan")
    if keep.units.config != model.config.replace(layers=None) or model.config.layers is not None:
        raise ValueError(
            "this keep-set was computed for another architecture than the model's: "
            f"plan {keep.units.config} vs model {model.config}")
    dense = dict(hf_tensors(model))
    spec = gather_spec(keep)

    def take(name, _):
        t = spec[name]
        return dense[name] if t.indices is None else _take(dense[name], jnp.asarray(t.indices), t.axis)

    return build_model(keep.config(), take, dtype=model.dtype)


def hard_gates(keep: KeepSet, dtype=jnp.float32) -> list[BlockGates]:
    """0/1 gates for the dense model's gated forward pass that reproduce `keep`."""
    eff = keep.effective()
    channels = keep.channels()
    return [BlockGates(attn=jnp.asarray(eff.attn[l], dtype), heads=jnp.asarray(eff.heads[l], dtype),
                       mlp=jnp.asarray(eff.mlp[l], dtype), channels=jnp.asarray(channels[l], dtype))
            for l in range(keep.units.num_layers)]
