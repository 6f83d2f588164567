"""Cutting a model down to a keep-set: a physically smaller dense model.

The cut is described once, in the Hugging Face tensor layout, as "take these
indices along this axis of this tensor, then scale it" (`gather_spec`); the
scale folds a keep-set's rescaling factors into the kept weights, so the pruned
model has no extra operations. `prune` applies it to
weights in memory with a jitted `jnp.take`; `load_pruned` applies it to
memory-mapped slices of a checkpoint, so the dense model is never in memory.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from ppn.checkpoint import safetensors_dir
from ppn.hf_format import build_model, check_names, hf_layout, hf_tensors, read_config
from ppn.units import KeepSet
from ppn.models.config import LlamaConfig
from ppn.models.llama import Llama
from ppn.safetensors_io import SafetensorsReader


@dataclasses.dataclass(frozen=True)
class Take:
    """Rows or columns to keep of one tensor: `indices` along `axis`, or all of it
    when None; then multiplied by `scale` (broadcast against the kept tensor) if given."""

    axis: int = 0
    indices: np.ndarray | None = None
    scale: np.ndarray | None = None

    def apply_scale(self, x):
        return x if self.scale is None else x * self.scale.astype(np.float32)


def gather_spec(keep: KeepSet) -> dict[str, Take]:
    """For every tensor of the pruned checkpoint, what to take from the dense one.

    Names are shared by both checkpoints (pruned blocks keep their index l);
    removed sub-layers simply have no entry. With `keep.scales`, a sub-layer's
    output scale and its heads' (or channels') scales go into the columns of o
    (or down) and its output bias, and its input scales into its norm's weight:
    exactly where the gated network multiplies them.
    """
    units, eff, kv = keep.units, keep.effective(), keep.kv_kept()
    h = units.config.head_dim
    channels = keep.channels()
    s = keep.scales

    def rows(kept: np.ndarray) -> np.ndarray:  # head ids -> their H rows each
        return (np.flatnonzero(kept)[:, None] * h + np.arange(h)).reshape(-1)

    def scaled(l: int, leaf: str) -> np.ndarray | None:
        """The factor of block l's tensor `leaf` (None: unscaled)."""
        if s is None:
            return None
        if leaf == "self_attn.o_proj.weight":
            return (np.repeat(s["head"][l][eff.heads[l]], h) * s["attn_layer"][l])[None]
        if leaf == "mlp.down_proj.weight":
            per_channel = np.repeat(s["mlp_group"][l], units.group_widths)
            return (per_channel[channels[l]] * s["mlp_layer"][l])[None]
        return {"self_attn.o_proj.bias": s["attn_layer"][l], "mlp.down_proj.bias": s["mlp_layer"][l],
                "input_layernorm.weight": s["attn_in"][l],
                "post_attention_layernorm.weight": s["mlp_in"][l]}.get(leaf)

    spec: dict[str, Take] = {}
    for name in hf_layout(keep.config()):
        parts = name.split(".")
        if not name.startswith("model.layers."):
            spec[name] = Take()
            continue
        l, leaf = int(parts[2]), ".".join(parts[3:])
        scale = scaled(l, leaf)
        if leaf in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
            spec[name] = Take(0, rows(eff.heads[l]))
        elif leaf.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            spec[name] = Take(0, rows(kv[l]))
        elif leaf == "self_attn.o_proj.weight":
            spec[name] = Take(1, rows(eff.heads[l]), scale)
        elif leaf.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
            spec[name] = Take(0, np.flatnonzero(channels[l]))
        elif leaf == "mlp.down_proj.weight":
            spec[name] = Take(1, np.flatnonzero(channels[l]), scale)
        else:  # norms, o and down biases: whole
            spec[name] = Take(scale=None if scale is None else np.asarray(scale))
    return spec


@functools.partial(jax.jit, static_argnums=2)
def _take(x: jax.Array, indices: jax.Array, axis: int) -> jax.Array:
    return jnp.take(x, indices, axis=axis)


def keep_set(keep, size: float | int | None, config: LlamaConfig, uniform: bool = False) -> KeepSet:
    """The keep-set of `keep` (a `KeepSet`, or a `ppn.Plan` with a `size`) for the dense `config`.

    Raises:
        ValueError: it belongs to another architecture, or the size is invalid.
        TypeError: a plan without a size, or a keep-set with a size or `uniform`.
    """
    if size is not None:
        if isinstance(keep, KeepSet):
            raise TypeError("a keep-set has its size; pass a size only with a plan")
        keep.check_model(config)
        keep = keep.keep(size, uniform=uniform)
    elif not isinstance(keep, KeepSet):
        raise TypeError("a plan needs a size: prune(model, plan, size) / load_pruned(checkpoint, plan, size)")
    elif uniform:
        raise TypeError("uniform=True chooses units from a plan; it does not apply to a keep-set")
    if keep.units.config != config.replace(layers=None) or config.layers is not None:
        raise ValueError(
            "this keep-set was computed for another architecture than the model's: "
            f"plan {keep.units.config} vs model {config}")
    return keep


def prune(model: Llama, keep, size: float | int | None = None, *, uniform: bool = False) -> Llama:
    """The smaller dense model that keeps exactly the chosen units.

    Its logits equal those of `model` run with `ppn.gates.hard_gates(keep)`, and its
    prunable parameter count is `keep.num_params()`. The gathers are jitted,
    compiled once per (tensor shape, kept count).

    Args:
        model: the dense model.
        keep: a `KeepSet`, or a `ppn.Plan` together with `size`.
        size: with a plan: a fraction of prunable parameters in (0, 1] or a count.
        uniform: with a plan: the same counts in every block (`Plan.keep`).

    Raises:
        ValueError: the keep-set or plan belongs to another architecture, or the size is invalid.
    """
    keep = keep_set(keep, size, model.config, uniform)
    dense = dict(hf_tensors(model))
    spec = gather_spec(keep)

    def take(name, _):
        t = spec[name]
        return t.apply_scale(dense[name] if t.indices is None else _take(dense[name], jnp.asarray(t.indices), t.axis))

    return build_model(keep.config(), take, dtype=model.dtype)


def load_pruned(checkpoint: str | os.PathLike, plan, size: float | int | None = None, *, uniform: bool = False,
                dtype="float32") -> Llama:
    """Loads only the kept part of a checkpoint: the pruned model, without the dense one.

    Equals `prune(load_model(checkpoint), plan, size, uniform=uniform)` exactly,
    but reads from the safetensors files (single or sharded) only the tensors
    of kept sub-layers and, of those, only the rows and columns of kept query
    heads, KV heads and MLP channels (`gather_spec`), each run of consecutive
    ones as one memory-mapped slice. Peak memory is the pruned model plus at
    most one of its tensors and a few MiB of the file in flight
    (`SafetensorsReader`), not the dense model. The loading
    is as strict as `load_model`'s: every tensor of the dense checkpoint must be
    present with its shape, and no other.

    A GGUF source, a `.gguf` file or a zoo name (whose models are GGUFs), goes
    first through the one-time conversion to float32 safetensors in ppn's cache
    (`safetensors_dir`), which needs the whole model in memory once; this and
    later loads then read only the kept slices of the converted file.

    Args:
        checkpoint: a Hugging Face checkpoint directory, a `.gguf` file or a zoo name.
        plan: a `ppn.Plan` fitted on this checkpoint's architecture, or a `KeepSet`.
        size: with a plan: a fraction of prunable parameters in (0, 1] or a count.
        uniform: with a plan: the same counts in every block, a standard
            Hugging Face architecture (`Plan.keep`).
        dtype: weight dtype, "float32" (default) or "bfloat16".

    Raises:
        FileNotFoundError: no such checkpoint, or no config.json / weights in it.
        ValueError: the plan was fitted on another architecture, an invalid
            size, or a missing, unexpected, mis-shaped or corrupt tensor.
    """
    path = safetensors_dir(checkpoint)
    config = read_config(path)
    keep = keep_set(plan, size, config, uniform)
    reader = SafetensorsReader(path)
    dense = hf_layout(config)
    check_names(set(dense), set(reader.files), str(path), config.tie_word_embeddings)
    for name, tensor in dense.items():  # the removed tensors' too, as load_model checks them
        reader.check_shape(name, tensor.hf_shape)
    spec = gather_spec(keep)
    return build_model(keep.config(), lambda name, _: spec[name].apply_scale(
        reader.read(name, dense[name].hf_shape, spec[name].axis, spec[name].indices)), dtype)
