"""Loading and saving checkpoints: the public API and where a source's files come from.

A source is a Hugging Face checkpoint directory (config.json plus model.safetensors
or a sharded model.safetensors.index.json), a `.gguf` file, a zoo name such as
"smollm2-135m-instruct-q4_1", or a Hugging Face Hub repo id such as
"HuggingFaceTB/SmolLM2-135M" (downloaded once into the Hub's own cache).
Loading builds the module abstractly with `nnx.eval_shape` (no random
initialisation, no second copy of the weights) and fills it tensor by tensor
from memory-mapped files (`ppn.hf_format.build_model`, `ppn.safetensors_io`). It
is strict: every expected tensor must be present with its exact shape, and no
unexpected tensor may remain; errors name the tensor and the file.

Saving writes the Hugging Face layout atomically: config.json (with the weights'
`dtype`, `ppn.hf_format.hf_config`), then model.safetensors, or shards with a
model.safetensors.index.json beyond `max_shard_size`.
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
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppn.hf_format import build_model, check_names, hf_config, hf_layout, hf_tensors, read_config, resolve_dtype
from ppn.models.config import LlamaConfig
from ppn.models.llama import Llama
from ppn.safetensors_io import INDEX_FILE, SINGLE_FILE, SafetensorsReader

# transformers' own default for `save_pretrained` (5.x): in practice, one file
MAX_SHARD_SIZE = "50GB"

log = logging.getLogger(__name__)


# --------------------------------------------------------------------- sources
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
    from ppn.gguf_tokenizer import convert_gguf

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
    return Llama(read_config(path), dtype=resolve_dtype(dtype), rngs=nnx.Rngs(seed))


def load_tokenizer(source: str | os.PathLike):
    """The Hugging Face tokenizer of a checkpoint directory, a .gguf file or a zoo name.

    A directory with a tokenizer.json loads through `PreTrainedTokenizerFast`
    (importing `AutoTokenizer` would import torch when it is installed).
    """
    path = resolve_source(source)
    if path.is_file():
        from ppn.gguf_tokenizer import tokenizer_from_gguf

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
