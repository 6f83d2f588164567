"""One-shot unstructured pruning baselines: magnitude, Wanda and SparseGPT, each
written from its paper, unstructured or N:M.

Every linear layer of every block is pruned, each viewed as an (out, in) matrix W
whose rows are output features and whose columns are input features:

    q (N, H, D) -> (N*H, D)    k, v (K, H, D) -> (K*H, D)    input "attn_in"
    o (D, N, H) -> (D, N*H)                                   input "o_in" (head-major, as o's columns)
    gate, up (F, D)                                           input "mlp_in"
    down (D, F)                                               input "down_in"

Biases, norms, the embedding and the output head are not pruned.

Granularity of the "sparsity" fraction s (round() is Python's, ties to even):
    magnitude  per layer: exactly round(s * out * in) zeros in each matrix.
    Wanda      per output row: exactly round(s * in) zeros in each row (the paper's
               per-output comparison group).
    SparseGPT  per layer: each block of B columns gets round(s*out*i2) - round(s*out*i1)
               zeros (i1, i2 the block's column range) chosen across all rows at once,
               as the paper's adaptive mask selection does; the counts add up to
               exactly round(s * out * in) per matrix, rows may differ.
    N:M        N kept in every group of M consecutive inputs of every row, for all three;
               the sparsity passed must then be 1 - N/M.

Wanda and SparseGPT calibrate sequentially (`ppn.harness.baselines.calibration.layerwise`):
block l is pruned from the statistics of its inputs, and its pruned output is the
input of block l+1.

Masks returned by the per-matrix functions are "keep" masks: True where a weight stays.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np
import scipy.linalg
from flax import nnx

from ppn.harness.baselines.calibration import BlockStats, layerwise
from ppn.models.llama import Block, Llama

METHODS = ("magnitude", "wanda", "sparsegpt")

# (sub-layer, weight, name of its input in BlockStats) for every prunable linear of a block.
LINEARS = (("attn", "q", "attn_in"), ("attn", "k", "attn_in"), ("attn", "v", "attn_in"), ("attn", "o", "o_in"),
           ("mlp", "gate", "mlp_in"), ("mlp", "up", "mlp_in"), ("mlp", "down", "down_in"))


@dataclasses.dataclass
class UnstructuredResult:
    """A one-shot unstructured pruning run.

    Attributes:
        model: a new model with the shapes of the original; pruned weights are exact zeros.
        seconds: wall time of the pruning, calibration included.
        sparsity: achieved fraction of zeros of every pruned linear, keyed like "blocks.3.mlp.down".
    """

    model: Llama
    seconds: float
    sparsity: dict[str, float]


# ----------------------------------------------------------------- validation
def _check_sparsity(sparsity: float, nm: tuple[int, int] | None) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if nm is None:
        return
    n, m = nm
    if not 0 < n < m:
        raise ValueError(f"N:M sparsity needs 0 < N < M, got {n}:{m}")
    if not np.isclose(sparsity, 1.0 - n / m, rtol=0.0, atol=1e-9):
        raise ValueError(f"N:M {n}:{m} is sparsity {1.0 - n / m}, but sparsity {sparsity} was asked for")


def _check_width(in_features: int, nm: tuple[int, int] | None, what: str = "the matrix") -> None:
    if nm is not None and in_features % nm[1]:
        raise ValueError(f"N:M {nm[0]}:{nm[1]} needs the input width to be a multiple of M; "
                         f"{what} has {in_features} inputs")


def _as_2d(w) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"expected an (out, in) matrix, got shape {w.shape}")
    return w


# --------------------------------------------------------------- mask helpers
def _layer_keep(scores: np.ndarray, k: int) -> np.ndarray:
    """Keep mask that drops exactly the k lowest scores of the whole matrix."""
    keep = np.ones(scores.size, bool)
    if k:
        keep[np.argpartition(scores.reshape(-1), k - 1)[:k]] = False
    return keep.reshape(scores.shape)


def _row_keep(scores: np.ndarray, k: int) -> np.ndarray:
    """Keep mask that drops exactly the k lowest scores of every row."""
    keep = np.ones(scores.shape, bool)
    if k:
        np.put_along_axis(keep, np.argpartition(scores, k - 1, axis=1)[:, :k], False, axis=1)
    return keep


def _nm_keep(scores: np.ndarray, nm: tuple[int, int]) -> np.ndarray:
    """Keep mask with the N highest scores of every group of M consecutive columns of every row."""
    n, m = nm
    rows, cols = scores.shape
    return _row_keep(scores.reshape(rows * cols // m, m), m - n).reshape(rows, cols)


# ------------------------------------------------------------------ magnitude
def magnitude_mask(w, sparsity: float, nm: tuple[int, int] | None = None) -> np.ndarray:
    """Keep mask of magnitude pruning: the smallest |W| of the whole matrix go.

    Args:
        w: (out, in) weights.
        sparsity: fraction of weights to zero, in [0, 1); 1 - N/M with `nm`.
        nm: (N, M) to keep the N largest |W| of every M consecutive inputs of each row instead.

    Returns:
        bool (out, in), False on exactly round(sparsity * out * in) weights (or M - N per group).
    """
    w = _as_2d(w)
    _check_sparsity(sparsity, nm)
    _check_width(w.shape[1], nm)
    scores = np.abs(w.astype(np.float64))
    return _nm_keep(scores, nm) if nm else _layer_keep(scores, round(sparsity * w.size))


# ---------------------------------------------------------------------- Wanda
def wanda_scores(w, sq_norm) -> np.ndarray:
    """Wanda's importance S_ij = |W_ij| * ||X_j||_2.

    Args:
        w: (out, in) weights.
        sq_norm: (in,) ||X_j||_2^2 of each input feature over all calibration tokens
            (`InputStats.sq_norm`).

    Returns:
        float64 (out, in).
    """
    w = _as_2d(w)
    sq_norm = np.asarray(sq_norm, np.float64)
    if sq_norm.shape != (w.shape[1],):
        raise ValueError(f"sq_norm must have shape ({w.shape[1]},), got {sq_norm.shape}")
    return np.abs(w.astype(np.float64)) * np.sqrt(sq_norm)[None, :]


def wanda_mask(w, sq_norm, sparsity: float, nm: tuple[int, int] | None = None) -> np.ndarray:
    """Keep mask of Wanda: scores are compared within each output row (per-output groups).

    Args:
        w: (out, in) weights.
        sq_norm: (in,) ||X_j||_2^2 of each input feature.
        sparsity: fraction of each row to zero, in [0, 1); 1 - N/M with `nm`.
        nm: (N, M) to keep the N highest scores of every M consecutive inputs of each row instead.

    Returns:
        bool (out, in), False on exactly round(sparsity * in) weights of every row (or M - N per group).
    """
    w = _as_2d(w)
    _check_sparsity(sparsity, nm)
    _check_width(w.shape[1], nm)
    scores = wanda_scores(w, sq_norm)
    return _nm_keep(scores, nm) if nm else _row_keep(scores, round(sparsity * w.shape[1]))


# ------------------------------------------------------------------ SparseGPT
def _upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """U upper triangular with H^-1 = U^T U.

    Row j of U, divided by U_jj, is the OBS update that spreads the error of
    removing column j over columns j+1.. once columns 0..j-1 are already fixed,
    so one factorisation replaces a sequence of shrinking inverse Hessians.
    """
    hinv = scipy.linalg.cho_solve(scipy.linalg.cho_factor(h, lower=True), np.eye(len(h)))
    return np.linalg.cholesky((hinv + hinv.T) / 2, upper=True)


def sparsegpt_prune(w, gram, sparsity: float, nm: tuple[int, int] | None = None, blocksize: int = 128,
                    damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """SparseGPT (Frantar & Alistarh 2023, Algorithm 1): prunes W and updates the
    remaining weights so that W X^T changes as little as possible.

    Columns are swept left to right. Removing weight W_ij costs
    W_ij^2 / [U]_jj^2 (U the upper Cholesky factor of H^-1, H = X^T X + damping),
    and its error is compensated on the not yet processed columns of row i through
    row j of U. Updates inside a block of `blocksize` columns are applied column by
    column, the rest lazily once per block. The mask is chosen adaptively when a
    block is reached, from the weights as updated so far: the lowest costs over the
    whole block (all rows together) for unstructured sparsity, the M - N lowest of
    every row's group of M columns for N:M.

    Inputs that never fire (zero diagonal of H) get H_jj = 1 and their weights set
    to 0, as in the paper's implementation.

    Args:
        w: (out, in) weights.
        gram: (in, in) X^T X of the layer's calibration inputs (`InputStats.gram`).
        sparsity: fraction of weights to zero, in [0, 1); 1 - N/M with `nm`.
        nm: (N, M) for N:M sparsity along the inputs.
        blocksize: columns per lazy-update block (a multiple of M with `nm`).
        damp: added to the diagonal of H, as a fraction of its mean.

    Returns:
        (w_new, keep): float64 (out, in) updated weights, exact zeros where pruned,
        and the bool (out, in) keep mask. Unstructured, exactly round(sparsity * out * in)
        weights are pruned per matrix (not per row).
    """
    w = _as_2d(w).astype(np.float64)  # a copy, updated in place below
    rows, cols = w.shape
    _check_sparsity(sparsity, nm)
    _check_width(cols, nm)
    if nm is not None and blocksize % nm[1]:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M = {nm[1]}")
    h = np.array(gram, np.float64)
    if h.shape != (cols, cols):
        raise ValueError(f"gram must have shape ({cols}, {cols}), got {h.shape}")

    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(cols)] += damp * np.mean(np.diag(h))
    u = _upper_cholesky_of_inverse(h)

    keep = np.ones((rows, cols), bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, u1, keep1 = w[:, i1:i2], u[i1:i2, i1:i2], keep[:, i1:i2]  # views
        d1 = np.diag(u1)
        if nm is None:
            # Cumulative rounding: the blocks' counts add up to round(sparsity * rows * cols).
            k = round(sparsity * rows * i2) - round(sparsity * rows * i1)
            keep1[...] = _layer_keep(w1 ** 2 / d1 ** 2, k)
        err = np.zeros((rows, i2 - i1))
        for j in range(i2 - i1):
            if nm is not None and j % nm[1] == 0:
                g = slice(j, j + nm[1])
                keep1[:, g] = _nm_keep(w1[:, g] ** 2 / d1[g] ** 2, nm)
            e = w1[:, j] * ~keep1[:, j] / d1[j]
            # Column j itself becomes w - e * U_jj: zero where pruned, unchanged where kept.
            w1[:, j:] -= np.outer(e, u1[j, j:])
            err[:, j] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return w * keep, keep


# ------------------------------------------------------------------ the model
def _linears(block: Block) -> Iterator[tuple[str, nnx.Param, str]]:
    """(name like "mlp.down", weight variable, input name) of every linear of the block."""
    for sub, name, inp in LINEARS:
        module = getattr(block, sub)
        if module is not None:
            yield f"{sub}.{name}", getattr(module, name), inp


def _matrix(name: str, w: np.ndarray) -> np.ndarray:
    """The (out, in) view of a weight: o's out axis is first, q/k/v's in axis is last."""
    return w.reshape(w.shape[0], -1) if name == "attn.o" else w.reshape(-1, w.shape[-1])


def _prune_block(block: Block, stats: BlockStats | None, method: str, sparsity: float,
                 nm: tuple[int, int] | None) -> None:
    """Prunes every linear of `block` in place."""
    for name, param, inp in _linears(block):
        value = param.get_value()
        w = _matrix(name, np.asarray(value, np.float64))
        if method == "magnitude":
            new = w * magnitude_mask(w, sparsity, nm)
        elif method == "wanda":
            new = w * wanda_mask(w, stats.inputs[inp].sq_norm, sparsity, nm)
        else:
            new, _ = sparsegpt_prune(w, stats.inputs[inp].gram, sparsity, nm)
        param.set_value(jnp.asarray(new.reshape(value.shape), value.dtype))


def prune_unstructured(model: Llama, method: str, sparsity: float, *, windows: np.ndarray | None = None,
                       nm: tuple[int, int] | None = None, batch_size: int = 8,
                       progress: bool = True) -> UnstructuredResult:
    """Prunes every linear layer of every block of a copy of `model` with `method`.

    Args:
        model: the dense model; left unchanged.
        method: one of `METHODS`.
        sparsity: fraction of zeros per linear, in [0, 1) (granularity: see the module
            docstring); with `nm` it must equal 1 - N/M.
        windows: int (W, T) calibration token windows (`calibration_windows`), required
            by wanda and sparsegpt, unused by magnitude.
        nm: (N, M) for N:M sparsity (N kept in every M consecutive inputs of every row).
        batch_size: windows per forward pass of the calibration.
        progress: show the calibration's progress bar.

    Returns:
        The pruned copy, the wall time and the achieved sparsity of every linear.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    _check_sparsity(sparsity, nm)
    if method != "magnitude" and windows is None:
        raise ValueError(f"{method} needs calibration windows (windows=calibration_windows(...))")
    for l, block in enumerate(model.blocks):
        for name, param, _ in _linears(block):
            _check_width(_matrix(name, param.get_value()).shape[1], nm, f"blocks.{l}.{name}")

    start = time.perf_counter()
    pruned = nnx.clone(model)
    if method == "magnitude":
        for block in pruned.blocks:
            _prune_block(block, None, method, sparsity, nm)
    else:
        def visit(l: int, block: Block, stats: BlockStats) -> bool:
            _prune_block(block, stats, method, sparsity, nm)
            return True

        layerwise(pruned, windows, visit, batch_size=batch_size, progress=progress, desc=method)
    seconds = time.perf_counter() - start

    achieved = {f"blocks.{l}.{name}": float(np.mean(np.asarray(param.get_value()) == 0))
                for l, block in enumerate(pruned.blocks) for name, param, _ in _linears(block)}
    return UnstructuredResult(pruned, seconds, achieved)
