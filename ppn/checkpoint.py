"""Strict loading and atomic saving of checkpoints.

A source is a Hugging Face checkpoint directory (config.json plus model.safetensors
or a sharded model.safetensors.index.json), a `.gguf` file, or a zoo name such as
"smollm2-135m". Loading builds the module abstractly with `nnx.eval_shape` (no
random initialisation, no second copy of the weights) and fills it tensor by
tensor from memory-mapped files. It is strict: every expected tensor must be
present with its exact shape, and no unexpected tensor may remain; errors name
the tensor and the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppn.models.config import LlamaConfig
from ppn.models.llama import Llama

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


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
    return layout


def _resolve_dtype(dtype) -> jnp.dtype:
    try:
        return jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"unknown dtype {dtype!r}; use 'float32' or 'bfloat16'") from e


def _param(module: nnx.Module, path: tuple) -> nnx.Variable:
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
            `hf_layout(config)`; returns an array of shape `spec.hf_shape`.
        dtype: dtype of the weights.
    """
    dtype = _resolve_dtype(dtype)
    model = nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0)))
    for name, spec in hf_layout(config).items():
        value = jnp.asarray(tensors(name, spec), dtype=dtype).reshape(spec.shape)
        _param(model, spec.path).set_value(value)
    return model


# --------------------------------------------------------------------- sources
def _safetensor_files(directory: Path) -> dict[str, Path]:
    """Maps every tensor name to its safetensors file (single or sharded checkpoint)."""
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"corrupt safetensors index {index}: {e}") from e
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / SINGLE_FILE
    if single.exists():
        return {name: single for name in _safetensor_names(single)}
    others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    hint = f" (found {', '.join(others)}: ppn reads safetensors only; re-save with safe_serialization=True)" if others else ""
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}{hint}")


def _safetensor_names(file: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(file, framework="flax") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error type for bad headers
        raise ValueError(f"cannot read safetensors file {file}: {e} (truncated or corrupt?)") from e


class SafetensorsReader:
    """Reads named tensors, or slices of them, from a checkpoint's safetensors files.

    Files are memory-mapped and opened once each; `read` returns a jax array.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.files = _safetensor_files(directory)
        self._open: dict[Path, object] = {}

    def _handle(self, file: Path):
        from safetensors import safe_open

        if file not in self._open:
            if not file.exists():
                raise FileNotFoundError(f"checkpoint shard {file} listed in {INDEX_FILE} does not exist")
            try:
                self._open[file] = safe_open(file, framework="flax")
            except Exception as e:
                raise ValueError(f"cannot read safetensors file {file}: {e} (truncated or corrupt?)") from e
        return self._open[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.files[name]).get_slice(name).get_shape())

    def read(self, name: str, expected_shape: tuple[int, ...]) -> jax.Array:
        """The whole tensor `name`, after checking its shape."""
        file = self.files.get(name)
        if file is None:
            raise KeyError(f"checkpoint {self.directory} is missing tensor {name!r}")
        shape = self.shape(name)
        if shape != tuple(expected_shape):
            raise ValueError(
                f"tensor {name!r} in {file} has shape {shape}, expected {tuple(expected_shape)}")
        try:
            return self._handle(file).get_tensor(name)
        except Exception as e:
            raise ValueError(f"cannot read tensor {name!r} from {file}: {e} (truncated or corrupt?)") from e


def _check_names(expected: set[str], found: set[str], where: str, tied: bool) -> None:
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
        return LlamaConfig.from_hf(hf)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{file}: {e}") from e


def resolve_source(source: str | os.PathLike) -> Path:
    """A checkpoint directory or .gguf file for `source`, fetching zoo names on first use."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    from ppn import zoo

    if zoo.is_zoo_name(str(source)):
        return zoo.fetch(str(source))
    raise FileNotFoundError(
        f"no checkpoint at {str(source)!r}: not an existing directory or .gguf file, "
        f"nor a known model name ({', '.join(zoo.MODELS)})")


def load_model(source: str | os.PathLike, dtype="float32") -> Llama:
    """Loads a LLaMA-family model strictly.

    Args:
        source: a Hugging Face checkpoint directory, a `.gguf` file, or a zoo
            name ("smollm2-135m", fetched and converted on first use).
        dtype: weight and activation dtype, "float32" (default) or "bfloat16".

    Returns:
        The `Llama` module with every weight filled from the checkpoint.

    Raises:
        FileNotFoundError: the source does not exist or lacks config.json / weights.
        ValueError: unsupported architecture, a missing, unexpected or mis-shaped
            tensor, or a corrupt file; the message names the tensor and file.
    """
    path = resolve_source(source)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf; pass a checkpoint directory or a .gguf file")
        from ppn.gguf_reader import read_gguf

        ckpt = read_gguf(path)
        config = LlamaConfig.from_hf(ckpt.config)
        _check_names(set(hf_layout(config)), set(ckpt.tensors), str(path), config.tie_word_embeddings)

        def from_gguf(name, spec):
            array = ckpt.tensors[name]
            if tuple(array.shape) != spec.hf_shape:
                raise ValueError(f"tensor {name!r} in {path} has shape {array.shape}, expected {spec.hf_shape}")
            return array

        return build_model(config, from_gguf, dtype)

    config = read_config(path)
    reader = SafetensorsReader(path)
    _check_names(set(hf_layout(config)), set(reader.files), str(path), config.tie_word_embeddings)
    return build_model(config, lambda name, spec: reader.read(name, spec.hf_shape), dtype)


def load_tokenizer(source: str | os.PathLike):
    """The Hugging Face tokenizer of a checkpoint directory, a .gguf file or a zoo name.

    A directory with a tokenizer.json loads through `PreTrainedTokenizerFast`
    (importing `AutoTokenizer` would import torch when it is installed).
    """
    path = resolve_source(source)
    if path.is_file():
        from ppn.gguf_reader import tokenizer_from_gguf

        return tokenizer_from_gguf(path)
    try:
        if (path / "tokenizer.json").exists():
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(path)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"no usable tokenizer in {path}: {e}") from e


# ---------------------------------------------------------------------- saving
def hf_tensors(model: Llama) -> Iterator[tuple[str, jax.Array]]:
    """The model's weights under Hugging Face names and shapes."""
    for name, spec in hf_layout(model.config).items():
        yield name, _param(model, spec.path)[...].reshape(spec.hf_shape)


@dataclasses.dataclass
class _AtomicDir:
    """A temporary sibling directory renamed onto `target` only on success."""

    target: Path
    overwrite: bool = False

    def __enter__(self) -> Path:
        if self.target.exists() and any(self.target.iterdir()) and not self.overwrite:
            raise FileExistsError(f"{self.target} exists and is not empty; pass overwrite=True to replace it")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> _AtomicDir:
    """Context manager: write into the yielded temporary directory; it becomes
    `target` by a rename when the block succeeds and vanishes when it fails."""
    return _AtomicDir(Path(target), overwrite)


def save_model(model: Llama, directory: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
    """Writes a Hugging Face-compatible checkpoint directory atomically.

    The directory holds config.json (with per-block shapes when pruned),
    model.safetensors, and the tokenizer's files when one is given. Nothing is
    written at `directory` unless everything succeeded.
    """
    from safetensors.flax import save_file

    target = Path(directory)
    with atomic_dir(target, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
        save_file({name: jnp.asarray(t) for name, t in hf_tensors(model)}, str(tmp / SINGLE_FILE),
                  metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return target


def count_params(model: Llama) -> int:
    """Number of weights actually held by the module (a tied head counted once)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
