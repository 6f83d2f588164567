"""The SVI of a fit, step by step: `init_fit` builds it, `fit_step` advances it by one step.

    setup, state = init_fit(model, tokens, config, run_dir)      # resumed if run_dir has a checkpoint
    state, row = fit_step(setup, state, batch)                   # batch: int (batch_size, seqlen + 1)

Like numpyro's `SVI.init` / `SVI.update`, with the push puppet model's specifics:
the gated NumPyro model (`ppn.bayes.push_puppet_model`), its guide and optimiser,
the starting values (`ppn.start`), the frozen teacher, and a jitted update that
skips a step whose loss or new parameters are not finite. `ppn.fit.fit` is the
run loop around them (batches, progress bar, metrics log, checkpoints).

The update is one jitted function of fixed shapes: it compiles once. With a
`mesh` (see `ppn.sharding`) the same step runs data-parallel and fully sharded:
each batch is split over the mesh's data x fsdp devices, the network weights,
their gradients and Adam moments are split over fsdp, and the gate and guide
parameters are replicated. The jitted step pins those layouts on its inputs and
outputs (so it still compiles once) and the partitioner propagates them through
the NumPyro model; checkpoints are saved and restored sharded.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
from flax import nnx
from jax.sharding import Mesh
from numpyro.handlers import replay, seed
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.elbo import compute_log_probs
from numpyro.infer.autoguide import AutoDelta, AutoGuide, AutoLowRankMultivariateNormal, AutoNormal

from ppn import bayes, data, diagnostics, sharding
from ppn.models.llama import Llama
from ppn.runs import RunFolder, metrics_row
from ppn.start import guide_start, init_to_values, load_teacher
from ppn.units import Units

if TYPE_CHECKING:
    from ppn.fit import FitConfig, FitResult

WEIGHTS_SITE = "llama$params"
"""The NumPyro param site of the network weights (a dict of arrays) when they are trained."""

def _point(model, init_loc_fn=None, init_scale=None) -> AutoDelta:
    """AutoDelta (a point, MAP), taking the common guide arguments; a point has no scale."""
    return AutoDelta(model) if init_loc_fn is None else AutoDelta(model, init_loc_fn=init_loc_fn)


GUIDES: dict[str, Callable[..., AutoGuide]] = {
    "normal": AutoNormal, "lowrank": AutoLowRankMultivariateNormal, "delta": _point}
"""Guide factories by `FitConfig.guide` name: (model, init_loc_fn=, init_scale=) -> an
autoguide. Add one with `register_guide`."""


def register_guide(name: str, make: Callable[..., AutoGuide], read_sites: Callable | None = None) -> None:
    """Makes a guide available as `FitConfig(guide=name)`, for fits and their plans.

    Args:
        name: the new guide's name.
        make: (model, init_loc_fn=, init_scale=) -> a numpyro autoguide (a
            numpyro.infer.autoguide class fits as it is).
        read_sites: (units, prior, guide params) -> {latent site: `ppn.posterior.Site`},
            how a plan reads the fitted guide (`ppn.posterior.flat_sites` helps with
            guides over one flat vector); None when its parameters are per-site
            `<site>_auto_loc` / `<site>_auto_scale`, as AutoNormal's. Plan files
            store the sites themselves, so `Plan.load` needs no registration.

    Raises:
        ValueError: the name is taken.
    """
    from ppn import posterior

    if name in GUIDES:
        raise ValueError(f"a guide named {name!r} is registered already")
    GUIDES[name] = make
    if read_sites is not None:
        posterior.SITE_READERS[name] = read_sites

@dataclasses.dataclass(frozen=True)
class FitSetup:
    """What stays fixed through a fit (built by `init_fit`).

    Attributes:
        config: the fit's configuration.
        units: the gate registry the guide's sites index.
        svi: numpyro's SVI of the gated model and its guide.
        update: the jitted step (svi_state, batch, rho, temperature, weights,
            teacher) -> (svi_state, loss, ok, metrics); donates svi_state.
        heldout_elbo: the jitted diagnostic (params, batch, weights, teacher, key)
            -> ELBO per data token at each of `ppn.diagnostics.DIAGNOSTIC_SIZES` (R,).
        weights: the frozen network weights (an `nnx.Param` state) when the
            weights are not trained, else None.
        teacher: the frozen teacher's `nnx` state, or None.
        mesh: the mesh the fit runs on, or None (the default device).
        run: the run folder (a `RunFolder` without a folder when run_dir is None).
    """

    config: FitConfig
    units: Units
    svi: SVI
    update: Callable
    heldout_elbo: Callable
    weights: Any
    teacher: Any
    mesh: Mesh | None
    run: RunFolder


@dataclasses.dataclass(frozen=True)
class FitState:
    """Where a fit stands (what a checkpoint holds, and the current streak of skipped steps).

    Attributes:
        step: steps done; the next step's index.
        svi: numpyro's SVIState: the optimiser state of the guide's parameters
            and, when trained, the network weights (FSDP-sharded on a mesh).
        nonfinite: steps skipped so far because the loss or an update was not finite.
        consecutive: steps skipped in a row up to now (0 after a resume).
    """

    step: int
    svi: Any
    nonfinite: int
    consecutive: int = 0


def init_fit(model: Llama, tokens, config: FitConfig, run_dir: str | os.PathLike | None = None,
             mesh: Mesh | None = None) -> tuple[FitSetup, FitState]:
    """Builds a fit of `model` on `tokens` (int (N,)) and its state at step 0, or
    at the latest checkpoint of an unfinished run in `run_dir`.

    The arguments and the errors are `ppn.fit.fit`'s; the network's starting
    weights are read, never changed.
    """
    cfg = config
    if model.config.layers is not None:
        raise ValueError("fit needs the dense model; this one is already pruned")
    if mesh is not None:
        sharding.check_mesh(mesh)
        if cfg.batch_size % sharding.batch_shards(mesh):
            raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the mesh's data x fsdp = "
                             f"{sharding.batch_shards(mesh)} devices, which split every batch")
    tokens = np.asarray(tokens)
    units = Units(model.config, cfg.group_width, cfg.cost, cfg.cost_context)
    run = RunFolder(Path(run_dir) if run_dir is not None else None, cfg, model)
    # Trained low-precision weights get float32 master copies: the optimiser
    # updates those, the forward pass runs in the model's dtype.
    network = _cast(model, jnp.float32) if cfg.train_weights and model.dtype != jnp.float32 else model
    svi = _svi(model, network, units, tokens, cfg, mesh)
    weights = None if cfg.train_weights else nnx.state(model, nnx.Param)
    teacher = load_teacher(model, cfg)
    teacher_graphdef, teacher_state = nnx.split(teacher) if teacher is not None else (None, None)
    teacher_logits = functools.partial(_teacher_logits, teacher_graphdef, mesh)

    # numpyro's initialisation as one compiled program (run op by op it compiled
    # hundreds of tiny ones, most of a start-up), on one device; then the state is
    # laid out on the mesh. Its outputs are new arrays: the donated step never
    # frees the caller's model.
    # Trained weights enter as an argument, their start values (the masters'), not as
    # constants of the program (`ppn.bayes._network`).
    first = jnp.asarray(next(data.train_batches(tokens, cfg.batch_size, cfg.seqlen + 1, cfg.seed)))
    start = nnx.state(network, nnx.Param) if cfg.train_weights else weights
    state = jax.jit(svi.init)(jax.random.PRNGKey(cfg.seed), first, jnp.asarray(cfg.sizes(0)),
                              jnp.float32(cfg.temperature(0)), jax.jit(teacher_logits)(teacher_state, first),
                              weights=start)
    if not bool(_all_finite(svi.get_params(state))):
        raise FloatingPointError("the log density is not finite at the initial parameters (some are NaN or "
                                 "infinite); check the model's weights for NaN/inf")
    state, weights, teacher_state, layouts = _lay_out(mesh, state, weights, teacher_state)
    # The state is donated, so old and new states never coexist in memory.
    update = jax.jit(functools.partial(_update, svi, teacher_logits, mesh), donate_argnums=0, **layouts)
    heldout = jax.jit(functools.partial(diagnostics.heldout_elbo, svi, teacher_logits, mesh, cfg.temperature_end,
                                        cfg.diagnostic_particles, cfg.data_tokens or len(tokens)))
    step, state, nonfinite = run.restore(state)
    return (FitSetup(cfg, units, svi, update, heldout, weights, teacher_state, mesh, run),
            FitState(step, state, nonfinite))


def fit_step(setup: FitSetup, state: FitState, batch: np.ndarray) -> tuple[FitState, dict]:
    """Runs step `state.step` on `batch` (int (batch_size, seqlen + 1)) at that
    step's sizes and temperature (`FitConfig.sizes`, `FitConfig.temperature`).

    A step whose loss or new parameters are not finite leaves the parameters as
    they were and is counted. Returns the next state (`state.svi` is donated to
    it) and the step's metrics.jsonl row (`ppn.runs.metrics_row`, with its
    "seconds").
    """
    cfg, step, mesh = setup.config, state.step, setup.mesh
    rho, temperature = cfg.sizes(step), cfg.temperature(step)
    tick = time.perf_counter()
    svi_state, loss, ok, metrics = setup.update(
        state.svi, jnp.asarray(batch) if mesh is None else sharding.global_batch(batch, mesh), jnp.asarray(rho),
        jnp.float32(temperature), setup.weights, setup.teacher)
    ok = bool(ok)
    row = metrics_row(step, float(loss), ok, rho, temperature, metrics) | {"seconds": time.perf_counter() - tick}
    return FitState(step + 1, svi_state, state.nonfinite + (not ok), 0 if ok else state.consecutive + 1), row


def fitted_model(model: Llama, setup: FitSetup, state: FitState) -> tuple[Llama, dict[str, np.ndarray]]:
    """`model` with the fitted weights (in its dtype; itself when the weights were
    frozen), and the guide's parameters by site name as host numpy arrays."""
    params = setup.svi.get_params(state.svi)
    fitted = model
    if setup.config.train_weights:
        graphdef, weights, rest = nnx.split(model, nnx.Param, ...)
        nnx.replace_by_pure_dict(weights, jax.tree.map(lambda x: x.astype(model.dtype), params[WEIGHTS_SITE]))
        fitted = nnx.merge(graphdef, weights, rest)
    return fitted, {k: sharding.to_host(v) for k, v in params.items() if k != WEIGHTS_SITE}


def model_and_guide(result: FitResult) -> tuple[Callable, AutoGuide, dict]:
    """A finished fit as numpyro objects, for `numpyro.infer.Predictive` and
    `numpyro.infer.log_likelihood`: (model, guide, params).

    The model is `ppn.bayes.push_puppet_model` with the fitted network and the
    fit's settings bound; it takes (batch (B, T+1), rho, temperature,
    teacher_logits=None) and `predict=True` to draw the "tokens" site. The guide
    always sees the tokens observed (its latent sites are the gates' parameters),
    and params holds its fitted values (with the rescaling exponents).

        model, guide, params = model_and_guide(result)
        draws = Predictive(model, guide=guide, params=params, num_samples=8)(key, batch, 0.5, 0.2, predict=True)
        draws["tokens"]  # (8, B, T); draws["eta"]: (8, G) gate locations at rho = 0.5
    """
    cfg = result.config
    model = gated_model(result.model, result.units, cfg, result.data_tokens)

    def observed(*args, predict: bool = False, **kwargs):
        return model(*args, **kwargs)

    return model, GUIDES[cfg.guide](observed), {k: jnp.asarray(v) for k, v in result.guide_params.items()}


class OrderedTraceELBO(Trace_ELBO):
    """numpyro's `Trace_ELBO` (one particle, or `num_particles` averaged) with the
    per-site terms summed in trace order. numpyro sums them over a set of site
    names, whose order follows Python's per-process hash seed: each new process
    then compiled a different program, which never hit JAX's persistent cache."""

    def loss_with_mutable_state(self, rng_key, param_map, model, guide, *args, **kwargs):
        def particle(key):
            model_key, guide_key = jax.random.split(key)
            guide_lp, guide_trace = compute_log_probs(seed(guide, guide_key), args, kwargs, param_map)
            mutable = {n: site["value"] for n, site in guide_trace.items() if site["type"] == "mutable"}
            model_lp, model_trace = compute_log_probs(replay(seed(model, model_key), guide_trace), args, kwargs,
                                                      param_map | mutable)
            mutable |= {n: site["value"] for n, site in model_trace.items() if site["type"] == "mutable"}
            names = list(model_lp) + [n for n in guide_lp if n not in model_lp]
            elbo = sum((model_lp.get(n, 0.0) - guide_lp.get(n, 0.0) for n in names), start=jnp.zeros(()))
            return elbo, mutable or None

        if self.num_particles == 1:
            elbo, mutable = particle(rng_key)
            return {"loss": -elbo, "mutable_state": mutable}
        elbos, mutable = self.vectorize_particles_fn(particle, jax.random.split(rng_key, self.num_particles))
        return {"loss": -jnp.mean(elbos), "mutable_state": mutable}


def _svi(model: Llama, network: Llama, units: Units, tokens: np.ndarray, cfg: FitConfig,
         mesh: Mesh | None) -> SVI:
    """numpyro's SVI: the gated model of `network` (`model`, or its float32 master copy,
    run in `model`'s dtype) with everything but the step's inputs bound, the guide
    `cfg.guide` starting at `ppn.start.guide_start`, and `_optimizer`."""
    data_tokens = cfg.data_tokens or len(tokens)
    model_fn = gated_model(network, units, cfg, data_tokens, compute_dtype=None if network is model else model.dtype)
    if mesh is not None:
        model_fn = _GatherWeights(model_fn, mesh)
    start = guide_start(model, units, tokens, cfg, mesh)
    guide = GUIDES[cfg.guide](model_fn, init_loc_fn=init_to_values(values=start), init_scale=cfg.guide_init_scale)
    return SVI(model_fn, guide, _optimizer(cfg), OrderedTraceELBO())


def gated_model(network: Llama, units: Units, cfg: FitConfig, data_tokens: int, compute_dtype=None):
    """`ppn.bayes.push_puppet_model` of `network` with the fit's settings bound: a
    NumPyro model of (batch (B, T+1), rho, temperature, teacher_logits=None,
    weights=None, predict=False), e.g. for `numpyro.infer.Predictive` of the
    prior before any fit (no guide: every latent site drawn from its prior)."""
    return functools.partial(
        bayes.push_puppet_model, network=network, units=units, prior=cfg.prior, data_tokens=data_tokens,
        likelihood_temperature=cfg.likelihood_temperature, train_weights=cfg.train_weights,
        teacher_weight=cfg.teacher_weight, teacher_temperature=cfg.teacher_temperature, rescale=cfg.rescale,
        constraint=cfg.constraint,
        compute_dtype=compute_dtype)


def _cast(model: Llama, dtype) -> Llama:
    """A copy of `model` with its weights (`nnx.Param`s) in `dtype`."""
    graphdef, weights, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(dtype), weights), rest)


class _GatherWeights(numpyro.primitives.Messenger):
    """Gathers the FSDP-sharded network weights whole where the model reads them
    (`ppn.sharding.gather`): every device runs its own batch rows through the whole
    weights. Outside a trace (numpyro's eager initialisation on one device) there
    is nothing to partition, and it does nothing."""

    def __init__(self, fn, mesh: Mesh):
        self.mesh = mesh
        super().__init__(fn)

    def postprocess_message(self, msg):
        if msg["type"] != "param" or msg["name"] != WEIGHTS_SITE:
            return
        leaves = jax.tree.leaves(msg["value"])  # none when nnx_module first asks for the site
        if leaves and isinstance(leaves[0], jax.core.Tracer):
            msg["value"] = sharding.gather(msg["value"], self.mesh)


def _optimizer(cfg: FitConfig):
    """Adam with separate learning rates: network weights, gate variational
    parameters, and the rescaling exponents (`rescale_<kind>`)."""
    anchor = () if cfg.anchor_sd is None else (pull_to_start(cfg.anchor_sd ** -2),)
    weights = optax.chain(*anchor, weights_optimizer(cfg))

    def label(name):
        return "weights" if name == WEIGHTS_SITE else "rescale" if name.startswith("rescale_") else "gates"

    tx = optax.multi_transform(
        {"weights": weights, "gates": optax.adam(cfg.lr_gates), "rescale": optax.adam(cfg.lr_rescale)},
        lambda params: {k: label(k) for k in params})
    return numpyro.optim.optax_to_numpyro(tx)


def weights_optimizer(cfg: FitConfig) -> optax.GradientTransformation:
    """The network weights' optimiser, shared by the fit and plain fine-tuning: gradients
    clipped to norm 1, then Adam at `lr_weights` (AdamW with `weight_decay`), warmed up
    linearly over `warmup_steps` and then constant or cosine-decayed to a tenth by `steps`."""
    lr = cfg.lr_weights
    if cfg.warmup_steps or cfg.lr_decay != "constant":
        decay = max(cfg.steps - cfg.warmup_steps, 1)
        after = (optax.constant_schedule(lr) if cfg.lr_decay == "constant"
                 else optax.cosine_decay_schedule(lr, decay, alpha=0.1))
        lr = optax.join_schedules([optax.linear_schedule(0.0, cfg.lr_weights, cfg.warmup_steps), after],
                                  [cfg.warmup_steps])
    adam = optax.adamw(lr, weight_decay=cfg.weight_decay) if cfg.weight_decay else optax.adam(lr)
    return optax.chain(optax.clip_by_global_norm(1.0), adam)


def pull_to_start(precision: float) -> optax.GradientTransformation:
    """The gradient of a Gaussian prior N(w0, 1 / precision) on every weight, added
    to the loss gradient: precision * (w - w0), with w0 the weights the optimiser
    started from. w0 lives in the optimiser state (sharded like the weights), so
    a resumed fit pulls toward the same values. The logged ELBO leaves this
    prior's constant-free log density, -precision/2 |w - w0|^2, out."""
    def init(params):
        return jax.tree.map(jnp.copy, params)

    def update(updates, start, params=None):
        if params is None:
            raise ValueError("pull_to_start needs the parameters in update()")
        return jax.tree.map(lambda g, w, w0: g + precision * (w - w0), updates, params, start), start

    return optax.GradientTransformation(init, update)


def _teacher_logits(graphdef, mesh: Mesh | None, teacher, batch: jax.Array):
    """The frozen teacher's logits (B, T, V) on `batch` (B, T+1), computed once for
    all the batch's sizes; None without a teacher."""
    if teacher is None:
        return None
    return jax.lax.stop_gradient(nnx.merge(graphdef, sharding.gather(teacher, mesh))(batch[:, :-1]))


def _update(svi: SVI, teacher_logits, mesh: Mesh | None, state, batch, rho, temperature, weights, teacher):
    """One SVI step, or none when the loss or the new parameters are not finite:
    (state, loss, ok, the model's "ppn$metrics")."""
    if weights is not None:
        weights = sharding.gather(weights, mesh)
    new, loss = svi.update(state, batch, rho, temperature, teacher_logits(teacher, batch), weights=weights)
    ok = jnp.isfinite(loss) & _all_finite(svi.get_params(new))
    kept = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
    return kept, loss, ok, new.mutable_state["ppn$metrics"]


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves))


def _lay_out(mesh: Mesh | None, state, weights, teacher):
    """(state, weights, teacher, jit shardings) for `mesh`: the network weights and
    the Adam moments that mirror them FSDP-sharded, the rest replicated, and the
    in/out shardings that pin those layouts on every boundary of the step, so the
    state keeps its layout from step to step (one compilation). Without a mesh:
    all unchanged, no shardings."""
    if mesh is None:
        return state, weights, teacher, {}
    rep = sharding.replicated(mesh)
    state_layout = sharding.state_shardings(state, mesh, WEIGHTS_SITE)
    weights_layout = None if weights is None else sharding.weight_shardings(weights, mesh)
    teacher_layout = None if teacher is None else sharding.weight_shardings(teacher, mesh)
    state = sharding.place(state, state_layout)
    weights = None if weights is None else sharding.place(weights, weights_layout)
    teacher = None if teacher is None else sharding.place(teacher, teacher_layout)
    return state, weights, teacher, dict(
        out_shardings=(state_layout, rep, rep, rep),
        in_shardings=(state_layout, sharding.batch_sharding(mesh), rep, rep, weights_layout, teacher_layout))
