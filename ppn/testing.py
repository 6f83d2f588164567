"""Tiny models for unit tests, notebook smoke runs and `--smoke` experiments, and
the kill of a run that tests of resuming need.

They run the same code paths as the real model in milliseconds.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ppn.models.config import LlamaConfig
from ppn.models.llama import Llama


def tiny_config(**overrides) -> LlamaConfig:
    """A 2-block GQA config (4 query heads, 2 KV heads, width 32, 48 channels, vocab 97)."""
    fields = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, rope_theta=10000.0, max_position_embeddings=256)
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_tokens(count: int = 4000, seed: int = 0, vocab_size: int = 97) -> np.ndarray:
    """`count` random token ids of the tiny vocabulary: a corpus for tiny fits, (count,) int64."""
    return np.random.default_rng(seed).integers(0, vocab_size, count)


def smoke_fit_config(**overrides):
    """A `FitConfig` for the tiny model that fits in seconds: 6 steps of 2 windows of
    16 tokens, groups of 16 channels, a checkpoint every 3 steps. `overrides` are
    FitConfig fields."""
    from ppn.fit import FitConfig

    fields = dict(steps=6, batch_size=2, seqlen=16, group_width=16, checkpoint_every=3, checkpoint_min_seconds=0)
    return FitConfig(**(fields | overrides))


def tiny_model(seed: int = 0, dtype=jnp.float32, **overrides) -> Llama:
    """A randomly initialised `Llama` of `tiny_config(**overrides)`.

    Its biases, if the config has any, are random too (`Llama` starts them at
    zero), so that a bias lost or misplaced by a test's subject shows.
    """
    model = Llama(tiny_config(**overrides), dtype=dtype, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param) and str(path[-1]).endswith("_bias"):
            node.set_value(jnp.asarray(rng.normal(0.0, 0.1, node.shape), dtype))
    return model


def peaked_model_and_text(seed: int = 7, sequences: int = 64, length: int = 64) -> tuple[Llama, np.ndarray]:
    """A tiny model whose weights (matrices) are scaled by 12, so its predictions are
    peaked, and `sequences` x `length` tokens sampled from it, flattened: a tiny
    corpus with structure a fit can find (random tokens have none)."""
    from ppn.generate import generate

    graphdef, state = nnx.split(tiny_model(seed=seed))
    model = nnx.merge(graphdef, jax.tree.map(lambda x: x * 12.0 if x.ndim > 1 else x, state))
    tokens = generate(model, np.zeros((sequences, 1), np.int32), length - 1, temperature=1.0, seed=0)
    return model, np.asarray(tokens).reshape(-1)


def random_plan(config: LlamaConfig, seed: int = 0, group_width: int = 16, prior: str = "hierarchical",
                rescale: bool = False):
    """A `Plan` for `config` with random guide locations (scale 0.1), without fitting:
    its keep-sets vary from block to block like a fitted plan's. With `rescale`,
    random rescaling exponents (sd 0.3) too."""
    from ppn.plan import Plan
    from ppn.posterior import prior_shapes
    from ppn.units import RESCALE_KINDS, Units

    units = Units(config, group_width)
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in prior_shapes(units, prior).items():
        params[f"{name}_auto_loc"] = rng.normal(0.0, 1.0, shape)
        params[f"{name}_auto_scale"] = np.full(shape, 0.1)
    if rescale:
        params |= {f"rescale_{k}": rng.normal(0.0, 0.3, units.shapes()[k]) for k in RESCALE_KINDS}
    return Plan.from_guide_params(units, prior, params)


def run_killed_at(step: int, train: Callable[[], object], seed: int | None = None) -> None:
    """Runs `train()` with `ppn.data.train_batches` raising KeyboardInterrupt where it
    would yield the batch of `step` (of the stream of `seed` only, if given): a run
    killed mid-way, as tests of resuming need. Raises AssertionError if `train()`
    finishes."""
    from ppn import data

    original = data.train_batches

    def dying(*args, **kwargs):
        call = inspect.signature(original).bind(*args, **kwargs)
        call.apply_defaults()
        start_step = call.arguments["start_step"]
        for i, batch in enumerate(original(*call.args, **call.kwargs)):
            if start_step + i == step and seed in (None, call.arguments["seed"]):
                raise KeyboardInterrupt
            yield batch

    data.train_batches = dying
    try:
        train()
    except KeyboardInterrupt:
        return
    finally:
        data.train_batches = original
    raise AssertionError(f"the run finished without drawing the batch of step {step}")


def assert_same_weights(a: Llama, b: Llama, rtol: float = 1e-6, atol: float = 1e-7) -> None:
    """Asserts that two models' weights (`nnx.Param`s) agree, leaf by leaf."""
    for x, y in zip(jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b, nnx.Param)), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)
