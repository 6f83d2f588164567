"""Fitting the push puppet model: SVI over the gates, together with the network weights.

    result = ppn.fit(model, tokens, FitConfig(steps=300), run_dir="runs/smollm2")

Every step draws target sizes (one for the whole batch, or one per sequence:
`FitConfig.sizes`), a fixed-shape batch of random windows, and a hard-concrete
temperature from a geometric schedule; all three are functions of (seed, step) only, so a run resumed from a checkpoint
replays exactly the steps an unbroken run would. The update is one jitted
function of fixed shapes: it compiles once. A step whose loss or new parameters
are not finite is skipped (the state is left as it was) and counted.

A run folder holds config.json, metrics.jsonl (one line per step) and orbax
checkpoints; it is written by process 0 only.

With a `mesh` (see `ppn.sharding`) the same step runs data-parallel and fully
sharded: each batch is split over the mesh's data x fsdp devices, the network
weights, their gradients and Adam moments are split over fsdp, and the gate and
guide parameters are replicated. The jitted step pins those layouts on its
inputs and outputs (so it still compiles once) and the partitioner propagates
them through the NumPyro model; checkpoints are saved and restored sharded.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
from flax import nnx
from jax.sharding import Mesh
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoNormal
from numpyro.infer.initialization import init_to_median

from ppn import bayes, data, sharding
from ppn.console import progress_bar
from ppn.units import Units
from ppn.models.llama import Llama
from ppn.runs import atomic_write_text

WEIGHTS_SITE = "llama$params"


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Every knob of a fit. Defaults suit SmolLM2-135M on a 2-core CPU (about 20 minutes).

    Attributes:
        steps: SVI steps.
        batch_size, seqlen: each step sees batch_size windows of seqlen + 1 tokens.
        rho_min: target sizes are drawn from Uniform(rho_min, 1).
        rho_warmup: fraction of the steps over which the lower end of that range
            falls linearly from 1 to rho_min (0 = the full range from the start).
            A pretrained network cut at random to half its units is broken, and
            its gradients say little; pruning gently first lets the gates learn
            which units matter before the sizes get small.
        init: where the guide starts: "taylor" puts each unit's intercept at its
            first-order importance (|dNLL/dz| per parameter, on a few training
            batches, standardised within the hierarchy); "prior" at the prior
            medians (all units equal).
        group_width: SwiGLU channels per MLP gate.
        prior: a name in `ppn.bayes.PRIORS`.
        guide: "normal" (AutoNormal) or "lowrank" (AutoLowRankMultivariateNormal).
        guide_init_scale: initial scale of the guide.
        lr_weights, lr_gates: Adam learning rates of the network weights and of the guide.
        train_weights: fit the weights with the gates (False: gates only, weights frozen).
        temperature_start, temperature_end: geometric schedule of the hard-concrete temperature.
        likelihood_temperature: divides the log-likelihood (a tempered posterior; 1 = exact).
        distill_weight: weight of self-distillation from the ungated pass (0 = off).
        size_sampling: "step" (one size per step, shared by the batch) or
            "sequence" (each sequence of the batch its own size and gates, so a
            step trains batch_size sizes for the price of one forward pass).
        sandwich: the first sequence of every batch trains the full network and
            the last one the smallest size of the current range (implies sizes per
            sequence; batch_size >= 3).
        target_sizes: sizes the user cares most about: a share `target_share`
            of the draws is one of these (at random), the rest stays uniform, so
            every size can still be cut.
        target_share: see target_sizes.
        teacher: distil from a frozen teacher: "start" (a frozen copy of the
            starting weights) or a model source (zoo name, checkpoint directory,
            .gguf) with the student's vocabulary; None = no teacher.
        teacher_weight: w in loss = (1 - w) NLL + w tau^2 KL(teacher || student)
            per token (`ppn.bayes.push_puppet_model`); needs a teacher.
        teacher_temperature: tau, the softmax temperature of that KL.
        teacher_dtype: the teacher's weight dtype ("bfloat16" halves its memory);
            None = the model's.
        rescale: learn size-dependent output scales of kept units and sub-layers
            and input scales of sub-layers (`ppn.bayes.rescale_factors`), folded
            into the weights when the model is cut.
        lr_rescale: Adam learning rate of the rescaling exponents.
        constraint: "offset" (push offset: expected size = rho exactly at every
            step) or "lagrange" (gradient-ascended multipliers; ppn/METHOD.md's
            alternative, kept for comparison).
        data_tokens: tokens the likelihood is scaled to; None = len(tokens).
        checkpoint_every: steps between checkpoints of the run folder.
        max_nonfinite: consecutive non-finite steps tolerated before giving up.
        seed: seeds batches, sizes, gates and the guide.
    """

    steps: int = 150
    batch_size: int = 4
    seqlen: int = 256
    rho_min: float = 0.2
    rho_warmup: float = 0.3
    init: str = "taylor"
    group_width: int = 64
    prior: str = "hierarchical"
    guide: str = "normal"
    guide_init_scale: float = 0.05
    lr_weights: float = 1e-4
    lr_gates: float = 0.05
    train_weights: bool = True
    temperature_start: float = 0.66
    temperature_end: float = 0.2
    likelihood_temperature: float = 1.0
    distill_weight: float = 0.0
    size_sampling: str = "step"
    sandwich: bool = False
    target_sizes: tuple[float, ...] = ()
    target_share: float = 0.5
    teacher: str | None = None
    teacher_weight: float = 0.0
    teacher_temperature: float = 1.0
    teacher_dtype: str | None = None
    rescale: bool = False
    lr_rescale: float = 2e-3
    constraint: str = "offset"
    data_tokens: int | None = None
    checkpoint_every: int = 25
    max_nonfinite: int = 20
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.seqlen < 2:
            raise ValueError("steps and batch_size must be >= 1 and seqlen >= 2")
        if not 0 < self.rho_min < 1:
            raise ValueError(f"rho_min must lie in (0, 1), got {self.rho_min}")
        bayes.get_prior(self.prior)
        if self.guide not in GUIDES:
            raise ValueError(f"unknown guide {self.guide!r}; choose one of {', '.join(GUIDES)}")
        if not self.temperature_start > 0 or not self.temperature_end > 0:
            raise ValueError("temperatures must be positive")
        if self.checkpoint_every < 1:
            raise ValueError("checkpoint_every must be >= 1")
        if not 0 <= self.rho_warmup < 1:
            raise ValueError(f"rho_warmup must lie in [0, 1), got {self.rho_warmup}")
        if self.constraint not in ("offset", "lagrange"):
            raise ValueError(f"unknown size constraint {self.constraint!r}; choose 'offset' or 'lagrange'")
        if self.init not in ("taylor", "prior"):
            raise ValueError(f"unknown init {self.init!r}; choose 'taylor' or 'prior'")
        if self.size_sampling not in ("step", "sequence"):
            raise ValueError(f"unknown size_sampling {self.size_sampling!r}; choose 'step' or 'sequence'")
        if self.sandwich and self.batch_size < 3:
            raise ValueError(f"sandwich needs batch_size >= 3 (full, smallest and sampled sizes), "
                             f"got {self.batch_size}")
        object.__setattr__(self, "target_sizes", tuple(float(t) for t in self.target_sizes))
        bad = [t for t in self.target_sizes if not 0 < t <= 1]
        if bad:
            raise ValueError(f"target sizes must lie in (0, 1], got {bad}")
        if not 0 <= self.target_share <= 1:
            raise ValueError(f"target_share must lie in [0, 1], got {self.target_share}")
        if not 0 <= self.teacher_weight <= 1:
            raise ValueError(f"teacher_weight must lie in [0, 1], got {self.teacher_weight}")
        if (self.teacher is None) != (self.teacher_weight == 0):
            raise ValueError("a teacher needs teacher_weight > 0, and teacher_weight > 0 needs a teacher "
                             f"(teacher={self.teacher!r}, teacher_weight={self.teacher_weight})")
        if not self.teacher_temperature > 0:
            raise ValueError(f"teacher_temperature must be positive, got {self.teacher_temperature}")
        if self.teacher_dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"teacher_dtype must be float32 or bfloat16, got {self.teacher_dtype!r}")

    @property
    def per_sequence(self) -> bool:
        """Whether each sequence of a batch has its own size (`sizes` is then (batch_size,))."""
        return self.size_sampling == "sequence" or self.sandwich

    def sizes(self, step: int) -> np.ndarray:
        """The target sizes of `step`: float32 () or (batch_size,) with `per_sequence`.

        A function of (seed, step) only. Sizes are uniform on [low, 1], where low
        falls from 1 to rho_min over the warm-up; a share `target_share` of them
        is replaced by one of `target_sizes` (those above low); with `sandwich`
        the first is 1 and the last is low."""
        warm = min(1.0, max(0.05, step / (self.rho_warmup * self.steps))) if self.rho_warmup > 0 else 1.0
        low = 1.0 - (1.0 - self.rho_min) * warm
        rng = np.random.default_rng([self.seed, step, 1])
        n = self.batch_size if self.per_sequence else 1
        rho = rng.uniform(low, 1.0, n)
        if self.target_sizes:
            named = rng.choice(self.target_sizes, n)
            rho = np.where((rng.uniform(size=n) < self.target_share) & (named >= low), named, rho)
        if self.sandwich:
            rho[0], rho[-1] = 1.0, low
        return rho.astype(np.float32) if self.per_sequence else np.float32(rho[0])

    @property
    def train_tokens(self) -> int:
        """Tokens a fit with this budget reads: steps x batch_size windows of seqlen + 1."""
        return self.steps * self.batch_size * (self.seqlen + 1)

    def temperature(self, step: int) -> float:
        frac = step / max(self.steps - 1, 1)
        return self.temperature_start * (self.temperature_end / self.temperature_start) ** frac


GUIDES = {"normal": AutoNormal, "lowrank": AutoLowRankMultivariateNormal}


@dataclasses.dataclass
class FitResult:
    """What a fit produced.

    Attributes:
        model: the network with its fitted weights.
        units: the gate registry the guide's sites index.
        config: the fit's configuration.
        guide_params: the guide's variational parameters by site name (numpy).
        metrics: one dict per step (loss, nll per token, rho, expected size, ...).
        nonfinite_steps: steps skipped because the loss or an update was not finite.
        seconds: wall time of this call (a resumed run counts only its own part).
    """

    model: Llama
    units: Units
    config: FitConfig
    guide_params: dict[str, np.ndarray]
    metrics: list[dict[str, Any]]
    nonfinite_steps: int
    seconds: float


def _network_model(network: Llama, units: Units, cfg: FitConfig, data_tokens: int, compute_dtype=None):
    """The NumPyro model with everything but (batch, rho, temperature, teacher logits, weights) bound."""
    return functools.partial(
        bayes.push_puppet_model, network=network, units=units, prior=cfg.prior, data_tokens=data_tokens,
        likelihood_temperature=cfg.likelihood_temperature, train_weights=cfg.train_weights,
        distill_weight=cfg.distill_weight, teacher_weight=cfg.teacher_weight,
        teacher_temperature=cfg.teacher_temperature, rescale=cfg.rescale, constraint=cfg.constraint,
        compute_dtype=compute_dtype)


def load_teacher(model: Llama, cfg: FitConfig) -> Llama | None:
    """The frozen teacher of a fit: None, a copy of `model`'s starting weights
    ("start"), or the model at `cfg.teacher`, in `cfg.teacher_dtype`.

    Raises:
        ValueError: the teacher's vocabulary size differs from the student's.
        MemoryError: the teacher's weights do not fit in the memory available
            (the message says how much they need).
    """
    if cfg.teacher is None:
        return None
    dtype = jnp.dtype(cfg.teacher_dtype) if cfg.teacher_dtype else model.dtype
    if cfg.teacher == "start":
        graphdef, state = nnx.split(model)
        # A copy: the fit donates its state, whose weights may share buffers with `model`.
        return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.array(x, dtype=dtype if jnp.issubdtype(
            x.dtype, jnp.floating) else x.dtype, copy=True), state))
    from ppn.checkpoint import load_model, read_config, safetensors_dir

    source = safetensors_dir(cfg.teacher)
    config = read_config(source)
    if config.vocab_size != model.config.vocab_size:
        raise ValueError(f"teacher {cfg.teacher!r} has a vocabulary of {config.vocab_size:,} tokens, the model "
                         f"{model.config.vocab_size:,}: a teacher must share the student's tokenizer")
    need = config.num_params() * jnp.dtype(dtype).itemsize
    import psutil

    available = psutil.virtual_memory().available
    if need > available:
        raise MemoryError(f"teacher {cfg.teacher!r} needs {need / 2**30:.1f} GiB for its weights in {dtype.name}, "
                          f"and {available / 2**30:.1f} GiB are available; try teacher_dtype='bfloat16'")
    return load_model(source, dtype=dtype.name)


def _cast(model: Llama, dtype) -> Llama:
    """A copy of `model` with its weights (`nnx.Param`s) in `dtype`."""
    graphdef, weights, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(dtype), weights), rest)


class _GatherWeights(numpyro.primitives.Messenger):
    """Gathers the FSDP-sharded network weights whole where the model reads them.

    This is ZeRO-3's forward and backward: every device runs its own batch rows
    through the whole weights, and the gradients flow back (reduced, then cut to
    each device's shard) through the transpose of the constraint. Without it the
    partitioner, seeing weights split along a layer's input or output dimension,
    may keep them in place and move activations instead, and fall back to
    replicating tensors it cannot reshard (XLA's "involuntary full
    rematerialization"). Outside a trace (numpyro's eager initialisation on one
    device) there is nothing to partition, and it does nothing.
    """

    def __init__(self, fn, layout):
        self.layout = layout
        super().__init__(fn)

    def postprocess_message(self, msg):
        if msg["type"] != "param" or msg["name"] != WEIGHTS_SITE:
            return
        leaves = jax.tree.leaves(msg["value"])  # none when nnx_module first asks for the site
        if leaves and isinstance(leaves[0], jax.core.Tracer):
            msg["value"] = jax.lax.with_sharding_constraint(msg["value"], self.layout)


def _optimizer(cfg: FitConfig):
    """Adam with separate learning rates: network weights, gate variational
    parameters, and the rescaling exponents (`rescale_<kind>`)."""
    weights = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(cfg.lr_weights))

    def label(name):
        return "weights" if name == WEIGHTS_SITE else "rescale" if name.startswith("rescale_") else "gates"

    tx = optax.multi_transform(
        {"weights": weights, "gates": optax.adam(cfg.lr_gates), "rescale": optax.adam(cfg.lr_rescale)},
        lambda params: {k: label(k) for k in params})
    return numpyro.optim.optax_to_numpyro(tx)


def _init_loc(site=None, values=None):
    """numpyro init strategy: given values where known, prior medians elsewhere."""
    if site is None:
        return functools.partial(_init_loc, values=values)
    if site["name"] in values:
        return jnp.asarray(values[site["name"]], jnp.float32)
    return init_to_median(site, num_samples=15)


def gate_gradients(model: Llama, units: Units, batches, mesh: Mesh | None = None) -> dict[str, np.ndarray]:
    """Mean |d NLL / d z_g| over `batches` (each int (B, T+1)) at all gates open:
    the first-order change of the loss when a unit is removed (Taylor importance).
    With a `mesh`, batches are split over it and weights FSDP-sharded as in `fit`."""
    from ppn.bayes import block_gates, token_nll

    graphdef, state = nnx.split(model)
    ones = {k: jnp.ones(v) for k, v in bayes._shapes(units).items()}
    if mesh is not None:
        state = sharding.on_mesh(state, mesh)

    @jax.jit
    def grad(state, z, batch):
        if mesh is not None:
            state = jax.lax.with_sharding_constraint(state, sharding.replicated(mesh))  # see _GatherWeights

        def loss(z):
            net = nnx.merge(graphdef, state)
            return token_nll(net(batch[:, :-1], gates=block_gates(units, z)), batch[:, 1:]) / batch[:, 1:].size
        return jax.grad(loss)(z)

    total = {k: np.zeros(v.shape) for k, v in ones.items()}
    count = 0
    for batch in batches:
        g = grad(state, ones, jnp.asarray(batch) if mesh is None else sharding.global_batch(batch, mesh))
        total = {k: total[k] + np.abs(sharding.to_host(g[k])) for k in total}
        count += 1
    return {k: v / count for k, v in total.items()}


def taylor_init(model: Llama, units: Units, tokens: np.ndarray, cfg: FitConfig, num_batches: int = 4,
                mesh: Mesh | None = None) -> dict:
    """Initial guide locations from Taylor importances, in the hierarchy's coordinates.

    A unit's score is log(|dNLL/dz| / cost). A (layer, kind) cell's score is the
    mean of its units'; `delta` starts at the standardised cell scores, `eps_*` at
    the standardised deviations of units from their cell (both clipped to +-3).
    """
    batches = itertools.islice(data.train_batches(tokens, cfg.batch_size, cfg.seqlen + 1, cfg.seed + 7919),
                               num_batches)
    imp = gate_gradients(model, units, batches, mesh)
    costs = {"head": np.full((units.num_layers, units.num_heads), units.head_cost),
             "mlp_group": np.broadcast_to(units.group_costs, (units.num_layers, units.num_groups))}
    score = {k: np.log(imp[k] / costs[k] + 1e-20) for k in costs}
    cells = np.stack([score["head"].mean(1), score["mlp_group"].mean(1)], axis=1)  # (L, 2)

    def standard(x):
        return np.clip((x - x.mean()) / (x.std() + 1e-12), -3, 3)

    deviations = {k: score[k] - cells[:, i, None] for i, k in enumerate(("head", "mlp_group"))}
    spread = np.concatenate([d.reshape(-1) for d in deviations.values()]).std() + 1e-12
    return {"delta": standard(cells),
            **{f"eps_{k}": np.clip(d / spread, -3, 3) for k, d in deviations.items()}}


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves))


class RunFolder:
    """A training run's folder: config, metrics log, orbax checkpoints.

    Shared by `fit` and `ppn.harness.finetune.finetune`: an unfinished run with the same
    config resumes from its latest checkpoint, a finished one (DONE) is refused.
    """

    def __init__(self, run_dir: Path | None, cfg: FitConfig, model: Llama):
        self.dir = run_dir
        self.manager = None
        if run_dir is None:
            return
        if (run_dir / "DONE").exists():
            raise FileExistsError(f"{run_dir} holds a finished run; choose another run folder or delete it")
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {"fit": dataclasses.asdict(cfg), "model": model.config.to_hf()}
        if model.dtype != jnp.float32:  # recorded only then, so float32 runs of earlier versions still resume
            record["dtype"] = str(model.dtype)
        config_file = run_dir / "config.json"
        if config_file.exists():
            previous, current = json.loads(config_file.read_text()), json.loads(json.dumps(record))
            if previous != current:
                fields = sorted(k for k in set(previous.get("fit", {})) | set(current["fit"])
                                if previous.get("fit", {}).get(k, "<absent>") != current["fit"].get(k, "<absent>"))
                differ = ", ".join(f"{k} ({previous.get('fit', {}).get(k, '<absent>')!r} there, "
                                   f"{current['fit'].get(k, '<absent>')!r} now)" for k in fields) or "the model"
                raise ValueError(f"{run_dir} holds an unfinished run with another configuration ({differ}); "
                                 "resume it with the same FitConfig and model, or use another folder")
        elif jax.process_index() == 0:
            atomic_write_text(config_file, json.dumps(record, indent=2))
        if jax.process_index() == 0:  # a kill mid-write leaves atomic_write_text's temporary files
            for stale in run_dir.glob(".*.json*"):
                stale.unlink(missing_ok=True)
        import orbax.checkpoint as ocp

        # cleanup_tmp_directories: a checkpoint whose writing was killed is removed, never read.
        self.manager = ocp.CheckpointManager(
            (run_dir / "checkpoints").absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True, cleanup_tmp_directories=True))

    def restore(self, state):
        """(step, state, nonfinite) from the latest checkpoint, or (0, state, 0).

        The restored arrays take the shapes, dtypes and shardings of `state`'s
        (each process reads only its own shards)."""
        if self.manager is None or self.manager.latest_step() is None:
            return 0, state, 0
        import orbax.checkpoint as ocp

        step = self.manager.latest_step()
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        target = {"state": abstract, "nonfinite": np.zeros((), np.int64)}
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
        return step, restored["state"], int(restored["nonfinite"])

    def save(self, step: int, state, nonfinite: int):
        if self.manager is None:
            return
        import orbax.checkpoint as ocp

        self.manager.save(step, args=ocp.args.StandardSave({"state": state, "nonfinite": np.asarray(nonfinite)}))
        self.manager.wait_until_finished()

    def metrics(self, upto: int) -> list[dict]:
        """Logged metrics of steps < upto (a resumed run drops lines past its checkpoint)."""
        if self.dir is None or not (self.dir / "metrics.jsonl").exists():
            return []
        rows = [json.loads(line) for line in (self.dir / "metrics.jsonl").read_text().splitlines() if line]
        return [r for r in rows if r["step"] < upto]

    def write_metrics(self, rows: list[dict]):
        if self.dir is not None and jax.process_index() == 0:
            atomic_write_text(self.dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def fit(model: Llama, tokens, config: FitConfig = FitConfig(), run_dir: str | os.PathLike | None = None,
        progress: bool = True, mesh: Mesh | None = None) -> FitResult:
    """Fits the gates (and, by default, the weights) of `model` on `tokens` by SVI.

    Args:
        model: a dense `Llama`.
        tokens: int array (N,) of training tokens.
        config: the fit's knobs.
        run_dir: folder for config, metrics and checkpoints; an unfinished run
            there is resumed, a finished one is refused. With several processes
            it must be a folder they all see.
        progress: show a progress bar with ELBO, NLL per token and size error
            (process 0 only).
        mesh: run on this ("data", "fsdp") mesh (`ppn.sharding.make_mesh`); None runs on
            the default device. `batch_size` must be a multiple of data x fsdp.
            The fitted weights come back FSDP-sharded on the mesh.

    Raises:
        ValueError: a pruned model, or a mesh with an unknown axis, other than
            Auto axis types, or a data x fsdp size that does not divide batch_size.
        FileExistsError: `run_dir` holds a finished run.
        FloatingPointError: more than `max_nonfinite` consecutive non-finite steps.
    """
    start_time = time.perf_counter()
    if model.config.layers is not None:
        raise ValueError("fit needs the dense model; this one is already pruned")
    cfg = config
    if mesh is not None:
        sharding.check_mesh(mesh)
        if cfg.batch_size % sharding.batch_shards(mesh):
            raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the mesh's data x fsdp = "
                             f"{sharding.batch_shards(mesh)} devices, which split every batch")
    tokens = np.asarray(tokens)
    units = Units(model.config, cfg.group_width)
    data_tokens = cfg.data_tokens or len(tokens)
    run = RunFolder(Path(run_dir) if run_dir is not None else None, cfg, model)

    # Trained low-precision weights get float32 master copies: the optimiser
    # updates those, the forward pass runs in the model's dtype.
    master = cfg.train_weights and model.dtype != jnp.float32
    model_fn = (_network_model(_cast(model, jnp.float32), units, cfg, data_tokens, compute_dtype=model.dtype)
                if master else _network_model(model, units, cfg, data_tokens))
    if mesh is not None:
        model_fn = _GatherWeights(model_fn, sharding.replicated(mesh))
    weights = None if cfg.train_weights else nnx.state(model, nnx.Param)
    # Start latents at their prior medians (not numpyro's default uniform draw in
    # (-2, 2)), or at the units' first-order importances.
    start = (taylor_init(model, units, tokens, cfg, mesh=mesh)
             if cfg.init == "taylor" and cfg.prior != "independent" else {})
    if not all(np.isfinite(v).all() for v in start.values()):
        start = {}  # a network that yields non-finite gradients fails the finiteness check below
    guide = GUIDES[cfg.guide](model_fn, init_loc_fn=functools.partial(_init_loc, values=start),
                              init_scale=cfg.guide_init_scale)
    svi = SVI(model_fn, guide, _optimizer(cfg), Trace_ELBO())

    # The state is built on one device, then laid out on the mesh: numpyro's
    # initialisation runs op by op, and on sharded arrays each op would compile
    # for the mesh.
    batches = data.train_batches(tokens, cfg.batch_size, cfg.seqlen + 1, cfg.seed)
    first = jnp.asarray(next(batches))
    teacher = load_teacher(model, cfg)
    teacher_graphdef, teacher_state = nnx.split(teacher) if teacher is not None else (None, None)

    def teacher_logits(teacher_state, batch):
        """The frozen teacher's logits (B, T, V) on the batch, computed once for all its sizes."""
        if teacher_state is None:
            return None
        if mesh is not None:  # gathered where read, as _GatherWeights does
            teacher_state = jax.lax.with_sharding_constraint(teacher_state, sharding.replicated(mesh))
        return jax.lax.stop_gradient(nnx.merge(teacher_graphdef, teacher_state)(batch[:, :-1]))

    try:
        state = svi.init(jax.random.PRNGKey(cfg.seed), first, jnp.asarray(cfg.sizes(0)),
                         jnp.float32(cfg.temperature(0)), jax.jit(teacher_logits)(teacher_state, first),
                         weights=weights)
    except RuntimeError as e:  # numpyro: "Cannot find valid initial parameters"
        raise FloatingPointError(
            f"the log density is not finite at the initial parameters ({e}); "
            "check the model's weights for NaN/inf") from e

    # The state is donated, so old and new states never coexist in memory. With a
    # mesh every boundary of the step is also pinned: the state keeps its layout
    # from step to step (one compilation).
    jit = functools.partial(jax.jit, donate_argnums=0)
    if mesh is not None:
        rep = sharding.replicated(mesh)
        state_layout = sharding.state_shardings(state, mesh, WEIGHTS_SITE)
        weights_layout = None if weights is None else sharding.weight_shardings(weights, mesh)
        teacher_layout = None if teacher is None else sharding.weight_shardings(teacher_state, mesh)
        state = sharding.place(state, state_layout)
        weights = None if weights is None else sharding.place(weights, weights_layout)
        teacher_state = None if teacher is None else sharding.place(teacher_state, teacher_layout)
        jit = functools.partial(jit, out_shardings=(state_layout, rep, rep, rep),
                                in_shardings=(state_layout, sharding.batch_sharding(mesh), rep, rep, weights_layout,
                                              teacher_layout))

    @jit
    def update(state, batch, rho, temperature, weights, teacher_state):
        if mesh is not None and weights is not None:  # frozen weights: gathered where read, as _GatherWeights does
            weights = jax.lax.with_sharding_constraint(weights, rep)
        new, loss = svi.update(state, batch, rho, temperature, teacher_logits(teacher_state, batch),
                               weights=weights)
        ok = jnp.isfinite(loss) & _all_finite(svi.get_params(new))
        kept = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, state)
        return kept, loss, ok, new.mutable_state["ppn$metrics"]

    step0, state, nonfinite = run.restore(state)
    history = run.metrics(step0)

    batches = data.train_batches(tokens, cfg.batch_size, cfg.seqlen + 1, cfg.seed, start_step=step0)
    consecutive = 0
    bar = progress_bar(range(step0, cfg.steps), initial=step0, total=cfg.steps, desc="fit",
                       enabled=progress and sharding.is_main_process())
    for step in bar:
        rho, temperature = cfg.sizes(step), cfg.temperature(step)
        tick = time.perf_counter()
        batch = next(batches)
        state, loss, ok, metrics = update(state, jnp.asarray(batch) if mesh is None else
                                          sharding.global_batch(batch, mesh),
                                          jnp.asarray(rho), jnp.float32(temperature), weights, teacher_state)
        ok = bool(ok)
        nonfinite += not ok
        consecutive = 0 if ok else consecutive + 1
        row = _metrics_row(step, float(loss), ok, rho, temperature, metrics) | {
            "seconds": time.perf_counter() - tick}
        history.append(row)
        bar.set_postfix(elbo=f"{-row['loss']:.4g}", nll=f"{row['nll_per_token']:.3f}",
                        size_err=f"{row['size_error']:+.1e}")
        if consecutive > cfg.max_nonfinite:
            run.write_metrics(history)
            raise FloatingPointError(
                f"{consecutive} consecutive steps with a non-finite loss or update (last loss {float(loss)}) "
                f"at step {step}; the last checkpoint in {run.dir} is intact. Lower lr_weights/lr_gates "
                "or check the data.")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            run.write_metrics(history)
            run.save(step + 1, state, nonfinite)

    params = svi.get_params(state)
    fitted = model
    if cfg.train_weights:
        graphdef, fitted_weights, rest = nnx.split(model, nnx.Param, ...)
        nnx.replace_by_pure_dict(fitted_weights, jax.tree.map(lambda x: x.astype(model.dtype), params[WEIGHTS_SITE]))
        fitted = nnx.merge(graphdef, fitted_weights, rest)
    guide_params = {k: sharding.to_host(v) for k, v in params.items() if k != WEIGHTS_SITE}
    return FitResult(model=fitted, units=units, config=cfg, guide_params=guide_params, metrics=history,
                     nonfinite_steps=nonfinite, seconds=time.perf_counter() - start_time)


def _metrics_row(step: int, loss: float, ok: bool, rho: np.ndarray, temperature: float, metrics: dict) -> dict:
    """One line of metrics.jsonl. With a size per sequence, "rho", "expected_size"
    and "offset" are means over the batch, "sizes" lists the sizes and
    "size_error" is the largest error in absolute value."""
    rho = np.atleast_1d(np.asarray(rho, np.float64))
    expected = np.atleast_1d(np.asarray(metrics["expected_size"], np.float64))
    error = expected - rho
    row = {"step": step, "loss": loss, "finite": ok, "rho": float(rho.mean()), "temperature": temperature,
           "nll_per_token": float(metrics["nll"]), "expected_size": float(expected.mean()),
           "size_error": float(error[np.argmax(np.abs(error))]), "offset": float(np.mean(metrics["offset"])),
           "distill_kl": float(metrics["distill_kl"]), "teacher_kl": float(metrics["teacher_kl"])}
    return row | ({"sizes": [round(float(r), 6) for r in rho]} if rho.size > 1 else {})


def mark_done(run_dir: str | os.PathLike) -> None:
    """Marks a run folder finished: later fits into it are refused (written by process 0)."""
    if sharding.is_main_process():
        atomic_write_text(Path(run_dir) / "DONE", time.strftime("%Y-%m-%dT%H:%M:%S\n"))

