"""Plain fine-tuning of a model's weights: the equal-budget fairness baseline.

A push puppet fit also adapts the weights to the training text, so its pruned
models are compared with the dense model (or a baseline's pruned model)
fine-tuned on exactly the same batches, steps and optimiser.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from ppn import data
from ppn.bayes import token_nll
from ppn.fit import FitConfig
from ppn.models.llama import Llama


@dataclasses.dataclass
class FinetuneResult:
    """The fine-tuned model, its per-step mean NLL per token, and the wall time."""

    model: Llama
    nll: list[float]
    seconds: float


def finetune(model: Llama, tokens, config: FitConfig = FitConfig(), progress: bool = True) -> FinetuneResult:
    """Fine-tunes every weight of `model` by next-token NLL with the fit's budget.

    Uses `config`'s steps, batch_size, seqlen, seed and lr_weights, the same
    gradient clipping and Adam as `ppn.fit`, and the same batches (a function of
    seed and step), so the two consume identical tokens.
    """
    start = time.perf_counter()
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(config.lr_weights))
    graphdef, params = nnx.split(model, nnx.Param)
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        def loss(p):
            return token_nll(nnx.merge(graphdef, p)(batch[:, :-1]), batch[:, 1:]) / batch[:, 1:].size

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    params = jax.tree.map(jnp.copy, params)  # donation must not consume the caller's model
    batches = data.train_batches(np.asarray(tokens), config.batch_size, config.seqlen + 1, config.seed)
    history = []
    bar = tqdm(range(config.steps), disable=not progress, desc="finetune")
    for _ in bar:
        params, opt_state, value = step(params, opt_state, jnp.asarray(next(batches)))
        history.append(float(value))
        if not np.isfinite(history[-1]):
            raise FloatingPointError(f"non-finite loss {history[-1]} at fine-tuning step {len(history) - 1}")
        bar.set_postfix(nll=f"{history[-1]:.3f}")
    return FinetuneResult(nnx.merge(graphdef, params), history, time.perf_counter() - start)
