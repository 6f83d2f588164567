"""The Hugging Face checkpoint format of a `Llama`: its tensors' names and shapes, and its config.json.

`hf_layout` names every tensor a checkpoint of a config holds, with its shape
in the file and in the module (a free reshape: q_proj's (N*H, D) is the
module's (N, H, D)). `build_model` fills a `Llama` from a function returning
each named tensor, `hf_tensors` gives them back; the loaders feed it from
safetensors files, a GGUF file or slices of a dense model.

config.json is `LlamaConfig.to_hf` with the weights' `dtype`. A model pruned to
different shapes per block cannot be built by transformers; its config.json
says so with its own model type ("ppn_pruned_llama"), which transformers
refuses by name instead of loading the dense shapes and re-initialising the
weights that do not fit.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from ppn.models.config import LlamaConfig
from ppn.models.llama import Llama

PRUNED_PREFIX = "ppn_pruned_"  # model_type and (capitalised) architecture prefix of per-block pruned checkpoints
PRUNED_NOTE = ("Pruned by ppn with different shapes per block (listed in ppn_layers): transformers cannot build "
               "this model. Load it with ppn.load_model, or export a standard Hugging Face checkpoint with "
               "`ppn resize --uniform` (ppn.load_pruned(..., uniform=True)).")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Where one Hugging Face tensor lives in the module.

    Attributes:
        path: attribute path of the `nnx.Param` inside `Llama`, e.g. ("blocks", 3, "attn", "q").
        hf_shape: shape in the checkpoint file, e.g. (N*H, D) for q_proj.
        shape: shape in the module, e.g. (N, H, D): a free reshape of `hf_shape`.
    """

    path: tuple
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]


def hf_layout(config: LlamaConfig) -> dict[str, TensorSpec]:
    """Every tensor of a Hugging Face checkpoint of this config, by name.

    Blocks of a pruned config list only what they kept, with their own shapes.
    """
    d, h, v = config.hidden_size, config.head_dim, config.vocab_size
    layout = {"model.embed_tokens.weight": TensorSpec(("embed",), (v, d), (v, d)),
              "model.norm.weight": TensorSpec(("norm", "weight"), (d,), (d,))}
    if not config.tie_word_embeddings:
        layout["lm_head.weight"] = TensorSpec(("lm_head",), (v, d), (v, d))
    for i, s in enumerate(config.layer_shapes()):
        pre = f"model.layers.{i}."
        blk = ("blocks", i)
        n, k, f = s.num_heads, s.num_kv_heads, s.intermediate_size
        if s.has_attention:
            layout[pre + "input_layernorm.weight"] = TensorSpec(blk + ("input_norm", "weight"), (d,), (d,))
            for name, heads in (("q", n), ("k", k), ("v", k)):
                layout[pre + f"self_attn.{name}_proj.weight"] = TensorSpec(
                    blk + ("attn", name), (heads * h, d), (heads, h, d))
                if config.qkv_bias:
                    layout[pre + f"self_attn.{name}_proj.bias"] = TensorSpec(
                        blk + ("attn", f"{name}_bias"), (heads * h,), (heads, h))
            layout[pre + "self_attn.o_proj.weight"] = TensorSpec(blk + ("attn", "o"), (d, n * h), (d, n, h))
            if config.o_bias:
                layout[pre + "self_attn.o_proj.bias"] = TensorSpec(blk + ("attn", "o_bias"), (d,), (d,))
        if s.has_mlp:
            layout[pre + "post_attention_layernorm.weight"] = TensorSpec(
                blk + ("post_attention_norm", "weight"), (d,), (d,))
            layout[pre + "mlp.gate_proj.weight"] = TensorSpec(blk + ("mlp", "gate"), (f, d), (f, d))
            layout[pre + "mlp.up_proj.weight"] = TensorSpec(blk + ("mlp", "up"), (f, d), (f, d))
            layout[pre + "mlp.down_proj.weight"] = TensorSpec(blk + ("mlp", "down"), (d, f), (d, f))
            if config.mlp_bias:
                for name, w in (("gate", f), ("up", f), ("down", d)):
                    layout[pre + f"mlp.{name}_proj.bias"] = TensorSpec(blk + ("mlp", f"{name}_bias"), (w,), (w,))
    return layout


def resolve_dtype(dtype) -> jnp.dtype:
    """The dtype a `dtype=` argument names ("float32", "bfloat16", a dtype); ValueError for anything else."""
    try:
        return jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"unknown dtype {dtype!r}; use 'float32' or 'bfloat16'") from e


def _param(module: nnx.Module, path: tuple) -> nnx.Variable:
    """The parameter at `path` (`TensorSpec.path`) of `module`."""
    node = module
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def build_model(config: LlamaConfig, tensors: Callable[[str, TensorSpec], jax.Array],
                dtype=jnp.float32) -> Llama:
    """Builds a `Llama` from a function that returns each named tensor.

    The module is created with `nnx.eval_shape`, so its parameters start as
    shapes only and each is filled exactly once: peak memory is the model plus
    one tensor in flight.

    Args:
        config: the architecture, dense or pruned.
        tensors: called as `tensors(hf_name, spec)` for every name of
            `hf_layout(config)`; returns an array (numpy or jax) of shape
            `spec.hf_shape`, which the model may keep without a copy: it must
            not be modified afterwards.
        dtype: dtype of the weights.
    """
    dtype = resolve_dtype(dtype)
    model = nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0)))
    for name, spec in hf_layout(config).items():
        # reshaped before conversion: free for numpy, and no reshape kernel compiled per shape
        value = tensors(name, spec).reshape(spec.shape)
        # device_put adopts a 64-byte aligned host array without a copy on CPU
        value = jax.device_put(value) if value.dtype == dtype else jnp.asarray(value, dtype=dtype)
        _param(model, spec.path).set_value(value)
    return model


def hf_tensors(model: Llama) -> Iterator[tuple[str, jax.Array]]:
    """The model's weights under Hugging Face names and shapes."""
    for name, spec in hf_layout(model.config).items():
        yield name, _param(model, spec.path)[...].reshape(spec.hf_shape)


def check_names(expected: set[str], found: set[str], where: str, tied: bool) -> None:
    """Raises ValueError naming the tensors `found` lacks of `expected`, or has beyond them."""
    missing = sorted(expected - found)
    # Tied checkpoints sometimes also store the shared output head; it is the embedding.
    unexpected = sorted(found - expected - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise ValueError(f"checkpoint {where} is missing {len(missing)} tensor(s): {missing[:5]}")
    if unexpected:
        raise ValueError(f"checkpoint {where} has {len(unexpected)} unexpected tensor(s): {unexpected[:5]}")


def read_config(directory: Path) -> LlamaConfig:
    """The `LlamaConfig` of a Hugging Face checkpoint directory."""
    file = directory / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{directory} has no config.json: not a Hugging Face checkpoint directory")
    try:
        hf = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt config {file}: {e}") from e
    try:
        return config_from_hf(hf)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{file}: {e}") from e


def hf_config(config: LlamaConfig, dtype="float32") -> dict:
    """The config.json dictionary that `save_model` writes for `config`.

    `LlamaConfig.to_hf` with the weights' dtype under transformers 5's `dtype`
    key. A per-block pruned config (`layers` set) also gets its own model type
    and architecture, e.g. "ppn_pruned_llama" and "PpnPrunedLlamaForCausalLM",
    and a `ppn_note` saying how to get a standard checkpoint: transformers then
    refuses it as an unknown architecture rather than build the dense shapes.

    Args:
        config: the architecture, dense or pruned.
        dtype: dtype of the saved weights.
    """
    d = config.to_hf()
    d.pop("torch_dtype", None)
    d["dtype"] = str(jnp.dtype(dtype))
    if config.layers is None:
        return d
    arch = d["architectures"][0]
    return {"ppn_note": PRUNED_NOTE, **d, "model_type": PRUNED_PREFIX + d["model_type"],
            "architectures": ["PpnPruned" + arch]}


def config_from_hf(hf: dict) -> LlamaConfig:
    """The `LlamaConfig` of a config.json dictionary, ppn's pruned model types included.

    Raises:
        ValueError: an unsupported architecture, or a pruned model type without
            its per-block shapes.
    """
    model_type = hf.get("model_type", "llama")
    if model_type.startswith(PRUNED_PREFIX):
        if not hf.get("ppn_layers"):
            raise ValueError(f"model_type {model_type!r} needs the per-block shapes in ppn_layers, which are missing")
        hf = hf | {"model_type": model_type.removeprefix(PRUNED_PREFIX)}
    return LlamaConfig.from_hf(hf)
