"""Perplexity exactly as experiments/BENCHMARK.md defines it.

Non-overlapping windows of `seqlen` tokens (the short tail dropped); each window
predicts its tokens 2..seqlen from their prefixes; perplexity is exp of the mean
negative log-likelihood over all those predictions, every window weighted equally.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from ppn import sharding
from ppn.console import progress_bar
from ppn.data import eval_batches, eval_windows


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """The outcome of `perplexity`.

    Attributes:
        perplexity: exp(nll).
        nll: mean negative log-likelihood per predicted token, in nats.
        num_windows: windows evaluated.
        num_tokens: tokens predicted, num_windows * (seqlen - 1).
        window_nll: (num_windows,) mean NLL per predicted token of each window, in
            window order: what a bootstrap over windows resamples.
    """

    perplexity: float
    nll: float
    num_windows: int
    num_tokens: int
    window_nll: np.ndarray = dataclasses.field(default=None, repr=False, compare=False)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _window_nll(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, gates=None,
                gathered: NamedSharding | None = None) -> jax.Array:
    """Summed next-token NLL of each window.

    A pure function of (graphdef, state) rather than an `nnx.jit` method: it compiles
    once per model structure and batch shape, and each call skips nnx.jit's graph
    traversal.

    Args:
        graphdef: the model's static structure, from `nnx.split`.
        state: the model's arrays, from `nnx.split`.
        ids: int32 windows, shape (B, T).
        gates: optional per-block gates passed to the model (a gated `Llama`).
        gathered: on a mesh, the replicated sharding the weights are gathered to
            where they are read (each device runs its own rows, as in FSDP).

    Returns:
        float32 NLL summed over positions 2..T of each window, shape (B,).
    """
    if gathered is not None:
        state = jax.lax.with_sharding_constraint(state, gathered)
    model = nnx.merge(graphdef, state)
    logits = (model(ids) if gates is None else model(ids, gates=gates))[:, :-1].astype(jnp.float32)  # (B, T-1, V); bfloat16 models too
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])  # (B, T-1)
    return nll.sum(axis=1)


def perplexity(model: nnx.Module, tokens, seqlen: int = 512, max_windows: int | None = None,
               batch_size: int = 4, progress: bool = True, gates=None, mesh: Mesh | None = None) -> PerplexityResult:
    """Measures a language model's perplexity on a token stream (experiments/BENCHMARK.md).

    Every batch has shape (batch_size, seqlen), the last one padded and its padding
    left out of the sums, so the jitted forward pass compiles once. Per-window sums
    are added up on the host in float64.

    With a `mesh`, every batch is split over its data x fsdp devices (batch_size
    is rounded up to a multiple of that; padding rows do not count, so the
    result is the same); weights already laid out on the mesh are used as they
    are, others are FSDP-sharded over it as in `ppn.fit`.

    Args:
        model: an NNX module called as `model(ids)`, ids int32 (B, T) -> logits (B, T, V)
            in any float dtype (the log-softmax is taken in float32).
        tokens: token ids, shape (N,) (a NumPy or JAX array or a list), cut into
            non-overlapping windows; or windows already cut, shape (W, seqlen).
        seqlen: tokens per window (experiments/BENCHMARK.md: 512).
        max_windows: evaluate only the first this many windows ("quick" = 64); None
            evaluates all ("full").
        batch_size: windows per forward pass.
        progress: show a progress bar.
        gates: per-block `BlockGates` for a gated `Llama` (e.g. `Plan.soft_gates`).
        mesh: a ("data", "fsdp") mesh (`ppn.sharding.make_mesh`) to run on; None: the default device.

    Returns:
        The perplexity, the mean NLL and the counts it was measured over.

    Raises:
        ValueError: if the tokens make no window of `seqlen`, or windows have another length.
    """
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2 (one prediction per window), got {seqlen}")
    tokens = np.asarray(tokens)
    if tokens.ndim == 2:
        if tokens.shape[1] != seqlen:
            raise ValueError(f"windows of {tokens.shape[1]} tokens given with seqlen={seqlen}")
        windows = eval_windows(tokens.reshape(-1), seqlen, max_windows)
    else:
        windows = eval_windows(tokens, seqlen, max_windows)

    graphdef, state = nnx.split(model)
    put, gathered = jnp.asarray, None
    if mesh is not None:
        sharding.check_mesh(mesh)
        batch_size = -(-batch_size // sharding.batch_shards(mesh)) * sharding.batch_shards(mesh)
        state = sharding.on_mesh(state, mesh)
        gates = None if gates is None else sharding.place(gates, sharding.replicated(mesh))
        put, gathered = functools.partial(sharding.global_batch, mesh=mesh), sharding.replicated(mesh)
    sums = []  # float64 on the host: exact enough for any number of windows
    pending = None
    with progress_bar(total=len(windows), desc="perplexity", unit="window",
                      enabled=progress and sharding.is_main_process()) as bar:

        def collect(result, valid):
            sums.extend(sharding.to_host(result).astype(np.float64)[valid])
            bar.update(int(valid.sum()))
            bar.set_postfix(ppl=f"{math.exp(sum(sums) / (len(sums) * (seqlen - 1))):.3f}")

        for ids, valid in eval_batches(windows, batch_size):
            result = _window_nll(graphdef, state, put(ids), gates, gathered)
            if pending is not None:  # read the previous batch while this one runs
                collect(*pending)
            pending = (result, valid)
        collect(*pending)

    num_tokens = len(windows) * (seqlen - 1)
    nll = float(np.sum(sums)) / num_tokens
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, num_windows=len(windows), num_tokens=num_tokens,
                            window_nll=np.asarray(sums) / (seqlen - 1))
