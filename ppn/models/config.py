"""Configuration of a LLaMA-family decoder: the dense architecture and, for pruned
models, the shape that every remaining block keeps.

`LlamaConfig` is frozen and hashable so it can live in a module's static graph and
key `jax.jit` caches. It maps to and from Hugging Face `config.json` dictionaries
for the LLaMA, Mistral and Qwen2 model types, which share one architecture
(RMSNorm, RoPE, grouped-query attention, SwiGLU MLP) up to biases and windows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Frequency rescaling of rotary embeddings for long contexts.

    Attributes:
        rope_type: "linear" (divide every frequency by `factor`) or "llama3"
            (divide only the low frequencies, blend the middle band).
        factor: the context extension factor.
        low_freq_factor, high_freq_factor, original_max_position_embeddings:
            the Llama-3 band edges; unused for "linear".
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ("linear", "llama3"):
            raise ValueError(
                f"unsupported rope_scaling type {self.rope_type!r}; supported: 'linear', 'llama3'"
            )
        if self.factor <= 0:
            raise ValueError(f"rope_scaling factor must be positive, got {self.factor}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError("llama3 rope_scaling needs high_freq_factor > low_freq_factor")


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """What one decoder block keeps after structured pruning.

    Attributes:
        q_to_kv: for every kept query head, the index (among the kept KV heads) of
            the key/value head it reads. Empty when the attention sub-layer is removed.
        num_kv_heads: number of kept key/value heads (0 when attention is removed).
        intermediate_size: number of kept SwiGLU channels (0 when the MLP is removed).
    """

    q_to_kv: tuple[int, ...]
    num_kv_heads: int
    intermediate_size: int

    def __post_init__(self):
        object.__setattr__(self, "q_to_kv", tuple(int(i) for i in self.q_to_kv))
        if self.intermediate_size < 0:
            raise ValueError(f"intermediate_size must be >= 0, got {self.intermediate_size}")
        if (len(self.q_to_kv) == 0) != (self.num_kv_heads == 0):
            raise ValueError(
                "a layer keeps query heads if and only if it keeps KV heads: "
                f"{len(self.q_to_kv)} query heads, {self.num_kv_heads} KV heads"
            )
        if self.q_to_kv and set(self.q_to_kv) != set(range(self.num_kv_heads)):
            raise ValueError(
                f"q_to_kv {self.q_to_kv} must use every KV head 0..{self.num_kv_heads - 1} "
                "(a KV head with no query head is dead weight)"
            )

    @property
    def num_heads(self) -> int:
        return len(self.q_to_kv)

    @property
    def has_attention(self) -> bool:
        return self.num_heads > 0

    @property
    def has_mlp(self) -> bool:
        return self.intermediate_size > 0


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a LLaMA-family decoder-only transformer.

    Attributes:
        vocab_size: V, rows of the embedding table.
        hidden_size: D, the residual width.
        intermediate_size: F, SwiGLU channels of a dense block.
        num_layers: L, decoder blocks.
        num_heads: N, query heads of a dense block.
        num_kv_heads: K, key/value heads of a dense block (N % K == 0; K == N is
            multi-head, K == 1 multi-query attention).
        head_dim: H, width of one head.
        rms_norm_eps: epsilon inside every RMSNorm.
        rope_theta: base of the rotary frequencies.
        rope_scaling: optional long-context rescaling of those frequencies.
        max_position_embeddings: longest sequence the model was trained for.
        tie_word_embeddings: whether the output head reuses the embedding table.
        qkv_bias: biases on the q, k, v projections (Qwen2; LLaMA's attention_bias).
        o_bias: bias on the output projection (LLaMA's attention_bias only).
        mlp_bias: biases on gate, up and down (LLaMA's mlp_bias).
        sliding_window: Mistral's local attention window, None for full attention.
        model_type: the Hugging Face model type this config came from.
        bos_token_id, eos_token_id: special token ids, carried for generation.
        layers: per-block shapes of a pruned model; None means every block is dense.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    layers: tuple[LayerShape, ...] | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.layers is not None:
            layers = tuple(self.layers)
            object.__setattr__(self, "layers", layers)
            if len(layers) != self.num_layers:
                raise ValueError(f"layers has {len(layers)} entries for num_layers={self.num_layers}")
            for i, shape in enumerate(layers):
                if shape.num_heads > self.num_heads or shape.num_kv_heads > self.num_kv_heads:
                    raise ValueError(f"layer {i} keeps more heads than the dense model has: {shape}")
                if shape.intermediate_size > self.intermediate_size:
                    raise ValueError(f"layer {i} keeps more MLP channels than the dense model has")

    # ----------------------------------------------------------------- shapes
    @property
    def group_size(self) -> int:
        """G, query heads per KV head in a dense block."""
        return self.num_heads // self.num_kv_heads

    def dense_layer_shape(self) -> LayerShape:
        """The shape of an unpruned block: query head n reads KV head n // G."""
        return LayerShape(
            q_to_kv=tuple(n // self.group_size for n in range(self.num_heads)),
            num_kv_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
        )

    def layer_shapes(self) -> tuple[LayerShape, ...]:
        """Per-block shapes, dense or pruned, always of length num_layers."""
        if self.layers is not None:
            return self.layers
        return (self.dense_layer_shape(),) * self.num_layers

    def replace(self, **changes) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    def canonical(self) -> LlamaConfig:
        """This architecture without `layers` when its blocks are a plain, smaller dense model.

        That is the case when every block has the same shape, keeps attention and
        MLP, and its query head n reads KV head n // G' (G' = N' / K'): then
        num_heads N', num_kv_heads K' and intermediate_size F' say it all, and
        `to_hf` writes a standard Hugging Face config. Otherwise returns self.
        """
        if self.layers is None or len(set(self.layers)) != 1:
            return self
        s = self.layers[0]
        if not (s.has_attention and s.has_mlp) or s.num_heads % s.num_kv_heads:
            return self
        g = s.num_heads // s.num_kv_heads
        if s.q_to_kv != tuple(n // g for n in range(s.num_heads)):
            return self
        return self.replace(num_heads=s.num_heads, num_kv_heads=s.num_kv_heads,
                            intermediate_size=s.intermediate_size, layers=None)

    # ----------------------------------------------------------------- counts
    def layer_num_params(self, shape: LayerShape) -> int:
        """Parameters of one block with the given shape (norms and biases included)."""
        d, h = self.hidden_size, self.head_dim
        n = 0
        if shape.has_attention:
            n += d  # input norm
            n += (shape.num_heads + 2 * shape.num_kv_heads) * h * d + shape.num_heads * h * d
            if self.qkv_bias:
                n += (shape.num_heads + 2 * shape.num_kv_heads) * h
            if self.o_bias:
                n += d
        if shape.has_mlp:
            n += d + 3 * d * shape.intermediate_size
            if self.mlp_bias:
                n += 2 * shape.intermediate_size + d
        return n

    def num_prunable_params(self) -> int:
        """Parameters in the decoder blocks: all but embeddings, output head and final norm."""
        return sum(self.layer_num_params(s) for s in self.layer_shapes())

    def num_params(self) -> int:
        """All parameters, counting a tied embedding once."""
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return embed + head + self.hidden_size + self.num_prunable_params()

    # ------------------------------------------------------------ HF mapping
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any] | Any) -> LlamaConfig:
        """Builds a config from a Hugging Face config (a `config.json` dict or a
        `transformers.PretrainedConfig`).

        Raises:
            ValueError: for a model type outside the LLaMA family, an activation
                other than SiLU, or per-layer sliding windows, naming the
                offending field.
        """
        d = dict(hf if isinstance(hf, Mapping) else hf.to_dict())
        model_type = d.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}: ppn runs the LLaMA family "
                f"({', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"unsupported hidden_act {act!r}: the SwiGLU MLP needs 'silu'")
        num_heads = d["num_attention_heads"]
        hidden = d["hidden_size"]
        head_dim = d.get("head_dim") or hidden // num_heads
        attention_bias = bool(d.get("attention_bias", False))
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
            if d.get("use_sliding_window", False):
                raise ValueError("unsupported: Qwen2 with use_sliding_window=True")
            sliding_window = None
        else:
            qkv_bias = o_bias = attention_bias
            sliding_window = d.get("sliding_window") if model_type == "mistral" else None
        rope = d.get("rope_scaling") or d.get("rope_parameters")
        rope_theta = d.get("rope_theta")
        if rope_theta is None and isinstance(rope, Mapping):
            rope_theta = rope.get("rope_theta")
        layers = d.get("ppn_layers")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=_rope_from_hf(rope),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(d.get("mlp_bias", False)) if model_type == "llama" else False,
            sliding_window=sliding_window,
            model_type=model_type,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            layers=None if layers is None else tuple(LayerShape(**s) for s in layers),
        )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dictionary of this config.

        A pruned config adds a `ppn_layers` list with every block's shape; that key
        is ignored by transformers and read back by `from_hf`. A pruned config in
        `canonical` form has none: it is a standard (smaller) dense config.

        Raises:
            ValueError: biases the model type's `config.json` cannot express: a
                llama has one `attention_bias` for q, k, v and o together, and
                Mistral and Qwen2 have no o or MLP biases.
        """
        d: dict[str, Any] = {
            "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                               "qwen2": "Qwen2ForCausalLM"}[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else {
                "rope_type": self.rope_scaling.rope_type,
                **{k: v for k, v in dataclasses.asdict(self.rope_scaling).items() if k != "rope_type"},
            },
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "torch_dtype": "float32",
        }
        if self.model_type == "llama":
            if self.o_bias != self.qkv_bias:
                raise ValueError(f"a llama config.json has one attention_bias for q, k, v and o; this config has "
                                 f"qkv_bias={self.qkv_bias}, o_bias={self.o_bias}")
            d["attention_bias"] = self.qkv_bias
            d["mlp_bias"] = self.mlp_bias
        elif self.o_bias or self.mlp_bias:
            raise ValueError(f"a {self.model_type} config.json has no o or MLP biases; this config has "
                             f"o_bias={self.o_bias}, mlp_bias={self.mlp_bias}")
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            d["use_sliding_window"] = False
        if self.layers is not None:
            d["ppn_layers"] = [dataclasses.asdict(s) | {"q_to_kv": list(s.q_to_kv)} for s in self.layers]
        return d


def _rope_from_hf(rope: Mapping[str, Any] | None) -> RopeScaling | None:
    if not rope:
        return None
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ("linear", "llama3"):
        raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3")
    fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
    return RopeScaling(rope_type=kind, **{k: v for k, v in rope.items() if k in fields})


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies of the rotary embedding, float32 of shape (H/2,), after scaling.

    Computed in float32 in the same order of operations as the Hugging Face
    reference, so positions times frequencies round identically in both.
    """
    h = config.head_dim
    inv = (1.0 / (config.rope_theta ** (np.arange(0, h, 2, dtype=np.float32) / h))).astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv
    if s.rope_type == "linear":
        return (inv / np.float32(s.factor)).astype(np.float32)
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate between.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = (2 * math.pi / inv).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv).astype(np.float32)
    smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / s.factor + smooth * scaled).astype(np.float32)
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
