"""Plain fine-tuning of a model's weights: the equal-budget fairness baseline.

A push puppet fit also adapts the weights to the training text, so its pruned
models are compared with the dense model (or a baseline's pruned model)
fine-tuned on exactly the same batches, steps and optimiser.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ppn import data
from ppn.bayes import token_nll
from ppn.console import progress_bar
from ppn.fit import FitConfig
from ppn.models.llama import Llama
from ppn.runs import RunFolder, step_seconds
from ppn.svi import weights_optimizer


@dataclasses.dataclass
class FinetuneResult:
    """The fine-tuned model, its per-step mean NLL per token, and the summed step time."""

    model: Llama
    nll: list[float]
    seconds: float


def finetune(model: Llama, tokens, config: FitConfig = FitConfig(), progress: bool = True,
             run_dir: str | os.PathLike | None = None, keep_zeros: bool = False) -> FinetuneResult:
    """Fine-tunes every weight of `model` by next-token NLL with the fit's budget.

    Uses `config`'s steps, batch_size, seqlen, seed and the weights' optimiser of
    `ppn.fit` (`ppn.svi.weights_optimizer`: learning rate, schedule, weight decay), and the same batches (a function of
    seed and step), so the two consume identical tokens.

    Args:
        model: a dense or pruned `Llama`; it is left unchanged.
        tokens: int array (N,) of training tokens.
        config: the budget (steps, batch_size, seqlen, seed, lr_weights,
            checkpoint_every).
        progress: show a progress bar with the NLL per token.
        run_dir: folder for config, metrics and an orbax checkpoint every
            `checkpoint_every` steps (`RunFolder.due`); a run killed there resumes from its last
            checkpoint with the same result as an unbroken one. None keeps
            nothing on disk.
        keep_zeros: weights that are exactly zero get no update, so the mask
            of an unstructured pruning (SparseGPT, Wanda) stays fixed while the
            kept weights train (the masked fine-tune of a sparse model).

    Returns:
        The tuned model, the NLL of every step and the summed step time (over
        all sessions of a resumed run).

    Raises:
        FloatingPointError: a non-finite loss (the last checkpoint stays intact).
        ValueError: `run_dir` holds an unfinished run of another config or model.
    """
    tx = weights_optimizer(config)
    graphdef, params = nnx.split(model, nnx.Param)
    run = RunFolder(Path(run_dir) if run_dir is not None else None, config, model)

    # Zero gradients keep Adam's moments, hence the updates, at zero: the masked weights never move.
    mask = jax.tree.map(lambda p: p != 0, params) if keep_zeros else None

    # float32 master copies (as the fit keeps): a bfloat16 weight cannot take an update below its own spacing
    dtypes = jax.tree.map(lambda p: p.dtype, params)

    def in_model_dtype(master):
        return nnx.merge(graphdef, jax.tree.map(lambda m, d: m.astype(d), master, dtypes))

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, batch, mask):
        params, opt_state = state

        def loss(p):
            return token_nll(in_model_dtype(p)(batch[:, :-1]), batch[:, 1:]) / batch[:, 1:].size

        value, grads = jax.value_and_grad(loss)(params)
        if mask is not None:
            grads = jax.tree.map(lambda g, m: jnp.where(m, g, 0), grads, mask)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    # Checkpoints hold the flat leaves: orbax then needs no knowledge of nnx.State.
    params = jax.tree.map(lambda p: p.astype(jnp.float32, copy=True), params)  # donation must not consume the caller's
    leaves, treedef = jax.tree.flatten((params, tx.init(params)))
    step0, leaves, _ = run.restore(leaves)
    state = jax.tree.unflatten(treedef, leaves)
    history = run.metrics(step0)
    batches = data.train_batches(np.asarray(tokens), config.batch_size, config.seqlen + 1, config.seed,
                                 start_step=step0)
    bar = progress_bar(range(step0, config.steps), initial=step0, total=config.steps, enabled=progress,
                       desc="finetune")
    for i in bar:
        tick = time.perf_counter()
        state, value = step(state, jnp.asarray(next(batches)), mask)
        history.append({"step": i, "nll_per_token": float(value), "seconds": time.perf_counter() - tick})
        if not np.isfinite(history[-1]["nll_per_token"]):
            raise FloatingPointError(f"non-finite loss {float(value)} at fine-tuning step {i}"
                                     + (f"; the last checkpoint in {run.dir} is intact" if run.dir else ""))
        bar.set_postfix(nll=f"{float(value):.3f}")
        if run.due(i + 1, config):
            run.write_metrics(history)
            run.save(i + 1, jax.tree.leaves(state), 0)
    return FinetuneResult(in_model_dtype(state[0]), [r["nll_per_token"] for r in history],
                          step_seconds(history))
