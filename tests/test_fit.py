"""The push puppet fit: SVI, its starting values and teacher, bad input, and the training options
(run folders and resuming: tests/test_runs.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ppn
from ppn import bayes, plots
from ppn.fit import FitConfig, fit
from ppn.units import Units
from ppn.plan import Plan
from ppn.prune import prune
from ppn.runs import elbo_trend, read_metrics
from ppn.diagnostics import DIAGNOSTIC_SIZES
from ppn.testing import smoke_fit_config, tiny_config, tiny_model, tiny_tokens

TOKENS = tiny_tokens()
SMALL = smoke_fit_config()


@pytest.fixture
def fitted(tiny_fit):
    return tiny_fit


@pytest.fixture
def plan(tiny_plan):
    return tiny_plan


# ---------------------------------------------------------------------- fit
def test_fit_compiles_once_and_logs_every_step(tmp_path):
    traces = []
    original = bayes.push_puppet_model

    def counting(*args, **kwargs):
        traces.append(1)
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bayes, "push_puppet_model", counting)
        result = fit(tiny_model(), TOKENS, SMALL, run_dir=tmp_path / "run", progress=False)
    # init traces the model and the guide's prototype; the jitted update traces it
    # for the model and the guide once each: the count must not grow with steps.
    assert len(traces) <= 5
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(SMALL.steps))
    assert all(abs(r["size_error"]) < 1e-4 for r in result.metrics)
    assert result.nonfinite_steps == 0


def test_init_fit_and_fit_step_are_the_fit_one_step_at_a_time(fitted):
    from ppn import data
    from ppn.svi import fit_step, init_fit

    setup, state = init_fit(tiny_model(), TOKENS, SMALL)
    batches = data.train_batches(TOKENS, SMALL.batch_size, SMALL.seqlen + 1, SMALL.seed)
    for expected in fitted.metrics[:2]:
        state, row = fit_step(setup, state, next(batches))
        assert row["step"] == expected["step"] and row["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert (state.step, state.nonfinite, state.consecutive) == (2, 0, 0)


def test_fit_trains_weights_and_can_freeze_them(fitted):
    before = nnx.state(tiny_model(), nnx.Param)
    after = nnx.state(fitted.model, nnx.Param)
    assert any(float(jnp.abs(a - b).max()) > 0 for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    frozen = fit(tiny_model(), TOKENS, smoke_fit_config(train_weights=False, steps=3), progress=False)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(nnx.state(frozen.model, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pull_to_start_adds_the_gradient_of_a_gaussian_prior_at_the_starting_weights():
    from ppn.svi import pull_to_start

    tx = pull_to_start(4.0)
    start = {"w": jnp.array([1.0, -2.0])}
    state = tx.init(start)
    grads, moved = {"w": jnp.array([0.5, 0.5])}, {"w": jnp.array([1.5, -3.0])}
    updates, state = tx.update(grads, state, moved)
    np.testing.assert_allclose(updates["w"], [0.5 + 4.0 * 0.5, 0.5 - 4.0 * 1.0])
    np.testing.assert_array_equal(state["w"], start["w"])  # w0 stays the starting weights


def test_an_anchored_fit_stays_closer_to_the_starting_weights():
    def distance(result):
        start = jax.tree.leaves(nnx.state(tiny_model(), nnx.Param))
        return sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(start, jax.tree.leaves(nnx.state(result.model,
                                                                                                   nnx.Param))))
    cfg = smoke_fit_config(steps=4, lr_weights=1e-2)
    free = fit(tiny_model(), TOKENS, cfg, progress=False)
    anchored = fit(tiny_model(), TOKENS, smoke_fit_config(steps=4, lr_weights=1e-2, anchor_sd=1e-3), progress=False)
    assert distance(anchored) < 0.5 * distance(free)


def test_a_model_fits_twice_and_keeps_its_weights():
    """The step donates its state; the caller's model must survive (a notebook fits one model many times)."""
    model = tiny_model()
    first = fit(model, TOKENS, smoke_fit_config(steps=2), progress=False)
    second = fit(model, TOKENS, smoke_fit_config(steps=2), progress=False)
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(tiny_model(), nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert first.metrics[-1]["loss"] == pytest.approx(second.metrics[-1]["loss"], rel=1e-6)


def test_non_finite_weights_are_reported_before_training(tmp_path):
    model = tiny_model()
    model.embed[...] = jnp.full_like(model.embed[...], jnp.nan)
    with pytest.raises(FloatingPointError, match="not finite at the initial parameters"):
        fit(model, TOKENS, SMALL, run_dir=tmp_path / "nan", progress=False)


def test_diverging_steps_are_skipped_then_stop_the_fit(tmp_path):
    cfg = smoke_fit_config(steps=8, max_nonfinite=2, lr_gates=1e38)
    with pytest.raises(FloatingPointError, match="3 consecutive steps with a non-finite loss or update"):
        fit(tiny_model(), TOKENS, cfg, run_dir=tmp_path / "div", progress=False)
    assert [r["finite"] for r in read_metrics(tmp_path / "div")][-3:] == [False] * 3


def test_fit_refuses_a_pruned_model(plan):
    pruned = prune(tiny_model(), plan, 0.5)
    with pytest.raises(ValueError, match="dense model"):
        fit(pruned, TOKENS, SMALL, progress=False)


def test_size_warmup_starts_near_one_and_then_covers_the_range():
    cfg = FitConfig(steps=1000, rho_min=0.2, rho_warmup=0.3)
    early = [cfg.sizes(s) for s in range(10)]
    late = [cfg.sizes(s) for s in range(300, 1000)]
    assert np.shape(early[0]) == () and min(early) > 0.95 and min(late) < 0.22 and max(late) > 0.98
    assert cfg.sizes(123) == FitConfig(steps=1000, rho_min=0.2, rho_warmup=0.3).sizes(123)
    assert min(FitConfig(steps=1000, rho_warmup=0.0).sizes(s) for s in range(50)) < 0.4


def test_sizes_per_sequence_sandwich_and_targets():
    cfg = FitConfig(steps=100, batch_size=4, size_sampling="sequence", rho_warmup=0.0)
    draws = np.stack([cfg.sizes(s) for s in range(200)])
    assert draws.shape == (200, 4) and draws.dtype == np.float32
    assert np.abs(np.corrcoef(draws[:, 0], draws[:, 1])[0, 1]) < 0.2  # independent per sequence
    assert 0.2 <= draws.min() and draws.max() <= 1
    sandwich = FitConfig(steps=100, batch_size=4, sandwich=True, rho_warmup=0.5)
    for step in (0, 10, 60):
        rho = sandwich.sizes(step)
        low = 1 - 0.8 * min(1.0, max(0.05, step / 50))
        assert rho[0] == 1.0 and rho[-1] == np.float32(low) and (rho[1:-1] >= np.float32(low)).all()
    targeted = FitConfig(steps=100, batch_size=4, size_sampling="sequence", rho_warmup=0.0,
                         target_sizes=(0.5, 0.3), target_share=0.5)
    draws = np.concatenate([targeted.sizes(s) for s in range(500)])
    share = np.isin(draws, np.float32([0.5, 0.3])).mean()
    assert 0.4 < share < 0.6 and (draws < 0.3).mean() > 0.02  # the rest stays uniform: every size is trained


@pytest.mark.parametrize("overrides, match", [
    (dict(target_sizes=(0.5, 1.2)), "target sizes must lie in"), (dict(target_sizes=(0.0,)), "target sizes"),
    (dict(teacher="start"), "teacher_weight > 0"), (dict(teacher_weight=0.5), "needs a teacher"),
    (dict(sandwich=True, batch_size=2), "sandwich needs batch_size"), (dict(size_sampling="token"), "size_sampling"),
    (dict(teacher="start", teacher_weight=0.5, teacher_temperature=0.0), "teacher_temperature"),
    (dict(anchor_sd=0.0), "anchor_sd must be positive"), (dict(anchor_sd=0.1, train_weights=False), "train_weights"),
])
def test_bad_quality_options_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        FitConfig(**overrides)


def test_a_teacher_with_another_vocabulary_or_too_big_is_refused(tmp_path, monkeypatch):
    from ppn.start import load_teacher

    other = ppn.save_model(tiny_model(vocab_size=50), tmp_path / "other")
    with pytest.raises(ValueError, match="vocabulary of 50 tokens"):
        load_teacher(tiny_model(), FitConfig(teacher=str(other), teacher_weight=0.5))
    same = ppn.save_model(tiny_model(seed=1), tmp_path / "same")
    teacher = load_teacher(tiny_model(), FitConfig(teacher=str(same), teacher_weight=0.5, teacher_dtype="bfloat16"))
    assert teacher.dtype == jnp.bfloat16
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("M", (), {"available": 1000})())
    with pytest.raises(MemoryError, match="GiB for its weights"):
        load_teacher(tiny_model(), FitConfig(teacher=str(same), teacher_weight=0.5))
    with pytest.raises(FileNotFoundError):
        load_teacher(tiny_model(), FitConfig(teacher=str(tmp_path / "nowhere"), teacher_weight=0.5))


def test_the_quality_options_fit_and_their_plan_cuts_like_the_gated_model(tmp_path):
    """Teacher, sizes per sequence with sandwich, and rescaling together: the
    teacher's KL is logged, every sequence meets its own size, the plan carries
    the rescaling through a file, and its cut equals the hard-gated network."""
    from ppn.gates import hard_gates

    cfg = smoke_fit_config(steps=4, batch_size=3, checkpoint_every=2, teacher="start", teacher_weight=0.5,
                           sandwich=True, rescale=True, lr_rescale=0.05)
    result = fit(tiny_model(), TOKENS, cfg, progress=False)
    assert all(len(r["sizes"]) == 3 and r["sizes"][0] == 1.0 for r in result.metrics)
    assert all(abs(r["size_error"]) < 2e-3 for r in result.metrics)
    assert any(r["teacher_kl"] > 0 for r in result.metrics)
    plan = Plan.load(Plan.from_fit(result).save(tmp_path / "plan.json"))
    assert plan.rescale is not None and np.abs(plan.rescale["head"]).max() > 0.01
    keep = plan.keep(0.5)
    ids = TOKENS[:32].reshape(2, 16)
    np.testing.assert_allclose(np.asarray(prune(result.model, plan, 0.5)(ids)),
                               np.asarray(result.model(ids, gates=hard_gates(keep))), atol=1e-5)


def test_lagrange_multipliers_are_ascended():
    # the optimiser descends the loss; through _ascend the multipliers climb the penalty instead
    assert float(jax.grad(lambda x: bayes._ascend(x) ** 2)(3.0)) == -6.0
    cfg = smoke_fit_config(steps=8, constraint="lagrange", lr_gates=0.1)
    result = fit(tiny_model(), TOKENS, cfg, progress=False)
    lam = result.guide_params["size_lagrange"]
    assert lam[1] > 0  # the quadratic multiplier only grows while the size is off target
    errors = [r["size_error"] for r in result.metrics]
    assert all(np.isfinite(errors)) and max(abs(e) for e in errors) > 1e-4  # no offset: not exact
    assert Plan.from_fit(result).keep(0.5).num_params() <= Units(tiny_config(), 16).budget(0.5)


def test_unknown_constraint_is_refused():
    with pytest.raises(ValueError, match="unknown size constraint 'soft'"):
        FitConfig(constraint="soft")


def test_diagnostics_log_a_heldout_elbo_and_guide_scales_every_n_steps():
    heldout = tiny_tokens(seed=9)
    result = fit(tiny_model(), TOKENS, smoke_fit_config(diagnostics_every=2, diagnostic_particles=2),
                 progress=False, heldout=heldout)
    rows = [m for m in result.metrics if "heldout_elbo" in m]
    assert [m["step"] for m in rows] == [1, 3, 5]  # rows are numbered from 0; a diagnostic follows every 2nd step
    for m in rows:
        assert len(m["heldout_elbo_by_size"]) == len(DIAGNOSTIC_SIZES)
        assert np.isfinite(m["heldout_elbo_by_size"]).all() and max(m["heldout_elbo_by_size"]) < 0
        assert np.isclose(m["heldout_elbo"], np.mean(m["heldout_elbo_by_size"]))
        assert 0 < m["guide_scale_q05"] <= m["guide_scale_q50"] <= m["guide_scale_q95"]
    trend = elbo_trend(result.metrics)
    assert trend["points"] == 3 and trend["last"] == rows[-1]["heldout_elbo"]
    fig = plots.training_curves(result.metrics)
    assert len(fig.axes) == 4


def test_elbo_trend_tells_a_flat_curve_from_a_rising_one():
    rng = np.random.default_rng(0)
    flat = [{"step": s, "heldout_elbo": -3.0 + 0.01 * rng.normal()} for s in range(0, 300, 10)]
    rising = [{"step": s, "heldout_elbo": -3.0 + 0.001 * s + 0.01 * rng.normal()} for s in range(0, 300, 10)]
    assert elbo_trend(flat)["flat"] and not elbo_trend(rising)["flat"]
    assert elbo_trend(rising)["slope"] == pytest.approx(0.001, rel=0.2) and elbo_trend(flat[:2]) is None
    with pytest.raises(ValueError, match="diagnostics_every"):
        FitConfig(diagnostics_every=-1)
