"""The harness's plain fine-tuner (`ppn.harness.finetune`): it learns, leaves its input alone, keeps a
sparse model's zeros when asked, and resumes a killed run to the unbroken result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ppn.fit import FitConfig
from ppn.svi import weights_optimizer
from ppn.harness.finetune import finetune
from ppn.runs import read_metrics
from ppn.testing import assert_same_weights, run_killed_at, smoke_fit_config, tiny_model, tiny_tokens

TOKENS = tiny_tokens()


def test_finetune_learns_a_repeating_text_and_leaves_the_input_model_alone():
    model = tiny_model()
    before = [np.asarray(x).copy() for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    tokens = np.tile(np.arange(10), 400)
    result = finetune(model, tokens, FitConfig(steps=40, batch_size=4, seqlen=16, lr_weights=3e-3), progress=False)
    assert np.mean(result.nll[-5:]) < 0.5 * np.mean(result.nll[:5])
    for a, b in zip(before, jax.tree.leaves(nnx.state(model, nnx.Param))):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_masked_finetune_keeps_the_zeros_of_a_sparse_model():
    model = tiny_model()
    model.blocks[0].mlp.down[...] = model.blocks[0].mlp.down[...].at[:, ::2].set(0.0)
    tokens = np.tile(np.arange(10), 400)
    cfg = FitConfig(steps=5, batch_size=2, seqlen=16, lr_weights=3e-3)
    tuned = finetune(model, tokens, cfg, progress=False, keep_zeros=True).model
    down, before = np.asarray(tuned.blocks[0].mlp.down[...]), np.asarray(model.blocks[0].mlp.down[...])
    assert (down[:, ::2] == 0).all() and (np.abs(down[:, 1::2] - before[:, 1::2]) > 0).mean() > 0.9
    free = np.asarray(finetune(model, tokens, cfg, progress=False).model.blocks[0].mlp.down[...])
    assert (free[:, ::2] != 0).mean() > 0.9  # without the mask the zeros move


def test_finetune_killed_and_resumed_equals_an_unbroken_run(tmp_path):
    cfg = FitConfig(steps=7, batch_size=2, seqlen=16, lr_weights=3e-3, checkpoint_every=3, checkpoint_min_seconds=0)
    unbroken = finetune(tiny_model(), TOKENS, cfg, progress=False)
    run_killed_at(5, lambda: finetune(tiny_model(), TOKENS, cfg, progress=False, run_dir=tmp_path))
    assert read_metrics(tmp_path)[-1]["step"] == 2
    resumed = finetune(tiny_model(), TOKENS, cfg, progress=False, run_dir=tmp_path)
    np.testing.assert_allclose(resumed.nll, unbroken.nll, rtol=1e-6)
    assert_same_weights(unbroken.model, resumed.model)
    with pytest.raises(ValueError, match="another configuration"):
        finetune(tiny_model(), TOKENS, FitConfig(**{**cfg.__dict__, "steps": 8}), progress=False, run_dir=tmp_path)


def test_the_weights_schedule_warms_up_then_decays_and_weight_decay_shrinks_idle_weights():
    cfg = smoke_fit_config(steps=10, lr_weights=0.1, warmup_steps=4, lr_decay="cosine")
    tx, params = weights_optimizer(cfg), jnp.ones(3)
    state, steps = tx.init(params), []
    for _ in range(10):
        update, state = tx.update(jnp.full(3, 1e-2), state, params)
        steps.append(float(jnp.abs(update).max()))
    assert steps[0] == 0.0 and steps[4] == pytest.approx(0.1, rel=1e-3)  # Adam's step is the learning rate
    assert steps[4] > steps[7] > steps[9] >= 0.01 - 1e-6  # cosine down to a tenth
    decayed = weights_optimizer(smoke_fit_config(lr_weights=0.1, weight_decay=0.5))
    update, _ = decayed.update(jnp.zeros(3), decayed.init(params), params)
    np.testing.assert_allclose(update, -0.1 * 0.5 * params, rtol=1e-6)  # AdamW: lr * decay * weight
    with pytest.raises(ValueError, match="lr_decay"):
        smoke_fit_config(lr_decay="linear")


def test_a_bfloat16_model_tunes_float32_masters_and_comes_back_in_bfloat16():
    """Steps of 1e-4 are below bfloat16's spacing at weights of 0.06 and up; on float32 masters they add up."""
    model = tiny_model(dtype=jnp.bfloat16)
    embed = model.embed[...]
    model.embed[...] = jnp.where(jnp.abs(embed) > 0, jnp.sign(embed) * 0.1, embed).astype(jnp.bfloat16)
    cfg = FitConfig(steps=8, batch_size=2, seqlen=16, lr_weights=1e-4)
    tuned = finetune(model, TOKENS, cfg, progress=False).model
    assert tuned.embed[...].dtype == jnp.bfloat16
    moved = np.asarray(tuned.embed[...] != model.embed[...])
    assert moved.mean() > 0.25  # (updates in bfloat16 itself move none of them)
