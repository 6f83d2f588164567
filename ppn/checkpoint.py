"""Strict loading and atomic saving of checkpoints.

A source is a Hugging Face checkpoint directory (config.json plus model.safetensors
or a sharded model.safetensors.index.json), a `.gguf` file, a zoo name such as
"smollm2-135m-instruct-q4_1", or a Hugging Face Hub repo id such as
"HuggingFaceTB/SmolLM2-135M" (downloaded once into the Hub's own cache).
Loading builds the module abstractly with `nnx.eval_shape` (no random
initialisation, no second copy of the weights) and fills it tensor by tensor
from memory-mapped files. It is strict: every expected tensor must be
present with its exact shape, and no unexpected tensor may remain; errors name
the tensor and the file.

Saving writes the Hugging Face layout: config.json (with the weights' `dtype`),
then model.safetensors, or shards with a model.safetensors.index.json beyond
`max_shard_size`. A model pruned to different shapes per block cannot be built
by transformers; its config.json says so with its own model type
("ppn_pruned_llama"), which transformers refuses by name instead of loading the
dense shapes and re-initialising the weights that do not fit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
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
# transformers' own default for `save_pretrained` (5.x): in practice, one file
MAX_SHARD_SIZE = "50GB"

PRUNED_PREFIX = "ppn_pruned_"  # model_type and (capitalised) architecture prefix of per-block pruned checkpoints
PRUNED_NOTE = ("Pruned by ppn with different shapes per block (listed in ppn_layers): transformers cannot build "
               "this model. Load it with ppn.load_model, or export a standard Hugging Face checkpoint with "
               "`ppn resize --uniform` (ppn.load_pruned(..., uniform=True)).")

log = logging.getLogger(__name__)


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
            `hf_layout(config)`; returns an array (numpy or jax) of shape
            `spec.hf_shape`, which the model may keep without a copy: it must
            not be modified afterwards.
        dtype: dtype of the weights.
    """
    dtype = _resolve_dtype(dtype)
    model = nnx.eval_shape(lambda: Llama(config, dtype=dtype, rngs=nnx.Rngs(0)))
    for name, spec in hf_layout(config).items():
        # reshaped before conversion: free for numpy, and no reshape kernel compiled per shape
        value = tensors(name, spec).reshape(spec.shape)
        # device_put adopts a 64-byte aligned host array without a copy on CPU
        value = jax.device_put(value) if value.dtype == dtype else jnp.asarray(value, dtype=dtype)
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
        return {name: single for name in _header(single)}
    others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    hint = f" (found {', '.join(others)}: ppn reads safetensors only; re-save with safe_serialization=True)" if others else ""
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}{hint}")


def _header(file: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of one safetensors file, read from its header only."""
    from safetensors import safe_open

    if not file.exists():
        raise FileNotFoundError(f"checkpoint shard {file} listed in {INDEX_FILE} does not exist")
    try:
        with safe_open(file, framework="numpy") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error type for bad headers
        raise ValueError(f"cannot read safetensors file {file}: {e} (truncated or corrupt?)") from e


CHUNK_BYTES = 4 << 20  # of a tensor's rows (counted at 4 bytes a value) mapped at a time


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array on a 64-byte boundary, which JAX on CPU adopts without a copy."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(size + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + size].view(dtype).reshape(shape)


def _runs(indices: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive indices: (start, stop, position of start in `indices`)."""
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    firsts = np.concatenate([[0], breaks]).astype(int)
    lasts = np.concatenate([breaks - 1, [indices.size - 1]]).astype(int)
    return [(int(indices[a]), int(indices[b]) + 1, int(a)) for a, b in zip(firsts, lasts)] if indices.size else []


class SafetensorsReader:
    """Reads named tensors, or some of their rows or columns, from a checkpoint's
    safetensors files, as numpy arrays of the file's dtype.

    Files are memory-mapped, but a mapping is held only while one chunk of at
    most `CHUNK_BYTES` of the file is read and then dropped: pages a process has
    touched in a mapping count in its resident memory, so holding the mapping
    would add a second copy of everything read to the peak.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.files = _safetensor_files(directory)
        self._headers: dict[Path, dict[str, tuple[int, ...]]] = {}

    def shape(self, name: str) -> tuple[int, ...]:
        file = self.files[name]
        if file not in self._headers:
            self._headers[file] = _header(file)
        return self._headers[file][name]

    def read(self, name: str, expected_shape: tuple[int, ...], axis: int = 0,
             indices: np.ndarray | None = None) -> np.ndarray:
        """Tensor `name`, or only `indices` along `axis` (0 or 1), after checking its full shape.

        Each run of consecutive indices is read as one slice, chunk by chunk of
        the file's rows: of the file, only the kept rows (axis 0) or the rows
        holding the kept columns (axis 1) are touched, at most `CHUNK_BYTES` of
        them at a time, and only the result is allocated.

        Returns:
            An array of `expected_shape` with axis `axis` cut to `len(indices)`.
        """
        from safetensors import safe_open

        file = self.files.get(name)
        if file is None:
            raise KeyError(f"checkpoint {self.directory} is missing tensor {name!r}")
        shape = self.shape(name)
        if shape != tuple(expected_shape):
            raise ValueError(
                f"tensor {name!r} in {file} has shape {shape}, expected {tuple(expected_shape)}")
        runs = [(0, shape[axis], 0)] if indices is None else _runs(np.asarray(indices))
        # (source, destination) index pairs: kept rows, or all rows and the kept columns
        rows = runs if axis == 0 else [(0, shape[0], 0)]
        cols = [((), ())] if axis == 0 else [((slice(a, b),), (slice(at, at + b - a),)) for a, b, at in runs]
        out_shape = shape[:axis] + (sum(b - a for a, b, _ in runs),) + shape[axis + 1:]
        rows_per_chunk = max(1, CHUNK_BYTES // max(1, 4 * int(np.prod(shape[1:]))))
        out = np.empty(out_shape, np.float32) if 0 in out_shape else None
        try:
            for c0 in range(0, shape[0], rows_per_chunk):
                c1 = min(shape[0], c0 + rows_per_chunk)
                reads = [(slice(max(a, c0), min(b, c1)), slice(at + max(a, c0) - a, at + min(b, c1) - a))
                         for a, b, at in rows if a < c1 and b > c0]
                if not reads:
                    continue
                with safe_open(file, framework="numpy") as f:  # mapped for this chunk only
                    for src_rows, dst_rows in reads:
                        for src_cols, dst_cols in cols:
                            piece = self._slice(f, name, (src_rows,) + src_cols)
                            if out is None:
                                out = _aligned_empty(out_shape, piece.dtype)
                            out[(dst_rows,) + dst_cols] = piece
        except Exception as e:
            raise ValueError(f"cannot read tensor {name!r} from {file}: {e} (truncated or corrupt?)") from e
        return out

    @staticmethod
    def _slice(f, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """`index` of tensor `name` of the open file `f`: the only place tensor data is read."""
        return f.get_slice(name)[index]


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


# "org/name": what the Hub accepts as a repo id (letters, digits, "-", "_", "."; not starting with ".")
HUB_ID = re.compile(r"[\w-][\w.-]*/[\w-][\w.-]*")
# a checkpoint's files on the Hub: its config and weights, and the tokenizer's files; not other
# formats (pytorch_model.bin, consolidated.safetensors, onnx/, gguf) that some repos carry as well
HUB_FILES = ["config.json", "generation_config.json", SINGLE_FILE, "model-*-of-*.safetensors", INDEX_FILE,
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
             "tokenizer.model", "vocab.json", "merges.txt"]


def is_hub_id(source: str) -> bool:
    """Whether `source` has the form of a Hugging Face Hub repo id, "org/name"."""
    return HUB_ID.fullmatch(source) is not None and not source.endswith((".", ".gguf"))


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of Hub repo `repo_id`, downloading its checkpoint files on first use.

    Goes through `huggingface_hub.snapshot_download`, so the files live in the
    Hub's cache (`HF_HUB_CACHE`, `HF_HOME`), are shared with transformers, and
    are found offline (`HF_HUB_OFFLINE=1`) once downloaded.

    Raises:
        FileNotFoundError: the repo is unknown, gated, unreachable or not cached
            offline; the message names the repo id and the Hub's reason.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except (OSError, HFValidationError) as e:  # the Hub's HTTP and cache errors are OSErrors
        raise FileNotFoundError(
            f"no checkpoint at {repo_id!r}: not an existing directory or .gguf file, nor a known model name, and "
            f"the Hugging Face Hub repo {repo_id!r} could not be fetched ({type(e).__name__}: {e})") from e


def resolve_source(source: str | os.PathLike) -> Path:
    """A checkpoint directory or .gguf file for `source`.

    In this order: an existing path; a zoo name, fetched and converted on first
    use; a Hub repo id ("org/name"), downloaded on first use (`hub_snapshot`).

    Raises:
        FileNotFoundError: none of these; the message names `source`.
    """
    path = Path(source).expanduser()
    if path.exists():
        return path
    from ppn import zoo

    if zoo.is_zoo_name(str(source)):
        return zoo.fetch(str(source))
    if is_hub_id(str(source)):
        return hub_snapshot(str(source))
    raise FileNotFoundError(
        f"no checkpoint at {str(source)!r}: not an existing directory or .gguf file, "
        f"nor a known model name ({', '.join(zoo.names())}), nor a Hugging Face Hub repo id (org/name)")


def safetensors_dir(source: str | os.PathLike, *, progress: bool = True) -> Path:
    """A safetensors checkpoint directory for `source`, converting a GGUF once.

    A directory is returned as is and a zoo name as its converted cache entry
    (`ppn.zoo.fetch`). A `.gguf` file is converted on first use, like the zoo's,
    into float32 safetensors under `<cache>/gguf/<stem>-<key>/`, keyed by its path,
    size and modification time; that conversion holds the whole model in memory,
    later calls find it at once.
    """
    path = resolve_source(source)
    if path.is_dir():
        return path
    if path.suffix != ".gguf":
        raise ValueError(f"{path} is a file but not a .gguf; pass a checkpoint directory or a .gguf file")
    from ppn import zoo
    from ppn.gguf_reader import convert_gguf

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = zoo.cache_dir() / "gguf" / f"{path.stem}-{key}"
    if not target.exists():
        if progress:
            log.info("converting %s once to float32 safetensors in %s ...", path.name, target)
        try:
            convert_gguf(path, target, progress=progress)
        except OSError:
            if not (target / SINGLE_FILE).exists():  # else another process converted it first
                raise
    return target


def load_model(source: str | os.PathLike, dtype="float32") -> Llama:
    """Loads a LLaMA-family model strictly.

    Args:
        source: a Hugging Face checkpoint directory, a `.gguf` file, a zoo
            name ("smollm2-135m-instruct-q4_1", fetched and converted on first
            use) or a Hub repo id ("HuggingFaceTB/SmolLM2-135M", downloaded on
            first use).
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
        check_names(set(hf_layout(config)), set(ckpt.tensors), str(path), config.tie_word_embeddings)

        def from_gguf(name, spec):
            array = ckpt.tensors[name]
            if tuple(array.shape) != spec.hf_shape:
                raise ValueError(f"tensor {name!r} in {path} has shape {array.shape}, expected {spec.hf_shape}")
            return array

        return build_model(config, from_gguf, dtype)

    config = read_config(path)
    reader = SafetensorsReader(path)
    check_names(set(hf_layout(config)), set(reader.files), str(path), config.tie_word_embeddings)
    return build_model(config, lambda name, spec: reader.read(name, spec.hf_shape), dtype)


def random_model(source: str | os.PathLike, dtype="float32", seed: int = 0) -> Llama:
    """A model of `source`'s architecture with random weights, from its config.json
    alone (no weight is read; the directory may hold none).

    For measurements that do not depend on the weights (throughput, memory, FLOP
    utilisation) on a machine the weights cannot reach. Its perplexities mean nothing.

    Raises:
        FileNotFoundError: the source does not exist or lacks config.json.
        ValueError: a .gguf file (its config sits inside the weights), or an unsupported config.
    """
    path = resolve_source(source)
    if path.is_file():
        raise ValueError(f"{path}: random weights need a checkpoint directory's config.json, not a file")
    return Llama(read_config(path), dtype=_resolve_dtype(dtype), rngs=nnx.Rngs(seed))


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


def save_model(model: Llama, directory: str | os.PathLike, tokenizer=None, overwrite: bool = False,
               max_shard_size: int | str = MAX_SHARD_SIZE) -> Path:
    """Writes a Hugging Face checkpoint directory atomically.

    The directory holds config.json (see `hf_config`), the weights in their
    dtype, and the tokenizer's files when one is given. Weights above
    `max_shard_size` are split like transformers' `save_pretrained` does, into
    model-00001-of-0000N.safetensors ... with a model.safetensors.index.json;
    else they go in one model.safetensors. Nothing is written at `directory`
    unless everything succeeded.

    A model pruned to the same shape in every block (`uniform=True`) is a
    standard checkpoint that transformers loads; one with different shapes per
    block has model type "ppn_pruned_llama" (or _mistral, _qwen2), which only
    ppn loads.

    Args:
        model: the model to save.
        directory: the checkpoint directory to create.
        tokenizer: a Hugging Face tokenizer saved beside the weights, or None.
        overwrite: replace an existing non-empty `directory`.
        max_shard_size: largest shard, in bytes or as a string like "5GB"
            (transformers' default, "50GB", keeps today's models in one file).

    Returns:
        `directory` as a Path.

    Raises:
        FileExistsError: `directory` exists, is not empty and `overwrite` is False.
    """
    from huggingface_hub import split_state_dict_into_shards_factory
    from safetensors.flax import save_file

    target = Path(directory)
    with atomic_dir(target, overwrite) as tmp:
        tensors = {name: jnp.asarray(t) for name, t in hf_tensors(model)}
        split = split_state_dict_into_shards_factory(tensors, get_storage_size=lambda t: t.nbytes,
                                                     filename_pattern="model{suffix}.safetensors",
                                                     max_shard_size=max_shard_size)
        (tmp / "config.json").write_text(json.dumps(hf_config(model.config, model.dtype), indent=2))
        for file, names in split.filename_to_tensors.items():
            save_file({name: tensors[name] for name in names}, str(tmp / file), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_parameters": count_params(model), **split.metadata},
                     "weight_map": split.tensor_to_filename}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return target


# the names transformers users reach for; a model saves as `ppn.save_pretrained(model, directory)`
from_pretrained = load_model
save_pretrained = save_model


def count_params(model: Llama) -> int:
    """Number of weights actually held by the module (a tied head counted once)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
