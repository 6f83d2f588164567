"""Calibration: run a few training windows through the model block by block and
collect, for every linear layer, the statistics of its inputs that the one-shot
pruning methods score with.

The pass is sequential, as in the SparseGPT and Wanda papers: block l's input
statistics are gathered, the caller may prune block l in place, and the output
of the (pruned) block l becomes block l+1's input. Only one block's activations
are held at a time, so memory does not grow with the number of layers:
(windows, T, D) hidden states plus the Gram matrices of one block.

Linear inputs of a block (I = input width):
    "attn_in"  (I = D)    the normed residual read by q, k and v
    "o_in"     (I = N*H)  the query heads' outputs read by o (head-major)
    "mlp_in"   (I = D)    the normed residual read by gate and up
    "down_in"  (I = F)    the SwiGLU channels read by down
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppn.console import progress_bar
from ppn.models.llama import Block, Llama

INPUTS = ("attn_in", "o_in", "mlp_in", "down_in")


@dataclasses.dataclass
class InputStats:
    """Statistics of the inputs X (n, I) of one linear layer over the calibration tokens.

    Attributes:
        count: n, the number of tokens.
        total: (I,) float64 sum of X over tokens.
        gram: (I, I) float64 X^T X (its diagonal is the squared norm ||X_j||^2 of each input feature).
    """

    count: int
    total: np.ndarray
    gram: np.ndarray

    @property
    def sq_norm(self) -> np.ndarray:
        """(I,) ||X_j||_2^2 of each input feature over all tokens."""
        return np.diag(self.gram).copy()

    @property
    def mean(self) -> np.ndarray:
        return self.total / self.count

    @property
    def variance(self) -> np.ndarray:
        """(I,) variance of each input feature over tokens (the FLAP fluctuation)."""
        return np.maximum(self.sq_norm / self.count - self.mean ** 2, 0.0)


@dataclasses.dataclass
class BlockStats:
    """What the calibration pass saw in one block.

    Attributes:
        inputs: InputStats by input name (`INPUTS`; absent for a removed sub-layer).
        block_influence: ShortGPT's BI = 1 - mean over tokens of cos(block input, block output).
    """

    inputs: dict[str, InputStats]
    block_influence: float


def calibration_windows(tokens, num_windows: int = 128, seqlen: int = 512, seed: int = 0) -> np.ndarray:
    """`num_windows` windows of `seqlen` tokens with start positions drawn uniformly
    from the token stream (experiments/BENCHMARK.md: 128 x 512 from the train split, seed 0).

    Returns:
        int32 (num_windows, seqlen).
    """
    tokens = np.asarray(tokens).reshape(-1)
    if num_windows < 1 or seqlen < 2:
        raise ValueError(f"need num_windows >= 1 and seqlen >= 2, got {num_windows} and {seqlen}")
    if tokens.size < seqlen:
        raise ValueError(f"calibration windows of {seqlen} tokens are longer than the data ({tokens.size} tokens)")
    starts = np.random.default_rng(seed).integers(0, tokens.size - seqlen + 1, num_windows)
    return np.stack([tokens[s:s + seqlen] for s in starts]).astype(np.int32)


@jax.jit
def _embed(embed, ids):
    return embed[ids]


@nnx.jit
def _block_pass(block: Block, x: jax.Array):
    """The block's output for x (B, T, D), its linear inputs flattened to (B*T, I),
    and the per-token cosine between its input and output."""
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    inputs = {}
    h = x
    if block.attn is not None:
        a = block.input_norm(h)
        heads, _ = block.attn.head_outputs(a, positions)
        inputs["attn_in"] = a.reshape(-1, a.shape[-1])
        inputs["o_in"] = heads.reshape(a.shape[0] * a.shape[1], -1)
        y = jnp.einsum("BTNH,DNH->BTD", heads, block.attn.o[...])
        h = h + (y if block.attn.o_bias is None else y + block.attn.o_bias[...])
    if block.mlp is not None:
        m = block.post_attention_norm(h)
        hidden = block.mlp.hidden(m)
        inputs["mlp_in"] = m.reshape(-1, m.shape[-1])
        inputs["down_in"] = hidden.reshape(-1, hidden.shape[-1])
        h = h + block.mlp.project(hidden)
    x32, h32 = x.astype(jnp.float32), h.astype(jnp.float32)
    cos = (x32 * h32).sum(-1) / (jnp.linalg.norm(x32, axis=-1) * jnp.linalg.norm(h32, axis=-1) + 1e-12)
    sums = {k: v.astype(jnp.float32).sum(0) for k, v in inputs.items()}
    grams = {k: jnp.einsum("ni,nj->ij", v.astype(jnp.float32), v.astype(jnp.float32)) for k, v in inputs.items()}
    return h, sums, grams, cos.sum()


@nnx.jit
def _block_forward(block: Block, x: jax.Array):
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    return block(x, positions)[0]


def layerwise(model: Llama, windows: np.ndarray, visit: Callable[[int, Block, BlockStats], bool] | None = None,
              batch_size: int = 8, progress: bool = True, desc: str = "calibration") -> list[BlockStats]:
    """Runs `windows` (W, T) through `model` one block at a time.

    For each block l: gathers its `BlockStats` over all windows, calls
    `visit(l, block, stats)`, which may change the block's weights in place and
    returns True if it did, and then feeds the block's output (recomputed when
    the block changed) to block l+1.

    Returns:
        The `BlockStats` of every block, as each was before its visit.
    """
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2:
        raise ValueError(f"windows must be (num_windows, seqlen), got shape {windows.shape}")
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    xs = [_embed(model.embed[...], jnp.asarray(b)) for b in batches]
    n_tokens = windows.size
    stats = []
    for l, block in enumerate(progress_bar(model.blocks, desc=desc, enabled=progress)):
        outs, sums, grams, cos = [], {}, {}, 0.0
        for x in xs:
            h, s, g, c = _block_pass(block, x)
            outs.append(h)
            for k in s:
                sums[k] = sums.get(k, 0.0) + np.asarray(s[k], np.float64)
                grams[k] = grams.get(k, 0.0) + np.asarray(g[k], np.float64)
            cos += float(c)
        block_stats = BlockStats({k: InputStats(n_tokens, sums[k], grams[k]) for k in sums},
                                 1.0 - cos / n_tokens)
        stats.append(block_stats)
        if visit is not None and visit(l, block, block_stats):
            outs = [_block_forward(block, x) for x in xs]
        xs = outs
    return stats
