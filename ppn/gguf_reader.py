"""Reading llama.cpp GGUF files' weights and config as a Hugging Face checkpoint, without torch.

A GGUF file holds a model's config and tokenizer as metadata (llama.cpp key
names, e.g. `llama.block_count`) and its weights as possibly quantised tensors
(llama.cpp names, e.g. `blk.3.attn_q.weight`). This module turns the weights
and config into what a Hugging Face `LlamaForCausalLM` checkpoint holds:

    ckpt = read_gguf("model.Q4_1.gguf")     # config dict + float32 tensors, HF names

(the tokenizer, and the whole file as a checkpoint directory: `ppn.gguf_tokenizer`).

Weights are dequantised to float32 (a quantised model stays as accurate as it
was; nothing is gained back). Two llama.cpp conventions are undone: the reversed
shape order of GGUF tensors, and the row permutation its converter applies to
the query and key projections (see `unpermute_rows`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

SUPPORTED_ARCHITECTURE = "llama"

# llama.cpp tensor name (the part after "blk.{i}.") -> Hugging Face name (after "model.layers.{i}.").
_BLOCK_TENSORS = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Llama 3.1-style rope scaling is stored by llama.cpp as a tensor of per-frequency
# divisors rather than as metadata; it is turned back into config, not a weight.
_ROPE_FREQS = "rope_freqs.weight"

# The large tokenizer arrays, which reading the weights does not need.
_VOCABULARY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                    "tokenizer.ggml.scores")


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
    """A GGUF file's model as a Hugging Face checkpoint held in memory.

    Attributes:
        config: a `config.json`-style dict for `LlamaForCausalLM` (model_type
            "llama", hidden_size, num_hidden_layers, rope_theta, ...).
        tensors: float32 weights under Hugging Face names and shapes, e.g.
            `model.layers.0.self_attn.q_proj.weight` of shape (N*H, D) with N
            query heads of size H and model width D. `lm_head.weight` is present
            only when the file has an untied output projection.
        path: the file it was read from.
    """

    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    path: Path


# ------------------------------------------------------------------ opening
def open_gguf(path: str | os.PathLike):
    """Opens a GGUF file with `gguf.GGUFReader`, turning every failure into a clear error.

    Returns:
        (path, reader).

    Raises:
        FileNotFoundError: nothing at `path`.
        ValueError: the file is not a readable GGUF file (bad magic, truncated,
            big-endian, a directory, ...); the message names the file.
    """
    import gguf

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no GGUF file at {path}")
    if path.is_dir():
        raise ValueError(f"not a valid GGUF file: {path} (it is a directory)")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, struct/numpy errors, ...
        raise ValueError(f"not a valid GGUF file: {path} ({type(e).__name__}: {e})") from e
    if reader.byte_order == "S":  # "S": swapped relative to this machine
        raise ValueError(f"unsupported GGUF file: {path} (byte order opposite to this machine's)")
    return path, reader


def read_metadata(reader, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Key-value metadata of an open GGUF file as Python values (str, int, float, bool, list).

    Keys starting with a prefix in `skip` are left out (decoding the 49k-string
    vocabulary takes a second that reading the weights does not need).
    Float32 values are given as the shortest decimal that rounds to them
    (1e-05 rather than 9.999999747378752e-06), as they were before being stored.
    """
    import gguf

    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key.startswith(skip):
            continue
        value = field.contents()
        if field.types == [gguf.GGUFValueType.FLOAT32]:
            value = float(str(np.float32(value)))
        out[key] = value
    return out


# ------------------------------------------------------------------ config
def required(meta: Mapping[str, Any], key: str, path: Path):
    """`meta[key]`; a ValueError naming the key and the file when it is missing."""
    if key not in meta:
        raise ValueError(f"GGUF file {path} lacks metadata key {key!r}")
    return meta[key]


def check_architecture(meta: Mapping[str, Any], path: Path) -> None:
    """Raises ValueError unless the file's `general.architecture` is the one ppn reads ("llama")."""
    arch = meta.get("general.architecture")
    if arch != SUPPORTED_ARCHITECTURE:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r} in {path}: only {SUPPORTED_ARCHITECTURE!r} is supported")


def _llama3_divisors(head_dim: int, theta: float, factor: float, low: float, high: float,
                     original: float) -> np.ndarray:
    """Per-frequency divisors of Llama 3 rope scaling, float64 of shape (H/2,).

    A divisor is 1 for short wavelengths, `factor` for long ones and a smooth
    blend in between; the scaled inverse frequency is `inv_freq / divisor`.
    """
    inv = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    blended = 1.0 / ((1.0 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, blended))


def _llama3_from_divisors(divisors: np.ndarray, head_dim: int, theta: float, original: float,
                          path: Path) -> dict[str, Any] | None:
    """Recovers Llama 3 rope-scaling parameters from llama.cpp's `rope_freqs` tensor.

    The tensor only holds the divisors the parameters produce; `factor` is the
    largest, and the blend between the two regimes is linear in 1/wavelength,
    which gives the low and high frequency factors. The answer is accepted only
    if it reproduces every divisor, so a tensor that is not Llama 3 scaling is an
    error rather than a silently wrong model.

    Args:
        divisors: the `rope_freqs` values, shape (H/2,).
        head_dim: H.
        theta: the rope base.
        original: the pre-extension context length (from metadata, else 8192).
        path: the file, for error messages.

    Returns:
        A `rope_scaling` dict (rope_type "llama3"), or None when every divisor is 1.
    """
    d = np.asarray(divisors, dtype=np.float64).reshape(-1)
    if d.shape != (head_dim // 2,):
        raise ValueError(f"{_ROPE_FREQS} in {path} has shape {d.shape}, expected ({head_dim // 2},)")
    if np.allclose(d, 1.0):
        return None
    factor = float(d.max())
    candidates = [(1.0, 4.0)]  # the values every released Llama 3.x model uses
    inv = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    x = original * inv / (2 * math.pi)  # original / wavelength
    mid = (d > 1.0 + 1e-6) & (d < factor - 1e-6)
    if mid.sum() >= 2:
        smooth = (1.0 / d[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
        slope, intercept = np.polyfit(x[mid], smooth, 1)
        if slope > 0:
            low = -intercept / slope
            candidates.append((low, low + 1.0 / slope))
    for low, high in candidates:
        if high > low > 0 and np.allclose(
                _llama3_divisors(head_dim, theta, factor, low, high, original), d, rtol=1e-4, atol=0):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
                    "high_freq_factor": float(high), "original_max_position_embeddings": int(original)}
    raise ValueError(f"{_ROPE_FREQS} in {path} is not Llama 3 rope scaling; cannot express it as a "
                     f"Hugging Face rope_scaling")


def _rope_scaling(meta: Mapping[str, Any], rope_freqs: np.ndarray | None, head_dim: int, theta: float,
                  path: Path) -> dict[str, Any] | None:
    """The Hugging Face `rope_scaling` dict for a llama GGUF, or None for plain rope."""
    kind = meta.get("llama.rope.scaling.type", "none")
    original = meta.get("llama.rope.scaling.original_context_length")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(required(meta, "llama.rope.scaling.factor", path))}
    if kind == "llama3":  # not written by llama.cpp's converter, but unambiguous when present
        return {"rope_type": "llama3",
                "factor": float(required(meta, "llama.rope.scaling.factor", path)),
                "low_freq_factor": float(meta.get("llama.rope.scaling.low_freq_factor", 1.0)),
                "high_freq_factor": float(meta.get("llama.rope.scaling.high_freq_factor", 4.0)),
                "original_max_position_embeddings": int(original or 8192)}
    if kind not in ("none", ""):
        raise ValueError(f"unsupported rope scaling type {kind!r} in {path}; supported: none, linear, llama3")
    if rope_freqs is not None:
        return _llama3_from_divisors(rope_freqs, head_dim, theta, float(original or 8192), path)
    return None


def _config(meta: Mapping[str, Any], rope_freqs: np.ndarray | None, vocab_rows: int | None, tied: bool,
            path: Path) -> dict[str, Any]:
    """The Hugging Face `config.json` dict for a llama GGUF's metadata."""
    hidden = int(required(meta, "llama.embedding_length", path))
    heads = int(required(meta, "llama.attention.head_count", path))
    kv_heads = int(meta.get("llama.attention.head_count_kv", heads))
    head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
    if int(meta.get("llama.attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"unsupported GGUF {path}: key and value head sizes differ")
    rotary = int(meta.get("llama.rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise ValueError(f"unsupported GGUF {path}: rope over {rotary} of {head_dim} head dimensions")
    theta = float(meta.get("llama.rope.freq_base", 10000.0))
    vocab = meta.get("llama.vocab_size") or vocab_rows
    if vocab is None:
        raise ValueError(f"GGUF file {path} states no vocabulary size")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(required(meta, "llama.feed_forward_length", path)),
        "num_hidden_layers": int(required(meta, "llama.block_count", path)),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(meta, rope_freqs, head_dim, theta, path),
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "tie_word_embeddings": tied,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


# ------------------------------------------------------------------ tensors
def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's row permutation of a query or key projection.

    Hugging Face rotates each head's vector as two halves, pairing dimension j
    with j + H/2; llama.cpp's kernels pair adjacent dimensions 2j and 2j+1. So its
    converter reorders each head's H rows from [first half, second half] to
    interleaved (row j of the first half, row j of the second, ...), i.e.
    `w.reshape(n_head, 2, H/2, cols).swapaxes(1, 2)`. Reading it back we must
    apply the inverse, or every head rotates the wrong pairs of dimensions and
    the model produces garbage while all shapes still match.

    Args:
        w: (n_head * H, cols) weights in llama.cpp order (a 1-D bias also works).
        n_head: heads in this projection: query heads for q, key/value heads for k.

    Returns:
        (n_head * H, cols) weights in Hugging Face order.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot unpermute {rows} rows into {n_head} heads of even size")
    rest = w.shape[1:]
    return w.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str, num_layers: int, path: Path) -> str:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_TENSORS:
        if int(parts[1]) >= num_layers:
            raise ValueError(f"tensor {name!r} in {path} is beyond the {num_layers} layers the metadata states")
        return f"model.layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}"
    raise ValueError(f"unexpected tensor {name!r} in {path}: not part of a LLaMA model ppn can load")


def _expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor name of this config with its (out, in) shape."""
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                   p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                   p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                   p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
                   p + "post_attention_layernorm.weight": (d,)}
    return shapes


def _dequantize(tensor, path: Path) -> np.ndarray:
    """One GGUF tensor as a fresh float32 array in numpy (row-major, HF) shape order.

    GGUF lists dimensions innermost first (`tensor.shape` = [in, out] for a
    linear layer), so the numpy shape is the reverse; quantised data comes as
    raw bytes per row and `gguf.quants.dequantize` expands it to (out, in).
    """
    from gguf.quants import dequantize

    shape = tuple(int(s) for s in reversed(tensor.shape))
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ValueError(f"tensor {tensor.name!r} in {path} has type {tensor.tensor_type.name}, "
                         f"which gguf cannot dequantise: {e}") from e
    values = np.asarray(values, dtype=np.float32)
    if np.may_share_memory(values, tensor.data):
        values = values.copy()  # never keep a view of the file's memory map
    return values.reshape(shape)


def read_gguf(path: str | os.PathLike, *, progress: bool = False) -> GGUFCheckpoint:
    """Reads a llama GGUF file as a float32 Hugging Face checkpoint.

    Args:
        path: the `.gguf` file.
        progress: show a tqdm bar while dequantising the tensors.

    Returns:
        A `GGUFCheckpoint` whose tensors load into `transformers.LlamaForCausalLM`
        with the returned config (q/k rows un-permuted, shapes (out, in)).

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: not a GGUF file, an architecture other than "llama", missing
            metadata, or a missing, unexpected or mis-shaped tensor; the message
            names the file (and the tensor).
    """
    from ppn.console import progress_bar

    path, reader = open_gguf(path)
    meta = read_metadata(reader, skip=_VOCABULARY_KEYS)
    check_architecture(meta, path)
    by_name = {t.name: t for t in reader.tensors}
    rope_freqs = _dequantize(by_name[_ROPE_FREQS], path) if _ROPE_FREQS in by_name else None
    embed = by_name.get("token_embd.weight")
    vocab_rows = int(embed.shape[-1]) if embed is not None and len(embed.shape) == 2 else None
    config = _config(meta, rope_freqs, vocab_rows, tied="output.weight" not in by_name, path=path)
    expected = _expected_shapes(config)

    tensors: dict[str, np.ndarray] = {}
    todo = [t for t in reader.tensors if t.name != _ROPE_FREQS]
    for t in progress_bar(todo, desc=f"dequantising {path.name}", unit="tensor", enabled=progress):
        hf = _hf_name(t.name, config["num_hidden_layers"], path)
        w = _dequantize(t, path)
        if w.shape != expected[hf]:
            raise ValueError(f"tensor {t.name!r} in {path} has shape {w.shape}, expected {expected[hf]} "
                             f"for {hf}")
        if hf.endswith("q_proj.weight"):
            w = unpermute_rows(w, config["num_attention_heads"])
        elif hf.endswith("k_proj.weight"):
            w = unpermute_rows(w, config["num_key_value_heads"])
        tensors[hf] = w
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"GGUF file {path} lacks {len(missing)} tensor(s) of its config, e.g. {missing[0]!r}")
    del reader  # release the memory map
    return GGUFCheckpoint(config=config, tensors=tensors, path=path)
