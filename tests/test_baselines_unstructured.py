"""One-shot unstructured baselines (magnitude, Wanda, SparseGPT) and the sequential calibration pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ppn.harness.baselines.calibration import calibration_windows, layerwise
from ppn.harness.baselines.unstructured import (METHODS, magnitude_mask, prune_unstructured, sparsegpt_prune, wanda_mask,
                                        wanda_scores)
from ppn.testing import tiny_model

WINDOWS = calibration_windows(np.random.default_rng(0).integers(0, 97, 500), num_windows=4, seqlen=16, seed=0)


@pytest.fixture(scope="module")
def model():
    # Widths 32 (D and N*H) and 48 (F) are multiples of 8, so 2:4 and 4:8 fit every linear.
    return tiny_model(seed=1)


def linear_matrices(model) -> dict[str, np.ndarray]:
    """Every linear of every block as its (out, in) matrix, written out from llama.py's layouts."""
    out = {}
    for l, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        n, h, d = attn.q.shape
        out[f"blocks.{l}.attn.q"] = np.asarray(attn.q[...]).reshape(n * h, d)
        out[f"blocks.{l}.attn.k"] = np.asarray(attn.k[...]).reshape(-1, d)
        out[f"blocks.{l}.attn.v"] = np.asarray(attn.v[...]).reshape(-1, d)
        out[f"blocks.{l}.attn.o"] = np.asarray(attn.o[...]).reshape(d, n * h)
        for name in ("gate", "up", "down"):
            out[f"blocks.{l}.mlp.{name}"] = np.asarray(getattr(mlp, name)[...])
    return out


def params(model) -> list[tuple[str, np.ndarray]]:
    return [(jax.tree_util.keystr(p), np.array(x)) for p, x in
            jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))]


# ------------------------------------------------------------ exact sparsity
@pytest.mark.parametrize("method", METHODS)
def test_unstructured_sparsity_is_exact(model, method):
    s = 0.3
    result = prune_unstructured(model, method, s, windows=WINDOWS, progress=False)
    dense, pruned = linear_matrices(model), linear_matrices(result.model)
    assert set(result.sparsity) == set(pruned) and len(pruned) == 14
    assert result.seconds > 0
    for key, w in pruned.items():
        zeros = w == 0
        assert result.sparsity[key] == zeros.mean()
        if method == "wanda":  # per output row
            assert (zeros.sum(1) == round(s * w.shape[1])).all(), key
        else:  # per matrix
            assert zeros.sum() == round(s * w.size), key
        if method == "sparsegpt":  # the kept weights are updated to compensate
            assert not np.allclose(w[~zeros], dense[key][~zeros]), key
        else:  # the kept weights are untouched
            np.testing.assert_array_equal(w, np.where(zeros, 0, dense[key]), err_msg=key)
        if method == "magnitude":
            assert np.abs(dense[key][zeros]).max() <= np.abs(dense[key][~zeros]).min(), key


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
@pytest.mark.parametrize("method", METHODS)
def test_nm_pattern_holds_in_every_group(model, method, nm):
    n, m = nm
    result = prune_unstructured(model, method, 1 - n / m, windows=WINDOWS, nm=nm, progress=False)
    for key, w in linear_matrices(result.model).items():
        kept_per_group = (w != 0).reshape(w.shape[0], w.shape[1] // m, m).sum(-1)
        assert (kept_per_group == n).all(), key
        assert result.sparsity[key] == 1 - n / m


def test_bfloat16_model_keeps_its_dtype_and_exact_sparsity():
    model = tiny_model(seed=2, dtype=jnp.bfloat16)
    result = prune_unstructured(model, "sparsegpt", 0.5, windows=WINDOWS, progress=False)
    assert [x.dtype for _, x in params(result.model)] == [x.dtype for _, x in params(model)]
    for key, w in linear_matrices(result.model).items():
        assert (w == 0).sum() == w.size // 2, key


# --------------------------------------------------------------------- Wanda
def test_wanda_scores_follow_the_definition(model):
    stats = layerwise(model, WINDOWS, progress=False)
    block = model.blocks[0]
    x = model.embed[...][jnp.asarray(WINDOWS)]  # (W, T, D), block 0's input
    positions = jnp.broadcast_to(jnp.arange(WINDOWS.shape[1]), WINDOWS.shape)
    attn_in = block.input_norm(x)
    hidden = block.mlp.hidden(block.post_attention_norm(x + block.attn(attn_in, positions)[0]))

    def feature_norms(a):  # ||X_j||_2 over all calibration tokens
        return np.linalg.norm(np.asarray(a, np.float64).reshape(-1, a.shape[-1]), axis=0)

    q = linear_matrices(model)["blocks.0.attn.q"]
    down = linear_matrices(model)["blocks.0.mlp.down"]
    expected_q = np.abs(q) * feature_norms(attn_in)[None]
    expected_down = np.abs(down) * feature_norms(hidden)[None]
    np.testing.assert_allclose(wanda_scores(q, stats[0].inputs["attn_in"].sq_norm), expected_q, rtol=1e-4)
    np.testing.assert_allclose(wanda_scores(down, stats[0].inputs["down_in"].sq_norm), expected_down, rtol=1e-4)

    # The pruned model drops exactly the lowest half of these scores in every row.
    pruned = linear_matrices(prune_unstructured(model, "wanda", 0.5, windows=WINDOWS, progress=False).model)
    for key, expected in [("blocks.0.attn.q", expected_q), ("blocks.0.mlp.down", expected_down)]:
        lowest = np.zeros(expected.shape, bool)
        np.put_along_axis(lowest, np.argsort(expected, axis=1)[:, :expected.shape[1] // 2], True, axis=1)
        np.testing.assert_array_equal(pruned[key] == 0, lowest, err_msg=key)


# ----------------------------------------------------------------- SparseGPT
def correlated_problem(seed=0):
    """Random W (64, 128) and inputs X (2048, 128) correlated through 16 shared factors,
    with unequal feature scales (as LLM activations are)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(64, 128))
    factors = rng.normal(size=(2048, 16)) @ rng.normal(size=(16, 128))
    x = (factors + 0.5 * rng.normal(size=(2048, 128))) * rng.uniform(0.2, 3.0, 128)
    return w, x


def obs_reference(w, gram, sparsity, nm, blocksize, damp=0.01):
    """SparseGPT without the Cholesky trick and lazy batching: before removing column j,
    invert the Hessian of the columns not yet processed and apply the OBS update."""
    w = w.copy()
    rows, cols = w.shape
    h = gram + damp * np.mean(np.diag(gram)) * np.eye(cols)
    hinvs = [np.linalg.inv(h[j:, j:]) for j in range(cols)]
    d = np.array([hinv[0, 0] for hinv in hinvs])  # OBS saliency denominator [H_F^-1]_jj
    keep = np.ones(w.shape, bool)
    for j in range(cols):
        if nm is not None and j % nm[1] == 0:
            n, m = nm
            scores = w[:, j:j + m] ** 2 / d[j:j + m]
            np.put_along_axis(keep[:, j:j + m], np.argsort(scores, axis=1)[:, :m - n], False, axis=1)
        if nm is None and j % blocksize == 0:
            j2 = min(j + blocksize, cols)
            k = round(sparsity * rows * j2) - round(sparsity * rows * j)
            flat = np.ones((rows, j2 - j), bool).reshape(-1)
            flat[np.argsort((w[:, j:j2] ** 2 / d[j:j2]).reshape(-1))[:k]] = False
            keep[:, j:j2] = flat.reshape(rows, j2 - j)
        e = w[:, j] * ~keep[:, j] / hinvs[j][0, 0]
        w[:, j:] -= np.outer(e, hinvs[j][0])
    return w * keep, keep


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_matches_plain_obs(nm):
    w, x = correlated_problem(1)
    gram = x.T @ x
    w_new, keep = sparsegpt_prune(w, gram, 0.5, nm, blocksize=32)
    w_ref, keep_ref = obs_reference(w, gram, 0.5, nm, blocksize=32)
    np.testing.assert_array_equal(keep, keep_ref)
    np.testing.assert_allclose(w_new, w_ref, rtol=1e-8, atol=1e-10)
    np.testing.assert_array_equal(w_new != 0, keep)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(nm):
    w, x = correlated_problem(0)
    gram = x.T @ x

    def error(w_hat):  # ||W X^T - Ŵ X^T||_F
        return np.linalg.norm(x @ (w - w_hat).T)

    w_sparsegpt, keep = sparsegpt_prune(w, gram, 0.5, nm)
    assert keep.sum() == w.size // 2
    e_sparsegpt = error(w_sparsegpt)
    e_wanda = error(w * wanda_mask(w, np.diag(gram), 0.5, nm))
    e_magnitude = error(w * magnitude_mask(w, 0.5, nm))
    assert e_sparsegpt < 0.6 * e_wanda and e_sparsegpt < 0.6 * e_magnitude, (e_sparsegpt, e_wanda, e_magnitude)


def test_sparsegpt_zeroes_dead_inputs():
    w, x = correlated_problem(2)
    x[:, [3, 77]] = 0.0
    w_new, keep = sparsegpt_prune(w, x.T @ x, 0.25)
    assert np.isfinite(w_new).all()
    assert (w_new[:, [3, 77]] == 0).all()
    assert (~keep).sum() == round(0.25 * w.size)


# -------------------------------------------------------------- whole model
@pytest.mark.parametrize("method", METHODS)
def test_caller_model_is_untouched_and_sparsity_zero_is_the_identity(model, method):
    before = params(model)
    result = prune_unstructured(model, method, 0.5, windows=WINDOWS, progress=False)
    after = params(model)
    assert [k for k, _ in after] == [k for k, _ in before]
    for (key, a), (_, b) in zip(after, before):
        np.testing.assert_array_equal(a, b, err_msg=key)

    logits = np.asarray(result.model(WINDOWS[:2]))
    assert np.isfinite(logits).all()
    assert not np.allclose(logits, np.asarray(model(WINDOWS[:2])))

    identity = prune_unstructured(model, method, 0.0, windows=WINDOWS, progress=False)
    for (key, a), (_, b) in zip(params(identity.model), before):
        np.testing.assert_array_equal(a, b, err_msg=key)
    assert set(identity.sparsity.values()) == {0.0}


# -------------------------------------------------------------- calibration
def test_layerwise_feeds_the_pruned_output_to_the_next_block(model):
    copy = nnx.clone(model)

    def silence_block_0(l, block, stats):
        if l != 0:
            return False
        block.attn.o.set_value(jnp.zeros_like(block.attn.o[...]))
        block.mlp.down.set_value(jnp.zeros_like(block.mlp.down[...]))
        return True

    stats = layerwise(copy, WINDOWS, silence_block_0, progress=False)
    # Block 0 now adds nothing, so block 1 reads the embedding itself.
    a = np.asarray(copy.blocks[1].input_norm(copy.embed[...][jnp.asarray(WINDOWS)]), np.float64).reshape(-1, 32)
    seen = stats[1].inputs["attn_in"]
    assert seen.count == WINDOWS.size
    np.testing.assert_allclose(seen.total, a.sum(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(seen.gram, a.T @ a, rtol=1e-4, atol=1e-3)

    dense = layerwise(model, WINDOWS, progress=False)
    np.testing.assert_allclose(stats[0].inputs["down_in"].gram, dense[0].inputs["down_in"].gram, rtol=1e-6)
    assert not np.allclose(dense[1].inputs["attn_in"].gram, seen.gram, rtol=1e-2)


def test_calibration_windows():
    tokens = np.arange(1000)
    windows = calibration_windows(tokens, num_windows=8, seqlen=32, seed=3)
    assert windows.shape == (8, 32) and windows.dtype == np.int32
    assert (np.diff(windows, axis=1) == 1).all() and windows.max() < 1000  # contiguous slices of the stream
    np.testing.assert_array_equal(windows, calibration_windows(tokens, num_windows=8, seqlen=32, seed=3))
    assert not np.array_equal(windows, calibration_windows(tokens, num_windows=8, seqlen=32, seed=4))
    np.testing.assert_array_equal(calibration_windows(tokens[:32], 2, 32), [tokens[:32]] * 2)
    with pytest.raises(ValueError, match="longer than the data"):
        calibration_windows(tokens[:31], 2, 32)


# --------------------------------------------------------------- bad input
def test_bad_arguments_raise_clear_errors(model):
    with pytest.raises(ValueError, match="unknown method 'obs'; expected one of magnitude, wanda, sparsegpt"):
        prune_unstructured(model, "obs", 0.5)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=rf"sparsity must be in \[0, 1\), got {bad}"):
            prune_unstructured(model, "magnitude", bad)
    with pytest.raises(ValueError, match="0 < N < M, got 4:4"):
        prune_unstructured(model, "magnitude", 0.0, nm=(4, 4))
    with pytest.raises(ValueError, match="0 < N < M, got 0:4"):
        wanda_mask(np.ones((4, 8)), np.ones(8), 0.5, nm=(0, 4))
    with pytest.raises(ValueError, match="N:M 2:4 is sparsity 0.5, but sparsity 0.3 was asked for"):
        prune_unstructured(model, "magnitude", 0.3, nm=(2, 4))
    with pytest.raises(ValueError, match="wanda needs calibration windows"):
        prune_unstructured(model, "wanda", 0.5)
    with pytest.raises(ValueError, match="blocks.0.mlp.down has 50 inputs"):
        prune_unstructured(tiny_model(intermediate_size=50), "magnitude", 0.5, nm=(2, 4))
    with pytest.raises(ValueError, match="multiple of M; the matrix has 6 inputs"):
        sparsegpt_prune(np.ones((4, 6)), np.eye(6), 0.5, nm=(2, 4))
