"""The push puppet fit: the NumPyro model, SVI, resume, bad input, and the plan it yields."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import ppn
from ppn import bayes
from ppn.fit import FitConfig, fit, mark_done
from ppn.units import Units
from ppn.plan import Plan
from ppn.prune import prune
from ppn.testing import smoke_fit_config, tiny_config, tiny_model, tiny_tokens

TOKENS = tiny_tokens()
SMALL = smoke_fit_config()


@pytest.fixture
def fitted(tiny_fit):
    return tiny_fit


@pytest.fixture
def plan(tiny_plan):
    return tiny_plan


# ---------------------------------------------------------------- the model
@pytest.mark.parametrize("prior", list(bayes.PRIORS))
def test_expected_size_equals_rho_whatever_the_likelihood_scale(prior):
    model = tiny_model()
    units = Units(model.config, 16)
    batch = jnp.asarray(TOKENS[:34].reshape(2, 17))
    for data_tokens in (10, 10**7):
        for rho in (0.25, 0.6, 0.95):
            with numpyro.handlers.seed(rng_seed=1):
                tr = numpyro.handlers.trace(bayes.push_puppet_model).get_trace(
                    batch, jnp.float32(rho), jnp.float32(0.5), network=model, units=units, prior=prior,
                    data_tokens=data_tokens)
            assert abs(float(tr["ppn$metrics"]["value"]["expected_size"]) - rho) < 1e-4


def test_push_offset_gradient_follows_the_implicit_function():
    units = Units(tiny_config(), 16)
    rng = np.random.default_rng(0)
    logits = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in bayes._shapes(units).items()}
    rho, temp = jnp.float32(0.4), 0.5

    def offset(scale):
        return bayes.push_offset(units, {k: v * scale for k, v in logits.items()}, rho, temp)

    eps = 1e-2
    numeric = (offset(1 + eps) - offset(1 - eps)) / (2 * eps)
    assert abs(float(jax.grad(offset)(1.0)) - float(numeric)) < 2e-2 * max(1.0, abs(float(numeric)))


@pytest.mark.parametrize("shift", [-300.0, 0.0, 250.0])
def test_push_offset_meets_the_size_wherever_the_logits_drift(shift):
    units = Units(tiny_config(), 16)
    rng = np.random.default_rng(1)
    logits = {k: jnp.asarray(rng.normal(size=s) * 3 + shift, jnp.float32) for k, s in bayes._shapes(units).items()}
    for rho in (0.2, 0.7):
        c = bayes.push_offset(units, logits, jnp.float32(rho), 0.3)
        p = {k: bayes.open_probability(v - c, 0.3) for k, v in logits.items()}
        assert abs(float(bayes.expected_size(units, p)) / units.total - rho) < 1e-4


def test_hard_concrete_has_exact_zeros_and_ones_and_the_stated_open_probability():
    logit = jnp.full((20000,), 0.3)
    z = bayes.sample_hard_concrete(jax.random.key(0), logit, 0.5)
    assert float((z == 0).mean()) > 0.05 and float((z == 1).mean()) > 0.05
    assert abs(float((z > 0).mean()) - float(bayes.open_probability(jnp.float32(0.3), 0.5))) < 0.01


def test_unknown_prior_is_refused():
    with pytest.raises(ValueError, match="unknown prior 'horse'"):
        FitConfig(prior="horse")


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
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(SMALL.steps))
    assert all(abs(r["size_error"]) < 1e-4 for r in result.metrics)
    assert result.nonfinite_steps == 0


def test_fit_trains_weights_and_can_freeze_them(fitted):
    before = nnx.state(tiny_model(), nnx.Param)
    after = nnx.state(fitted.model, nnx.Param)
    assert any(float(jnp.abs(a - b).max()) > 0 for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    frozen = fit(tiny_model(), TOKENS, FitConfig(**{**SMALL.__dict__, "train_weights": False, "steps": 3}),
                 progress=False)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(nnx.state(frozen.model, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _killed_at(monkeypatch, kill_step: int, train):
    """Runs `train()` with the batch stream dying at `kill_step` (a kill mid-run), then restores it."""
    from ppn import data

    original = data.train_batches

    def dying(*args, start_step=0, **kwargs):
        for i, batch in enumerate(original(*args, start_step=start_step, **kwargs)):
            if start_step + i == kill_step:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(data, "train_batches", dying)
    with pytest.raises(KeyboardInterrupt):
        train()
    monkeypatch.setattr(data, "train_batches", original)


def _assert_same_weights(a, b):
    for x, y in zip(jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b, nnx.Param)), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_resume_after_a_kill_equals_an_unbroken_run(tmp_path, monkeypatch):
    cfg = FitConfig(**{**SMALL.__dict__, "steps": 7, "checkpoint_every": 3})
    unbroken = fit(tiny_model(), TOKENS, cfg, run_dir=tmp_path / "a", progress=False)
    # killed after the checkpoint at step 3, mid-way to the next
    _killed_at(monkeypatch, 5, lambda: fit(tiny_model(), TOKENS, cfg, run_dir=tmp_path / "b", progress=False))
    resumed = fit(tiny_model(), TOKENS, cfg, run_dir=tmp_path / "b", progress=False)
    assert [r["step"] for r in resumed.metrics] == list(range(7))
    for k, v in unbroken.guide_params.items():
        np.testing.assert_allclose(resumed.guide_params[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
    _assert_same_weights(unbroken.model, resumed.model)


def test_a_finished_run_is_not_overwritten(tmp_path):
    fit(tiny_model(), TOKENS, FitConfig(**{**SMALL.__dict__, "steps": 2}), run_dir=tmp_path / "r", progress=False)
    mark_done(tmp_path / "r")
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match="holds a finished run"):
        fit(tiny_model(), TOKENS, SMALL, run_dir=tmp_path / "r", progress=False)
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before


def test_resuming_with_another_config_is_refused(tmp_path):
    fit(tiny_model(), TOKENS, FitConfig(**{**SMALL.__dict__, "steps": 2}), run_dir=tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="another configuration"):
        fit(tiny_model(), TOKENS, FitConfig(**{**SMALL.__dict__, "steps": 2, "lr_gates": 0.5}),
            run_dir=tmp_path / "r", progress=False)


def test_non_finite_weights_are_reported_before_training(tmp_path):
    model = tiny_model()
    model.embed[...] = jnp.full_like(model.embed[...], jnp.nan)
    with pytest.raises(FloatingPointError, match="not finite at the initial parameters"):
        fit(model, TOKENS, SMALL, run_dir=tmp_path / "nan", progress=False)


def test_diverging_steps_are_skipped_then_stop_the_fit(tmp_path):
    cfg = FitConfig(**{**SMALL.__dict__, "steps": 8, "max_nonfinite": 2, "lr_gates": 1e38})
    with pytest.raises(FloatingPointError, match="3 consecutive steps with a non-finite loss or update"):
        fit(tiny_model(), TOKENS, cfg, run_dir=tmp_path / "div", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "div" / "metrics.jsonl").read_text().splitlines()]
    assert [r["finite"] for r in rows][-3:] == [False] * 3


def test_fit_refuses_a_pruned_model(plan):
    pruned = prune(tiny_model(), plan, 0.5)
    with pytest.raises(ValueError, match="dense model"):
        fit(pruned, TOKENS, SMALL, progress=False)


# --------------------------------------------------------------------- plan
def test_plan_round_trips_and_resizes_without_a_model(plan, tmp_path):
    path = plan.save(tmp_path / "plan.json")
    assert path.stat().st_size < 64_000
    loaded = Plan.load(path)
    for name, site in plan.sites.items():  # the short decimals read back to the same float32 values
        np.testing.assert_array_equal(loaded.sites[name].loc, site.loc)
        np.testing.assert_array_equal(loaded.sites[name].scale, site.scale)
    for size in (0.3, 0.5, 0.9, 1.0, 2000):
        assert loaded.keep(size) == plan.keep(size)
    doc = json.loads(path.read_text())
    assert set(doc["gates"]["alpha_head"]) >= {"mean", "sd", "q05", "q50", "q95"}
    assert np.asarray(doc["gates"]["alpha_head"]["mean"]).shape == (2, 4)


@settings(max_examples=60, deadline=None)
@given(st.floats(0.02, 1.0))
def test_keep_lands_within_one_unit_of_the_target(plan, size):
    u = plan.units
    budget = u.budget(size)
    kept = plan.keep(size).num_params()
    largest_unit = max(u.head_cost + u.kv_cost + u.attn_fixed_cost, int(u.group_costs.max()) + u.mlp_fixed_cost)
    assert budget - largest_unit < kept <= budget


def test_kept_size_grows_with_the_target(plan):
    u = plan.units
    largest_unit = max(u.head_cost + u.kv_cost + u.attn_fixed_cost, int(u.group_costs.max()) + u.mlp_fixed_cost)
    sizes = np.arange(largest_unit, u.total + 1, largest_unit)
    kept = [plan.keep(int(s)).num_params() for s in sizes]
    assert all(b >= a for a, b in zip(kept, kept[1:]))


def test_keep_is_deterministic_and_probabilities_are_probabilities(plan, tmp_path):
    assert plan.keep(0.45) == Plan.load(plan.save(tmp_path / "p.json")).keep(0.45)
    p = plan.keep_probability(0.5, num_samples=40)
    assert p["head"].shape == (2, 4) and p["mlp_group"].shape == (2, 3)
    assert all(((v >= 0) & (v <= 1)).all() for v in p.values())


def test_pruned_parameter_count_equals_the_plans(plan, fitted):
    for size in (0.3, 0.7):
        pruned = prune(fitted.model, plan, size)
        assert pruned.config.num_prunable_params() == plan.keep(size).num_params()


def test_arviz_export_has_named_dims(plan):
    idata = plan.to_arviz(num_samples=30)
    assert idata.posterior["alpha_head"].dims == ("chain", "draw", "layer", "head")
    assert idata.posterior["beta_mlp_group"].shape == (1, 30, 2, 3)


def test_plan_used_with_another_model_is_refused(plan):
    other = tiny_model(num_heads=8, num_kv_heads=2)
    with pytest.raises(ValueError, match="another architecture"):
        prune(other, plan, 0.5)


@pytest.mark.parametrize("corrupt", [
    lambda d: "{ not json",
    lambda d: json.dumps({**d, "format": "something/9"}),
    lambda d: json.dumps({**d, "sites": {**d["sites"], "alpha0": {**d["sites"]["alpha0"], "scale": -1.0}}}),
    lambda d: json.dumps({k: v for k, v in d.items() if k != "config"}),
    lambda d: json.dumps({**d, "sites": {k: v for k, v in d["sites"].items() if k != "delta"}}),
])
def test_corrupt_plan_files_are_refused(plan, tmp_path, corrupt):
    path = plan.save(tmp_path / "p.json")
    path.write_text(corrupt(json.loads(path.read_text())))
    with pytest.raises(ValueError, match="is not a valid ppn plan"):
        Plan.load(path)


def test_missing_plan_file():
    with pytest.raises(FileNotFoundError, match="no plan file"):
        Plan.load("/no/such/plan.json")


def test_synthetic_recovery_useless_units_are_dropped_first():
    """Units whose weights are zero contribute nothing; the fit must rank them last."""
    teacher = tiny_model(seed=7, num_kv_heads=4)
    graphdef, state = nnx.split(teacher)
    teacher = nnx.merge(graphdef, jax.tree.map(lambda x: x * 12.0 if x.ndim > 1 else x, state))
    dead_heads = [(0, 1), (1, 2)]
    for layer, head in dead_heads:
        o = teacher.blocks[layer].attn.o
        o[...] = o[...].at[:, head].set(0.0)
    for layer in (0, 1):
        down = teacher.blocks[layer].mlp.down
        down[...] = down[...].at[:, :16].set(0.0)  # group 0 of width 16
    tokens = ppn.generate(teacher, np.zeros((64, 1), np.int32), 63, temperature=1.0, seed=0).reshape(-1)
    # init="prior": every unit starts equal, so the ranking must come from SVI itself.
    cfg = FitConfig(steps=150, batch_size=8, seqlen=32, group_width=16, train_weights=False, lr_gates=0.05,
                    rho_min=0.3, init="prior")
    plan = Plan.from_fit(fit(teacher, tokens, cfg, progress=False))
    p = plan.keep_probability(0.5, num_samples=100)
    # Within its layer (the hierarchy pools units toward their layer, so a dead unit
    # of a vital layer may still outrank live units of a weak one), a dead unit is
    # less likely to be kept than the live ones.
    for layer, head in dead_heads:
        live = np.delete(p["head"][layer], head)
        assert p["head"][layer, head] < live.mean(), (layer, p["head"])
    for layer in (0, 1):
        assert p["mlp_group"][layer, 0] < p["mlp_group"][layer, 1:].mean(), p["mlp_group"]
    assert not plan.keep(0.5).groups[:, 0].any()


def test_taylor_importance_of_a_dead_unit_is_zero():
    from ppn.fit import gate_gradients

    model = tiny_model(seed=3)
    model.blocks[0].attn.o[...] = model.blocks[0].attn.o[...].at[:, 2].set(0.0)
    model.blocks[1].mlp.down[...] = model.blocks[1].mlp.down[...].at[:, 16:32].set(0.0)
    g = gate_gradients(model, Units(model.config, 16), [TOKENS[:34].reshape(2, 17)])
    assert g["head"][0, 2] == 0 and g["mlp_group"][1, 1] == 0
    assert (np.delete(g["head"][0], 2) > 0).all() and (g["mlp_group"][0] > 0).all()


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
])
def test_bad_quality_options_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        FitConfig(**overrides)


def test_a_teacher_with_another_vocabulary_or_too_big_is_refused(tmp_path, monkeypatch):
    from ppn.fit import load_teacher

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


def test_resuming_with_another_teacher_or_loss_is_refused_naming_it(tmp_path):
    from ppn.fit import RunFolder

    base = FitConfig(**{**SMALL.__dict__, "teacher": "start", "teacher_weight": 0.5})
    RunFolder(tmp_path, base, tiny_model())
    for change, name in ((dict(teacher_weight=1.0), "teacher_weight"), (dict(teacher=str(tmp_path)), "teacher")):
        with pytest.raises(ValueError, match=f"another configuration \\({name} "):
            RunFolder(tmp_path, FitConfig(**{**base.__dict__, **change}), tiny_model())


def test_the_quality_options_fit_and_their_plan_cuts_like_the_gated_model(tmp_path):
    """Teacher, sizes per sequence with sandwich, and rescaling together: the
    teacher's KL is logged, every sequence meets its own size, the plan carries
    the rescaling through a file, and its cut equals the hard-gated network."""
    from ppn.prune import hard_gates

    cfg = FitConfig(steps=4, batch_size=3, seqlen=16, group_width=16, checkpoint_every=2, teacher="start",
                    teacher_weight=0.5, sandwich=True, rescale=True, lr_rescale=0.05)
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


def test_self_distillation_is_logged():
    cfg = FitConfig(**{**SMALL.__dict__, "steps": 3, "distill_weight": 1.0})
    result = fit(tiny_model(), TOKENS, cfg, progress=False)
    assert all(r["distill_kl"] >= 0 for r in result.metrics) and any(r["distill_kl"] > 0 for r in result.metrics)


def test_soft_gates_lie_in_the_unit_interval_and_drive_the_gated_model(plan, fitted):
    """Soft gates are in [0, 1], one BlockGates per block, and perplexity runs through them."""
    gates = plan.soft_gates(0.5)
    assert len(gates) == plan.units.num_layers
    for g in gates:
        for v in (g.attn, g.heads, g.mlp, g.channels):
            assert float(v.min()) >= 0 and float(v.max()) <= 1
    ppl = ppn.perplexity(fitted.model, TOKENS[:512], seqlen=64, gates=gates, progress=False).perplexity
    assert np.isfinite(ppl) and ppl > 1


def test_median_soft_gates_are_the_louizos_gates_sharpened_by_the_temperature(plan):
    louizos, median = plan.soft_gates(0.5, 0.2), plan.soft_gates(0.5, 0.2, "median")
    lo, hi = bayes.STRETCH_LO, bayes.STRETCH_HI
    for a, b in zip(louizos, median):
        for x, y in ((a.heads, b.heads), (a.channels, b.channels)):
            x, y = np.asarray(x), np.asarray(y)
            # both are monotone in the same (eta - c): open and closed units agree, and the
            # median's sigmoid argument is 5x the Louizos one, so it sits no nearer 1/2
            assert ((x > 0.5) == (y > 0.5)).all()
            sx, sy = (np.clip((v - lo) / (hi - lo), 1e-6, 1 - 1e-6) for v in (x, y))
            assert (np.abs(sy - 0.5) >= np.abs(sx - 0.5) - 1e-6).all()
    with pytest.raises(ValueError, match="estimator"):
        plan.soft_gates(0.5, estimator="mean")


def test_finetune_learns_a_repeating_text_and_leaves_the_input_model_alone():
    from ppn.harness.finetune import finetune

    model = tiny_model()
    before = [np.asarray(x).copy() for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    tokens = np.tile(np.arange(10), 400)
    result = finetune(model, tokens, FitConfig(steps=40, batch_size=4, seqlen=16, lr_weights=3e-3), progress=False)
    assert np.mean(result.nll[-5:]) < 0.5 * np.mean(result.nll[:5])
    for a, b in zip(before, jax.tree.leaves(nnx.state(model, nnx.Param))):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_masked_finetune_keeps_the_zeros_of_a_sparse_model():
    from ppn.harness.finetune import finetune

    model = tiny_model()
    model.blocks[0].mlp.down[...] = model.blocks[0].mlp.down[...].at[:, ::2].set(0.0)
    tokens = np.tile(np.arange(10), 400)
    cfg = FitConfig(steps=5, batch_size=2, seqlen=16, lr_weights=3e-3)
    tuned = finetune(model, tokens, cfg, progress=False, keep_zeros=True).model
    down, before = np.asarray(tuned.blocks[0].mlp.down[...]), np.asarray(model.blocks[0].mlp.down[...])
    assert (down[:, ::2] == 0).all() and (np.abs(down[:, 1::2] - before[:, 1::2]) > 0).mean() > 0.9
    free = np.asarray(finetune(model, tokens, cfg, progress=False).model.blocks[0].mlp.down[...])
    assert (free[:, ::2] != 0).mean() > 0.9  # without the mask the zeros move


def test_finetune_killed_and_resumed_equals_an_unbroken_run(tmp_path, monkeypatch):
    from ppn.harness.finetune import finetune

    cfg = FitConfig(steps=7, batch_size=2, seqlen=16, lr_weights=3e-3, checkpoint_every=3)
    unbroken = finetune(tiny_model(), TOKENS, cfg, progress=False)
    _killed_at(monkeypatch, 5, lambda: finetune(tiny_model(), TOKENS, cfg, progress=False, run_dir=tmp_path))
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    resumed = finetune(tiny_model(), TOKENS, cfg, progress=False, run_dir=tmp_path)
    np.testing.assert_allclose(resumed.nll, unbroken.nll, rtol=1e-6)
    _assert_same_weights(unbroken.model, resumed.model)
    with pytest.raises(ValueError, match="another configuration"):
        finetune(tiny_model(), TOKENS, FitConfig(**{**cfg.__dict__, "steps": 8}), progress=False, run_dir=tmp_path)


def test_expected_size_matches_monte_carlo_over_bernoulli_gates():
    units = Units(tiny_config(), 16)
    rng = np.random.default_rng(1)
    p = {k: rng.uniform(0.1, 0.9, s) for k, s in bayes._shapes(units).items()}
    draws = 4000
    total = 0
    for _ in range(draws):
        z = {k: rng.random(v.shape) < v for k, v in p.items()}
        total += ppn.KeepSet(units, z["attn_layer"], z["mlp_layer"], z["head"], z["mlp_group"]).num_params()
    expected = float(bayes.expected_size(units, {k: jnp.asarray(v) for k, v in p.items()}))
    # exact up to the norms, which the expectation counts with the layer gate alone
    assert abs(total / draws - expected) < 0.01 * units.total


def test_lagrange_multipliers_are_ascended():
    # the optimiser descends the loss; through _ascend the multipliers climb the penalty instead
    assert float(jax.grad(lambda x: bayes._ascend(x) ** 2)(3.0)) == -6.0
    cfg = FitConfig(**{**SMALL.__dict__, "steps": 8, "constraint": "lagrange", "lr_gates": 0.1})
    result = fit(tiny_model(), TOKENS, cfg, progress=False)
    lam = result.guide_params["size_lagrange"]
    assert lam[1] > 0  # the quadratic multiplier only grows while the size is off target
    errors = [r["size_error"] for r in result.metrics]
    assert all(np.isfinite(errors)) and max(abs(e) for e in errors) > 1e-4  # no offset: not exact
    assert Plan.from_fit(result).keep(0.5).num_params() <= Units(tiny_config(), 16).budget(0.5)


def test_unknown_constraint_is_refused():
    with pytest.raises(ValueError, match="unknown size constraint 'soft'"):
        FitConfig(constraint="soft")


def test_lowrank_guide_gives_a_plan_of_its_marginals():
    from numpyro.infer.autoguide import AutoLowRankMultivariateNormal

    from ppn.fit import _network_model

    cfg = FitConfig(**{**SMALL.__dict__, "steps": 3, "guide": "lowrank", "init": "prior"})
    result = fit(tiny_model(), TOKENS, cfg, progress=False)
    plan = Plan.from_fit(result)
    # the guide's own per-site medians (constrained) equal the plan's site locations
    guide = AutoLowRankMultivariateNormal(_network_model(result.model, result.units, cfg, len(TOKENS)))
    batch = jnp.zeros((cfg.batch_size, cfg.seqlen + 1), jnp.int32)
    with numpyro.handlers.seed(rng_seed=0):
        guide(batch, jnp.float32(0.5), jnp.float32(0.5))
    medians = guide.median({k: jnp.asarray(v) for k, v in result.guide_params.items()})
    for name, site in plan.sites.items():
        expected = np.log(medians[name]) if site.positive else medians[name]
        np.testing.assert_allclose(site.loc, expected, rtol=1e-5, atol=1e-5, err_msg=name)
        assert np.all(site.scale > 0)
    assert plan.keep(0.5).num_params() <= plan.units.budget(0.5)
