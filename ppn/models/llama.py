"""A LLaMA-family decoder in Flax NNX: RMSNorm, RoPE, grouped-query attention,
SwiGLU MLP, and a key/value cache for decoding.

Dimension letters used in einsums and shape comments:
    B batch, T query positions, S key positions, D model width, V vocabulary,
    N query heads, K key/value heads, G query heads per KV head, H head width,
    F MLP channels.

Weights are stored in the Hugging Face layout (out, in), reshaped per head where
that is free: q (N, H, D), k and v (K, H, D), o (D, N, H), gate and up (F, D),
down (D, F). Loading therefore never transposes, and pruning a head or a channel
is a gather along one named axis of these arrays.

Every block may have its own shape (`LayerShape`): a pruned model keeps a
different number of heads, KV heads and channels per block, or drops a
sub-layer entirely. Query head n reads KV head `q_to_kv[n]`, which covers MHA
(K = N), GQA and MQA (K = 1) as well as pruned groups of unequal size.

Optional `BlockGates` multiply each head's output, each MLP channel, each
residual branch and each sub-layer's normalised input: the gated forward pass
the pruning method trains through. Gates may carry a leading batch dimension
(one set of gates per sequence, so one batch trains several sizes at once).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppn.models.config import LayerShape, LlamaConfig, rope_frequencies


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every decoded position, for incremental decoding.

    Attributes:
        k, v: one array (B, S_max, K_l, H) per block, None where a block has no
            attention. Slots at or past `length` hold stale or zero entries that
            the causal mask hides, so rolling back is just lowering `length`.
        length: int32 scalar, the number of positions already written.
    """

    k: list[jax.Array | None]
    v: list[jax.Array | None]
    length: jax.Array

    @classmethod
    def init(cls, config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        shapes = [
            (batch, max_len, s.num_kv_heads, config.head_dim) if s.has_attention else None
            for s in config.layer_shapes()
        ]
        zeros = [None if s is None else jnp.zeros(s, dtype) for s in shapes]
        return cls(k=zeros, v=list(zeros), length=jnp.zeros((), jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BlockGates:
    """Multiplicative gates of one block (all optional, 1 where absent).

    Every field may also carry a leading batch dimension B (gates per sequence).

    Attributes:
        attn: scalar (or (B,)) gate of the attention residual branch.
        heads: (N_l,) gate of each query head's output.
        mlp: scalar gate of the MLP residual branch.
        channels: (F_l,) gate of each SwiGLU channel.
        attn_in, mlp_in: (D,) scale of each dimension of the attention's and
            the MLP's normalised input (it folds into the norm's weight).
    """

    attn: jax.Array | None = None
    heads: jax.Array | None = None
    mlp: jax.Array | None = None
    channels: jax.Array | None = None
    attn_in: jax.Array | None = None
    mlp_in: jax.Array | None = None


def _gated(x: jax.Array, gate: jax.Array | None, trailing: int = 0) -> jax.Array:
    """x (B, T, *G, *R) times `gate` of shape G or (B, *G), where R are the last
    `trailing` axes of x, which the gate does not index."""
    if gate is None:
        return x
    core = x.ndim - 2 - trailing
    batched = gate.ndim > core
    shape = (gate.shape[0] if batched else 1, 1, *gate.shape[int(batched):], *([1] * trailing))
    return x * gate.reshape(shape).astype(x.dtype)


def _normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32).astype(dtype))


class RMSNorm(nnx.Module):
    """x / rms(x) * weight, computed in float32 whatever the activation dtype."""

    def __init__(self, dim: int, eps: float, dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates (B, T, heads, H) by angle position * frequency, half-split layout.

    The first and second halves of each head are the two coordinates of each
    rotated pair (Hugging Face's `rotate_half` convention, not interleaved).
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (B, T, H/2)
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary positions and an optional cache."""

    def __init__(self, config: LlamaConfig, shape: LayerShape, *, dtype, rngs: nnx.Rngs):
        n, k, h, d = shape.num_heads, shape.num_kv_heads, config.head_dim, config.hidden_size
        self.q = _normal(rngs, (n, h, d), dtype)
        self.k = _normal(rngs, (k, h, d), dtype)
        self.v = _normal(rngs, (k, h, d), dtype)
        self.o = _normal(rngs, (d, n, h), dtype)
        if config.qkv_bias:
            self.q_bias = nnx.Param(jnp.zeros((n, h), dtype))
            self.k_bias = nnx.Param(jnp.zeros((k, h), dtype))
            self.v_bias = nnx.Param(jnp.zeros((k, h), dtype))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.o_bias = nnx.Param(jnp.zeros((d,), dtype)) if config.o_bias else None
        self.q_to_kv = shape.q_to_kv
        self.num_kv_heads = k
        self.inv_freq = tuple(float(f) for f in rope_frequencies(config))
        self.sliding_window = config.sliding_window

    def _grouped(self) -> bool:
        """True when query head n reads KV head n // G, so no gather is needed."""
        g = len(self.q_to_kv) // self.num_kv_heads
        return self.q_to_kv == tuple(i // g for i in range(len(self.q_to_kv)))

    def __call__(self, x, positions, cache_kv=None, cache_length=None, head_gates=None):
        """Attends x (B, T, D) at `positions` (B, T); returns (B, T, D) and the
        updated (k, v) cache arrays when a cache is given."""
        out, cache_kv = self.head_outputs(x, positions, cache_kv, cache_length)
        out = _gated(out, head_gates, trailing=1)
        y = jnp.einsum("BTNH,DNH->BTD", out, self.o[...])
        if self.o_bias is not None:
            y = y + self.o_bias[...]
        return y, cache_kv

    def head_outputs(self, x, positions, cache_kv=None, cache_length=None):
        """Every query head's attention output (B, T, N, H), the input of the
        output projection, and the updated cache (see `__call__`)."""
        inv_freq = np.asarray(self.inv_freq, np.float32)
        q = jnp.einsum("BTD,NHD->BTNH", x, self.q[...])
        k = jnp.einsum("BTD,KHD->BTKH", x, self.k[...])
        v = jnp.einsum("BTD,KHD->BTKH", x, self.v[...])
        if self.q_bias is not None:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)

        if cache_kv is None:
            key_pos = positions
        else:
            ck, cv = cache_kv
            k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_length, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_length, axis=1)
            cache_kv = (k, v)
            key_pos = jnp.broadcast_to(jnp.arange(k.shape[1]), (x.shape[0], k.shape[1]))

        if not self._grouped():
            # Unequal groups after pruning: give every query head its own copy of its KV head.
            idx = jnp.asarray(self.q_to_kv)
            k, v = k[:, :, idx], v[:, :, idx]
        b, t, n, h = q.shape
        groups = k.shape[2]
        q = q.reshape(b, t, groups, n // groups, h)
        scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32)
        scores = scores / np.sqrt(h).astype(np.float32)
        allowed = key_pos[:, None, :] <= positions[:, :, None]  # (B, T, S)
        if self.sliding_window is not None:
            allowed &= key_pos[:, None, :] > positions[:, :, None] - self.sliding_window
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v).reshape(b, t, n, h), cache_kv


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate x) * up x), optionally scaling each of the F channels.

    With `config.mlp_bias`, gate and up have (F,) biases and down a (D,) bias.
    """

    def __init__(self, config: LlamaConfig, width: int, *, dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        self.gate = _normal(rngs, (width, d), dtype)
        self.up = _normal(rngs, (width, d), dtype)
        self.down = _normal(rngs, (d, width), dtype)
        if config.mlp_bias:
            self.gate_bias = nnx.Param(jnp.zeros((width,), dtype))
            self.up_bias = nnx.Param(jnp.zeros((width,), dtype))
            self.down_bias = nnx.Param(jnp.zeros((d,), dtype))
        else:
            self.gate_bias = self.up_bias = self.down_bias = None

    def __call__(self, x, channel_gates=None):
        return self.project(_gated(self.hidden(x), channel_gates))

    def hidden(self, x):
        """The SwiGLU channels silu(gate x) * up x, (B, T, F): the input of `down`."""
        gate = jnp.einsum("BTD,FD->BTF", x, self.gate[...])
        up = jnp.einsum("BTD,FD->BTF", x, self.up[...])
        if self.gate_bias is not None:
            gate, up = gate + self.gate_bias[...], up + self.up_bias[...]
        return jax.nn.silu(gate) * up

    def project(self, hidden):
        """down applied to the channels (B, T, F): the MLP's output (B, T, D)."""
        y = jnp.einsum("BTF,DF->BTD", hidden, self.down[...])
        return y if self.down_bias is None else y + self.down_bias[...]


class Block(nnx.Module):
    """Pre-norm decoder block; either sub-layer may be absent in a pruned model."""

    def __init__(self, config: LlamaConfig, shape: LayerShape, *, dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        if shape.has_attention:
            self.input_norm = RMSNorm(d, config.rms_norm_eps, dtype)
            self.attn = Attention(config, shape, dtype=dtype, rngs=rngs)
        else:
            self.input_norm = self.attn = None
        if shape.has_mlp:
            self.post_attention_norm = RMSNorm(d, config.rms_norm_eps, dtype)
            self.mlp = MLP(config, shape.intermediate_size, dtype=dtype, rngs=rngs)
        else:
            self.post_attention_norm = self.mlp = None

    def __call__(self, x, positions, cache_kv=None, cache_length=None, gates: BlockGates | None = None):
        gates = gates or BlockGates()
        if self.attn is not None:
            y, cache_kv = self.attn(_gated(self.input_norm(x), gates.attn_in), positions, cache_kv, cache_length,
                                    gates.heads)
            x = x + _gated(y, gates.attn, trailing=1)
        if self.mlp is not None:
            y = self.mlp(_gated(self.post_attention_norm(x), gates.mlp_in), gates.channels)
            x = x + _gated(y, gates.mlp, trailing=1)
        return x, cache_kv


class Llama(nnx.Module):
    """The decoder: embedding, blocks, final norm, tied or untied output head.

    Build with random weights as `Llama(config, rngs=nnx.Rngs(0))`, or load a
    checkpoint with `ppn.load_model`. `dtype` is the dtype of the weights and of
    the activations between layers (float32 by default; bfloat16 halves memory);
    norms, softmax and logits are computed in float32 either way.
    """

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embed = _normal(rngs, (config.vocab_size, config.hidden_size), dtype)
        self.blocks = nnx.List(
            [Block(config, s, dtype=dtype, rngs=rngs) for s in config.layer_shapes()]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = (
            None if config.tie_word_embeddings
            else _normal(rngs, (config.vocab_size, config.hidden_size), dtype)
        )

    @property
    def dtype(self):
        return self.embed.get_value().dtype

    def __call__(self, input_ids: jax.Array, gates: list[BlockGates] | None = None) -> jax.Array:
        """Logits (B, T, V) float32 for input_ids (B, T), every sequence starting at position 0."""
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        return self._forward(input_ids, positions, None, gates)[0]

    def forward_with_cache(self, input_ids: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Logits (B, T, V) for input_ids (B, T) placed after the cache's
        `length` positions, and the cache with these T positions appended."""
        t = input_ids.shape[1]
        positions = jnp.broadcast_to(cache.length + jnp.arange(t), input_ids.shape)
        return self._forward(input_ids, positions, cache, None)

    def _forward(self, input_ids, positions, cache, gates):
        x, cache = self.hidden(input_ids, positions, cache, gates)
        head = self.embed if self.lm_head is None else self.lm_head
        return jnp.einsum("BTD,VD->BTV", x, head[...], preferred_element_type=jnp.float32), cache

    def hidden(self, input_ids: jax.Array, positions: jax.Array, cache: KVCache | None = None,
               gates: list[BlockGates] | None = None) -> tuple[jax.Array, KVCache | None]:
        """The final-norm hidden states (B, T, D) that the output head scores, for
        input_ids (B, T) at `positions` (B, T), and the cache with these T
        positions appended (None without a cache)."""
        x = self.embed[...][input_ids]
        new_k, new_v = [], []
        for i, block in enumerate(self.blocks):
            kv = None if cache is None or cache.k[i] is None else (cache.k[i], cache.v[i])
            x, kv = block(x, positions, kv, None if cache is None else cache.length,
                          None if gates is None else gates[i])
            new_k.append(None if kv is None else kv[0])
            new_v.append(None if kv is None else kv[1])
        if cache is not None:
            cache = KVCache(k=new_k, v=new_v, length=cache.length + input_ids.shape[1])
        return self.norm(x), cache
