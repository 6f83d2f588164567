"""Decisions under uncertainty: sampled keep-sets, the quality band, the smallest size meeting a bar."""

import dataclasses

import numpy as np
import pytest

from ppn import plots
from ppn.decisions import (ablation_damage, calibration_error, ensemble_metrics, keep_disagreement, keep_margins,
                           mismatch, quality_band, selective_accuracy, smallest_size)
from ppn.evaluate import perplexity
from ppn.gates import hard_gates
from ppn.plan import Plan
from ppn.prune import prune
from ppn.testing import peaked_model_and_text, random_plan, tiny_config, tiny_model, tiny_tokens

SEQLEN, WINDOWS = 16, 6
BAND = dict(seqlen=SEQLEN, max_windows=WINDOWS, num_bootstrap=50, progress=False)


def _sharpened(plan: Plan, factor: float) -> Plan:
    """The plan with its guide locations multiplied by `factor` and no spread."""
    sites = {k: dataclasses.replace(s, loc=s.loc * factor, scale=np.zeros_like(s.scale))
             for k, s in plan.sites.items()}
    return dataclasses.replace(plan, sites=sites)


def _max_unit_cost(units) -> int:
    return max(units.head_cost + units.kv_cost + units.attn_fixed_cost,
               int(units.group_costs.max()) + units.mlp_fixed_cost)


@pytest.mark.parametrize("rescale", [False, True])
def test_sampled_keep_sets_are_at_the_size_vary_and_prune_to_their_gated_network(rescale):
    plan, model = random_plan(tiny_config(), rescale=rescale), tiny_model()
    size = 0.5
    budget = plan.units.budget(size)
    draws = plan.sample_keep(size, num_samples=12, seed=3)
    assert len(draws) == 12
    for k in draws:
        assert budget - _max_unit_cost(plan.units) < k.num_params() <= budget
        assert (k.scales is not None) == rescale
    assert len({k.heads.tobytes() + k.groups.tobytes() for k in draws}) > 1
    again = plan.sample_keep(size, num_samples=12, seed=3)
    assert all(a == b for a, b in zip(draws, again))
    ids = tiny_tokens(2 * SEQLEN, seed=1).reshape(2, SEQLEN)
    np.testing.assert_allclose(np.asarray(prune(model, draws[0])(ids)),
                               np.asarray(model(ids, gates=hard_gates(draws[0]))), atol=1e-5, rtol=1e-5)


def test_a_sharp_posterior_samples_its_median_network_and_the_full_size_is_dense():
    plan = _sharpened(random_plan(tiny_config()), 1e4)  # gate logits far beyond the noise's scale
    assert all(k == plan.keep(0.4) for k in plan.sample_keep(0.4, num_samples=5))
    assert all(k == plan.units.full() for k in plan.sample_keep(1.0, num_samples=2))
    with pytest.raises(ValueError, match="num_samples"):
        plan.sample_keep(0.5, num_samples=0)
    with pytest.raises(ValueError, match="size"):
        plan.sample_keep(1.5)


def test_quality_band_draws_and_the_median_network_match_direct_evaluation(tmp_path):
    plan, model, tokens = random_plan(tiny_config()), tiny_model(), tiny_tokens(2000, seed=2)
    band = plan.quality_band(model, tokens, sizes=(1.0, 0.4), num_samples=3, **BAND)
    assert band.sizes.tolist() == [0.4, 1.0]
    assert band.draws.shape == (2, 3 * 50)
    q = band.quantiles()
    assert np.all(q[:, 0] <= q[:, 1]) and np.all(q[:, 1] <= q[:, 2])
    dense = perplexity(model, tokens, seqlen=SEQLEN, max_windows=WINDOWS, progress=False)
    cut = perplexity(prune(model, plan, 0.4), tokens, seqlen=SEQLEN, max_windows=WINDOWS, progress=False)
    np.testing.assert_allclose(band.median_network, [cut.perplexity, dense.perplexity], rtol=1e-5)
    # At the full size every keep-set is the dense network: the spread is the windows' alone,
    # and the draws are the bootstrap of the dense network's window NLLs.
    resamples = np.random.default_rng(0).integers(0, WINDOWS, (50, WINDOWS))
    np.testing.assert_allclose(band.draws[1], np.tile(np.exp(dense.window_nll[resamples].mean(1)), 3), rtol=1e-5)
    assert band.to_json()["q50"] == q[:, 1].tolist()
    assert np.all(band.probability_within(np.inf) == 1.0)
    fig = plots.quality_band(band, path=tmp_path / "band.png")
    assert (tmp_path / "band.png").read_bytes()[:4] == b"\x89PNG"
    (line,) = [ln for ln in fig.axes[0].lines if ln.get_label() == "median network"]
    np.testing.assert_allclose(line.get_ydata(), band.median_network)


def test_quality_band_refuses_bad_sizes_and_another_architecture():
    plan, model, tokens = random_plan(tiny_config()), tiny_model(), tiny_tokens(500)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        quality_band(plan, model, tokens, sizes=(0.5, 1.2), **BAND)
    with pytest.raises(ValueError, match="another architecture"):
        quality_band(plan, tiny_model(hidden_size=48), tokens, **BAND)


def test_smallest_size_is_the_edge_of_the_sizes_that_meet_the_bar():
    (model, tokens), plan = peaked_model_and_text(), random_plan(tiny_config())  # cutting it costs perplexity
    kwargs = dict(model=model, tokens=tokens, num_samples=3, tol=0.05, **BAND)
    bar = 200.0  # met by the dense network and not by the smallest sizes (about 240 at 0.4)
    choice = plan.smallest_size(bar, 0.8, **kwargs)
    assert 0.1 < choice.size < 1.0
    p = dict(zip(choice.band.sizes.tolist(), choice.band.probability_within(bar)))
    assert p[choice.size] >= 0.8 and choice.probability == p[choice.size]
    below = [s for s in p if s < choice.size]
    assert all(p[s] < 0.8 for s in below)
    assert not below or choice.size - max(below) <= 0.05
    assert plan.smallest_size(1e9, 0.5, **kwargs).size == 0.1  # every size meets a bar this high: the lowest searched


@pytest.mark.parametrize("bar, prob, match", [(1.0, 0.9, "dense network reaches it"), (50.0, 1.0, "prob"),
                                              (-3.0, 0.9, "max_perplexity")])
def test_smallest_size_says_what_is_wrong(bar, prob, match):
    plan, model, tokens = random_plan(tiny_config()), tiny_model(), tiny_tokens(500)
    with pytest.raises(ValueError, match=match):
        smallest_size(plan, bar, prob, model=model, tokens=tokens, num_samples=2, **BAND)


def test_calibration_error_and_selective_accuracy_on_known_cases():
    conf = np.full(10, 0.8)
    assert calibration_error(conf, np.arange(10) < 8) == pytest.approx(0.0)
    assert calibration_error(np.full(10, 0.9), np.arange(10) < 5) == pytest.approx(0.4)
    certainty, correct = np.arange(10.0), np.arange(10) >= 1  # the least certain token is the wrong one
    assert selective_accuracy(certainty, correct, coverage=0.9) == 1.0
    assert selective_accuracy(-certainty, correct, coverage=0.5) == pytest.approx(0.8)


def test_ensemble_metrics_agree_with_direct_evaluation():
    (model, tokens), plan = peaked_model_and_text(), random_plan(tiny_config())
    rows = {r["predictor"]: r for r in ensemble_metrics(plan, model, tokens, 0.5, sizes=(1, 3), seqlen=SEQLEN,
                                                         max_windows=WINDOWS, progress=False)}
    assert list(rows) == ["dense", "median network", "ensemble of 1", "ensemble of 3"]
    first = plan.sample_keep(0.5, 3, seed=0)[0]
    for name, gates in (("dense", None), ("median network", hard_gates(plan.keep(0.5))),
                        ("ensemble of 1", hard_gates(first))):
        nll = perplexity(model, tokens, seqlen=SEQLEN, max_windows=WINDOWS, progress=False, gates=gates).nll
        assert rows[name]["nll"] == pytest.approx(nll, rel=1e-5), name
    assert rows["ensemble of 1"]["accuracy_at_90_disagreement"] is None
    assert 0 <= rows["ensemble of 3"]["ece"] <= 1 and 0 <= rows["ensemble of 3"]["brier"] <= 2
    # a posterior with no spread samples the median network only: its ensembles are that network
    sharp = _sharpened(plan, 1e4)
    rows = {r["predictor"]: r for r in ensemble_metrics(sharp, model, tokens, 0.5, sizes=(1, 3), seqlen=SEQLEN,
                                                         max_windows=2, progress=False)}
    for key in ("accuracy", "nll", "ece", "brier"):
        assert rows["ensemble of 3"][key] == pytest.approx(rows["median network"][key], rel=1e-5, abs=1e-7)


def test_keep_margins_split_kept_from_dropped_and_ablation_damage_is_the_pruned_difference():
    (model, tokens), plan = peaked_model_and_text(), random_plan(tiny_config())
    keep = plan.keep(0.5).effective()
    margins = keep_margins(plan, 0.5)
    assert (margins["head"][keep.heads] >= 0).all() and (margins["mlp_group"][keep.groups] >= 0).all()
    assert (margins["head"][~keep.heads] <= 0).all() and (margins["mlp_group"][~keep.groups] <= 0).all()
    rows = ablation_damage(plan, model, tokens, 0.5, num_units=3, seqlen=SEQLEN, max_windows=WINDOWS,
                           progress=False)
    assert len(rows) == 3 and all(r["margin"] >= 0 and 0 <= r["keep_frequency"] <= 1 for r in rows)
    r = rows[0]
    field = "heads" if r["kind"] == "head" else "groups"
    mask = getattr(keep, field).copy()
    mask[r["layer"], r["index"]] = False
    ablated = dataclasses.replace(keep, **{field: mask})
    ppl = [perplexity(prune(model, k), tokens, seqlen=SEQLEN, max_windows=WINDOWS, progress=False).nll
           for k in (ablated, keep)]
    assert r["damage_nll"] == pytest.approx(ppl[0] - ppl[1], rel=1e-4, abs=1e-5)


def test_keep_disagreement_counts_a_refits_differences_against_the_posteriors_own_spread():
    plan, refit = random_plan(tiny_config(), seed=0), random_plan(tiny_config(), seed=1)
    keep = plan.keep(0.5).effective()
    heads = keep.heads.copy()
    heads[np.argwhere(heads)[0][0], np.argwhere(heads)[0][1]] = False
    one_off = dataclasses.replace(keep, heads=heads)
    na, nb = keep.num_params(), one_off.num_params()
    assert mismatch(keep, one_off) == mismatch(one_off, keep) == pytest.approx((na - nb) / (na + nb)) and na > nb
    assert mismatch(plan.keep(0.3), plan.keep(0.9)) > 0
    assert mismatch(keep, keep) == 0.0

    sizes = (0.7, 0.4)
    rows = keep_disagreement(plan, refit, sizes, num_samples=40, seed=2)
    for size, row in zip(sizes, rows):
        assert row["observed"] == pytest.approx(mismatch(plan.keep(size), refit.keep(size)))
        assert row["predicted_q05"] <= row["predicted_q50"] <= row["predicted_q95"]
        assert row["observed_inside_90"] == (row["predicted_q05"] <= row["observed"] <= row["predicted_q95"])
        assert row["units_below_0.05"] + row["units_between"] + row["units_above_0.95"] == keep.heads.size + keep.groups.size
        frequency = plan.keep_frequency(size, num_samples=40, seed=2)
        p = np.concatenate([frequency["head"].ravel(), frequency["mlp_group"].ravel()])
        kept = refit.keep(size).effective()
        kept = np.concatenate([kept.heads.ravel(), kept.groups.ravel()])
        assert row["brier"] == pytest.approx(np.mean((p - kept) ** 2))

    sharp = _sharpened(plan, 1e4)  # no spread: every draw is the median network, so a refit identical to it agrees
    row, = keep_disagreement(sharp, sharp, (0.5,), num_samples=5)
    assert row["observed"] == row["predicted_q95"] == row["noisy_q95"] == row["brier"] == 0.0
    assert row["observed_inside_90"] and row["units_between"] == 0
    with pytest.raises(ValueError, match="different units"):
        keep_disagreement(plan, random_plan(tiny_config(num_layers=3)), (0.5,))
