"""Fitting the push puppet model: SVI over the gates, together with the network weights.

    result = ppn.fit(model, tokens, FitConfig(steps=300), run_dir="runs/smollm2")

Every step draws target sizes (one for the whole batch, or one per sequence:
`FitConfig.sizes`), a fixed-shape batch of random windows, and a hard-concrete
temperature from a geometric schedule; all three are functions of (seed, step)
only, so a run resumed from a checkpoint replays exactly the steps an unbroken
run would. A step whose loss or new parameters are not finite is skipped (the
state is left as it was) and counted.

This module holds the fit's configuration, its result and `fit`, the run loop:
batches, progress bar, metrics log and checkpoints (`ppn.runs`, written by
process 0 only). The SVI it loops over, one jitted step of fixed shapes that
compiles once, on one device or sharded over a mesh, is `ppn.svi`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import numpy as np
from jax.sharding import Mesh

from ppn import data, priors, sharding
from ppn.console import LOGGER, progress_bar
from ppn.models.llama import Llama
from ppn.runs import elbo_trend
from ppn.diagnostics import diagnose, diagnostic_batch
from ppn.svi import GUIDES, fit_step, fitted_model, init_fit
from ppn.units import SIZE_CURRENCIES, Units

log = logging.getLogger(LOGGER)


# `FitConfig.recommended()`'s fields on top of the defaults (the quality study's combined_lr1e-3_cosine_targets)
RECOMMENDED = dict(teacher="start", teacher_weight=0.5, size_sampling="sequence", sandwich=True, rescale=True,
                   target_sizes=(0.5, 0.3), target_share=0.5, lr_weights=1e-3, lr_decay="cosine", warmup_steps=10)
# fields earlier versions recorded (run folders, plans) and since removed, with the value that meant "off":
# self-distillation from the ungated pass lost to the frozen teacher at every size (results/README.md, quality)
RETIRED = {"distill_weight": 0.0}


def without_retired(record: dict) -> dict:
    """`record` (a recorded FitConfig, as a dict) less the `RETIRED` fields it has at their "off" value."""
    return {k: v for k, v in record.items() if k not in RETIRED or v != RETIRED[k]}


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
            batches, standardised within the hierarchy); "activation" likewise at
            the energy each unit writes into the residual stream
            (`ppn.start.output_energies`); "prior" at the prior medians (all units equal).
        group_width: SwiGLU channels per MLP gate.
        cost, cost_context: what the target size rho measures (`ppn.units.Units.currency`):
            "params" (prunable parameters) or "flops" (FLOPs per token at
            `cost_context` keys, where a query head also pays for its attention
            scores): the push offset holds the expected cost at rho times the
            dense blocks', so the gates learn what to drop for that budget, and
            the plan reads sizes in it.
        prior: a name in `ppn.priors.PRIORS`.
        guide: "normal" (AutoNormal), "lowrank" (AutoLowRankMultivariateNormal)
            or "delta" (AutoDelta: the MAP point, a posterior of zero spread, to
            tell which decisions the posterior's spread changes).
        guide_init_scale: initial scale of the guide.
        lr_weights, lr_gates: Adam learning rates of the network weights and of the guide.
        warmup_steps, lr_decay, weight_decay: the weights' schedule (`ppn.svi.weights_optimizer`):
            a linear warm-up from 0 over `warmup_steps`, then "constant" or "cosine"
            (down to a tenth at the last step), and decoupled weight decay (AdamW);
            for training from scratch. Defaults: none of them.
        train_weights: fit the weights with the gates (False: gates only, weights frozen).
        temperature_start, temperature_end: geometric schedule of the hard-concrete temperature.
        likelihood_temperature: divides the log-likelihood (a tempered posterior; 1 = exact).
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
        anchor_sd: the standard deviation of a Gaussian prior on every trained
            weight centred at its starting (pretrained) value, to keep what the
            model knew beyond the fitting text; its gradient, (w - w0) /
            anchor_sd^2, joins the likelihood's before clipping and Adam
            (`ppn.svi.pull_to_start`). None = a flat prior (no anchor).
        constraint: "offset" (push offset: expected size = rho exactly at every
            step) or "lagrange" (gradient-ascended multipliers; ppn/METHOD.md's
            alternative, kept for comparison).
        data_tokens: tokens the likelihood is scaled to; None = len(tokens).
        checkpoint_every: steps between checkpoints of the run folder.
        checkpoint_min_seconds: a checkpoint falling due sooner than this after
            the last one is skipped (the last step always writes one); keeps fast
            accelerators from spending their time writing checkpoints.
        diagnostics_every: steps between diagnostics (0 = none): the held-out
            ELBO per token at sizes `ppn.diagnostics.DIAGNOSTIC_SIZES`, at the final
            temperature, with `diagnostic_particles` particles, and quantiles of
            the guide's scales, written into that step's metrics row
            (`ppn.diagnostics.diagnose`); at the end the fit says whether the held-out
            ELBO still moves (`ppn.runs.elbo_trend`).
        diagnostic_particles: ELBO particles per size of a diagnostic.
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
    cost: str = "params"
    cost_context: int = 2048
    prior: str = "hierarchical"
    guide: str = "normal"
    guide_init_scale: float = 0.05
    lr_weights: float = 1e-4
    lr_gates: float = 0.05
    warmup_steps: int = 0
    lr_decay: str = "constant"
    weight_decay: float = 0.0
    train_weights: bool = True
    temperature_start: float = 0.66
    temperature_end: float = 0.2
    likelihood_temperature: float = 1.0
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
    anchor_sd: float | None = None
    constraint: str = "offset"
    data_tokens: int | None = None
    checkpoint_every: int = 25
    checkpoint_min_seconds: float = 60.0
    diagnostics_every: int = 25
    diagnostic_particles: int = 2
    max_nonfinite: int = 20
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.seqlen < 2:
            raise ValueError("steps and batch_size must be >= 1 and seqlen >= 2")
        if not 0 < self.rho_min < 1:
            raise ValueError(f"rho_min must lie in (0, 1), got {self.rho_min}")
        priors.get_prior(self.prior)
        if self.cost not in SIZE_CURRENCIES or self.cost_context < 1:
            raise ValueError(f"cost must be one of {', '.join(SIZE_CURRENCIES)} and cost_context a positive number "
                             f"of keys, got {self.cost!r} at {self.cost_context}")
        if self.guide not in GUIDES:
            raise ValueError(f"unknown guide {self.guide!r}; choose one of {', '.join(GUIDES)}")
        if not self.temperature_start > 0 or not self.temperature_end > 0:
            raise ValueError("temperatures must be positive")
        if self.diagnostics_every < 0 or self.diagnostic_particles < 1:
            raise ValueError("diagnostics_every must be >= 0 and diagnostic_particles >= 1")
        if self.checkpoint_every < 1 or self.checkpoint_min_seconds < 0:
            raise ValueError("checkpoint_every must be >= 1 and checkpoint_min_seconds >= 0")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.lr_decay not in ("constant", "cosine"):
            raise ValueError(f"warmup_steps and weight_decay must be >= 0 and lr_decay 'constant' or 'cosine', got "
                             f"{self.warmup_steps}, {self.weight_decay}, {self.lr_decay!r}")
        if not 0 <= self.rho_warmup < 1:
            raise ValueError(f"rho_warmup must lie in [0, 1), got {self.rho_warmup}")
        if self.constraint not in ("offset", "lagrange"):
            raise ValueError(f"unknown size constraint {self.constraint!r}; choose 'offset' or 'lagrange'")
        if self.init not in ("taylor", "activation", "prior"):
            raise ValueError(f"unknown init {self.init!r}; choose 'taylor', 'activation' or 'prior'")
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
        if self.anchor_sd is not None and not (self.anchor_sd > 0 and self.train_weights):
            raise ValueError(f"anchor_sd must be positive and needs train_weights, got {self.anchor_sd} "
                             f"(train_weights={self.train_weights})")
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

    @classmethod
    def from_dict(cls, record: dict) -> FitConfig:
        """The FitConfig a run folder or plan recorded (`dataclasses.asdict`). A `RETIRED` field is dropped
        when it was off, and otherwise named: such a record is of a method ppn no longer has."""
        fields = without_retired(record)
        on = sorted(RETIRED.keys() & fields.keys())
        if on:
            raise ValueError(f"this record uses {', '.join(f'{k}={fields[k]!r}' for k in on)}, an option "
                             "later versions of ppn removed; fit again, or use the version that made it")
        return cls(**fields)

    @classmethod
    def recommended(cls, **overrides) -> FitConfig:
        """The quality options that measured best per training token, on top of the
        defaults: a frozen teacher (the starting weights, weight 0.5), a size per
        sequence with the sandwich, rescaling, half the sampled sizes at 0.5 and 0.3
        (any size still cuts), and lr_weights 1e-3 warmed up over 10 steps and
        cosine-decayed to a tenth. On SmolLM2-135M at 150 steps, on each of seeds 0 and
        1, it beat the same at 6e-4 from 0.7 down and one-shot SparseGPT at 0.5 and 0.3
        (results/quality/combined_lr1e-3_cosine_targets_steps150_seed*.json); at 0.9 it
        is 5 to 7% worse than 6e-4. A step costs about a sixth more than the plain fit's (the
        teacher's forward pass; results/budget/step_cost_*.json). `ppn fit` uses it;
        `overrides` are FitConfig fields."""
        return cls(**(RECOMMENDED | overrides))

    @property
    def train_tokens(self) -> int:
        """Tokens a fit with this budget reads: steps x batch_size windows of seqlen + 1."""
        return self.steps * self.batch_size * (self.seqlen + 1)

    def temperature(self, step: int) -> float:
        frac = step / max(self.steps - 1, 1)
        return self.temperature_start * (self.temperature_end / self.temperature_start) ** frac




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
        data_tokens: the tokens the likelihood was scaled to (`FitConfig.data_tokens`,
            else the training tokens' count).
    """

    model: Llama
    units: Units
    config: FitConfig
    guide_params: dict[str, np.ndarray]
    metrics: list[dict[str, Any]]
    nonfinite_steps: int
    seconds: float
    data_tokens: int


def fit(model: Llama, tokens, config: FitConfig = FitConfig(), run_dir: str | os.PathLike | None = None,
        progress: bool = True, mesh: Mesh | None = None, heldout=None) -> FitResult:
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
        heldout: int array of held-out tokens for the diagnostics' fixed batch
            (its first `batch_size` windows); None: a fixed batch of `tokens`.

    Raises:
        ValueError: a pruned model, or a mesh with an unknown axis, other than
            Auto axis types, or a data x fsdp size that does not divide batch_size.
        FileExistsError: `run_dir` holds a finished run.
        FloatingPointError: more than `max_nonfinite` consecutive non-finite steps.
    """
    start_time = time.perf_counter()
    cfg = config
    setup, state = init_fit(model, tokens, cfg, run_dir, mesh)
    run = setup.run
    history = run.metrics(state.step)
    batches = data.train_batches(np.asarray(tokens), cfg.batch_size, cfg.seqlen + 1, cfg.seed,
                                 start_step=state.step)
    bar = progress_bar(range(state.step, cfg.steps), initial=state.step, total=cfg.steps, desc="fit",
                       enabled=progress and sharding.is_main_process())
    probe = diagnostic_batch(np.asarray(tokens if heldout is None else heldout), cfg)
    for step in bar:
        state, row = fit_step(setup, state, next(batches))
        if cfg.diagnostics_every and state.step % cfg.diagnostics_every == 0:
            row |= diagnose(setup, state, probe)
        history.append(row)
        bar.set_postfix(elbo=f"{-row['loss']:.4g}", nll=f"{row['nll_per_token']:.3f}",
                        size_err=f"{row['size_error']:+.1e}")
        if state.consecutive > cfg.max_nonfinite:
            run.write_metrics(history)
            raise FloatingPointError(
                f"{state.consecutive} consecutive steps with a non-finite loss or update (last loss {row['loss']}) "
                f"at step {step}; the last checkpoint in {run.dir} is intact. Lower lr_weights/lr_gates "
                "or check the data.")
        if run.due(state.step, cfg):
            run.write_metrics(history)
            run.save(state.step, state.svi, state.nonfinite)

    trend = elbo_trend(history)
    if trend is not None:
        log.info("held-out ELBO per token %.4f; its slope over the last third of the fit %+.2e +- %.1e per step: %s",
                 trend["last"], trend["slope"], trend["se"], "flat (converged)" if trend["flat"] else "still moving")
    fitted, guide_params = fitted_model(model, setup, state)
    return FitResult(model=fitted, units=setup.units, config=cfg, guide_params=guide_params, metrics=history,
                     nonfinite_steps=state.nonfinite, seconds=time.perf_counter() - start_time,
                     data_tokens=cfg.data_tokens or len(tokens))
