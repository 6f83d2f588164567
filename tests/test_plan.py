"""The plan: resizing without a model (budget fill, uniform fill, soft gates), its file
round trip, and plan files under attack: whatever a mutation does to a valid plan file,
loading it either gives back a valid plan or raises a ValueError that names the file."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ppn
from ppn.gates import STRETCH_HI, STRETCH_LO
from ppn.plan import Plan, fill_uniform
from ppn.prune import prune
from ppn.testing import random_plan, tiny_config, tiny_model, tiny_tokens
from ppn.units import Units

# ----------------------------------------------------- plan files under attack
PLAN = random_plan(tiny_config(), seed=2, rescale=True)
DOC = PLAN.to_json()
TEXT = json.dumps(DOC)

# Where a mutation lands: a path of keys and indices into the plan's JSON document.
PATHS = [("format",), ("config", "hidden_size"), ("config", "num_heads"), ("group_width",), ("prior",),
         ("sites", "delta", "loc"), ("sites", "delta", "scale"), ("sites", "tau_layer", "loc"),
         ("sites", "eps_head", "loc"), ("sites", "zeta_mlp_group", "scale"), ("sites", "delta", "positive"),
         ("sites",), ("rescale", "head"), ("rescale", "mlp_in"), ("rescale",), ("config",), ("size", "currency"),
         ("size", "context"), ("size",)]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=5), st.lists(st.floats(allow_nan=True), max_size=4),
                   st.just([[float("nan")] * 4] * 2), st.just({}), st.just([]))


def _check(tmp_path, text: str):
    path = tmp_path / "plan.json"
    path.write_text(text)
    try:
        plan = Plan.load(path)
    except ValueError as e:
        assert str(path) in str(e)
        return
    # A mutation that leaves a valid plan must give one that resizes like any plan.
    keep = plan.keep(0.5)
    assert keep.num_params() <= plan.units.budget(0.5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(PATHS), value=VALUES, delete=st.booleans())
def test_a_mutated_plan_loads_or_fails_cleanly(tmp_path, path, value, delete):
    doc = json.loads(TEXT)
    node = doc
    for key in path[:-1]:
        node = node[key]
    if delete:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    _check(tmp_path, json.dumps(doc))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, len(TEXT) - 1))
def test_a_truncated_plan_fails_cleanly(tmp_path, cut):
    _check(tmp_path, TEXT[:cut])


def test_nan_and_wrong_shapes_are_named(tmp_path):
    doc = json.loads(TEXT)
    doc["sites"]["delta"]["loc"][0][0] = None  # JSON's null for a lost value
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(doc))
    try:
        Plan.load(path)
        raise AssertionError("a plan with a null location loaded")
    except ValueError as e:
        assert "delta" in str(e) or "non-finite" in str(e)
    doc = json.loads(TEXT)
    doc["sites"]["delta"]["scale"][0][0] = 1e300  # beyond float32: read back as an infinite scale
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="site 'delta' has non-finite"), np.errstate(over="ignore"):
        Plan.load(path)
    doc = json.loads(TEXT)
    doc["rescale"]["head"] = np.zeros((3, 3)).tolist()
    path.write_text(json.dumps(doc))
    try:
        Plan.load(path)
        raise AssertionError("a plan with mis-shaped rescaling loaded")
    except ValueError as e:
        assert "rescale 'head'" in str(e)


# ------------------------------------------------------------ a fitted plan
def test_plan_round_trips_and_resizes_without_a_model(tiny_plan, tmp_path):
    path = tiny_plan.save(tmp_path / "plan.json")
    assert path.stat().st_size < 64_000
    loaded = Plan.load(path)
    for name, site in tiny_plan.sites.items():  # the short decimals read back to the same float32 values
        np.testing.assert_array_equal(loaded.sites[name].loc, site.loc)
        np.testing.assert_array_equal(loaded.sites[name].scale, site.scale)
    for size in (0.3, 0.5, 0.9, 1.0, 2000):
        assert loaded.keep(size) == tiny_plan.keep(size)
    doc = json.loads(path.read_text())
    assert set(doc["gates"]["alpha_head"]) >= {"mean", "sd", "q05", "q50", "q95"}
    assert np.asarray(doc["gates"]["alpha_head"]["mean"]).shape == (2, 4)


def test_a_checkpoint_beside_the_plan_is_found_from_any_working_directory(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "a"
    (run / "model").mkdir(parents=True)
    named = {"model": str((run / "model").resolve()), "smollm2-135m": "smollm2-135m",  # a zoo name stays
             "runs/a/model": "runs/a/model"}  # relative to where an older fit ran: kept as written
    monkeypatch.chdir(tmp_path / "runs")  # neither the run folder nor where the fit ran
    for written, resolved in named.items():
        path = Plan(PLAN.units, PLAN.prior, PLAN.sites, rescale=PLAN.rescale, meta={"checkpoint": written}).save(
            run / "plan.json")
        assert Plan.load(path).meta["checkpoint"] == resolved


@settings(max_examples=60, deadline=None)
@given(st.floats(0.02, 1.0))
def test_keep_lands_within_one_unit_of_the_target(tiny_plan, size):
    u = tiny_plan.units
    budget = u.budget(size)
    kept = tiny_plan.keep(size).num_params()
    largest_unit = max(u.head_cost + u.kv_cost + u.attn_fixed_cost, int(u.group_costs.max()) + u.mlp_fixed_cost)
    assert budget - largest_unit < kept <= budget


def test_kept_size_grows_with_the_target(tiny_plan):
    u = tiny_plan.units
    largest_unit = max(u.head_cost + u.kv_cost + u.attn_fixed_cost, int(u.group_costs.max()) + u.mlp_fixed_cost)
    sizes = np.arange(largest_unit, u.total + 1, largest_unit)
    kept = [tiny_plan.keep(int(s)).num_params() for s in sizes]
    assert all(b >= a for a, b in zip(kept, kept[1:]))


def test_keep_is_deterministic_and_probabilities_are_probabilities(tiny_plan, tmp_path):
    assert tiny_plan.keep(0.45) == Plan.load(tiny_plan.save(tmp_path / "p.json")).keep(0.45)
    p = tiny_plan.keep_frequency(0.5, num_samples=40)
    assert p["head"].shape == (2, 4) and p["mlp_group"].shape == (2, 3)
    assert all(((v >= 0) & (v <= 1)).all() for v in p.values())


def test_pruned_parameter_count_equals_the_plans(tiny_plan, tiny_fit):
    for size in (0.3, 0.7):
        pruned = prune(tiny_fit.model, tiny_plan, size)
        assert pruned.config.num_prunable_params() == tiny_plan.keep(size).num_params()


def test_plan_used_with_another_model_is_refused(tiny_plan):
    other = tiny_model(num_heads=8, num_kv_heads=2)
    with pytest.raises(ValueError, match="another architecture"):
        prune(other, tiny_plan, 0.5)


@pytest.mark.parametrize("corrupt", [
    lambda d: "{ not json",
    lambda d: json.dumps({**d, "format": "something/9"}),
    lambda d: json.dumps({**d, "sites": {**d["sites"], "tau_unit": {**d["sites"]["tau_unit"], "scale": -1.0}}}),
    lambda d: json.dumps({**d, "format": "ppn-plan/1"}),
    lambda d: json.dumps({k: v for k, v in d.items() if k != "config"}),
    lambda d: json.dumps({**d, "sites": {k: v for k, v in d["sites"].items() if k != "delta"}}),
])
def test_corrupt_plan_files_are_refused(tiny_plan, tmp_path, corrupt):
    path = tiny_plan.save(tmp_path / "p.json")
    path.write_text(corrupt(json.loads(path.read_text())))
    with pytest.raises(ValueError, match="is not a valid ppn plan"):
        Plan.load(path)


def test_missing_plan_file():
    with pytest.raises(FileNotFoundError, match="no plan file"):
        Plan.load("/no/such/plan.json")


def test_soft_gates_lie_in_the_unit_interval_and_drive_the_gated_model(tiny_plan, tiny_fit):
    """Soft gates are in [0, 1], one BlockGates per block, and perplexity runs through them."""
    gates = tiny_plan.soft_gates(0.5)
    assert len(gates) == tiny_plan.units.num_layers
    for g in gates:
        for v in (g.attn, g.heads, g.mlp, g.channels):
            assert float(v.min()) >= 0 and float(v.max()) <= 1
    ppl = ppn.perplexity(tiny_fit.model, tiny_tokens()[:512], seqlen=64, gates=gates, progress=False).perplexity
    assert np.isfinite(ppl) and ppl > 1


def test_median_soft_gates_are_the_louizos_gates_sharpened_by_the_temperature(tiny_plan):
    louizos, median = tiny_plan.soft_gates(0.5, 0.2), tiny_plan.soft_gates(0.5, 0.2, "median")
    lo, hi = STRETCH_LO, STRETCH_HI
    for a, b in zip(louizos, median):
        for x, y in ((a.heads, b.heads), (a.channels, b.channels)):
            x, y = np.asarray(x), np.asarray(y)
            # both are monotone in the same (eta - c): open and closed units agree, and the
            # median's sigmoid argument is 5x the Louizos one, so it sits no nearer 1/2
            assert ((x > 0.5) == (y > 0.5)).all()
            sx, sy = (np.clip((v - lo) / (hi - lo), 1e-6, 1 - 1e-6) for v in (x, y))
            assert (np.abs(sy - 0.5) >= np.abs(sx - 0.5) - 1e-6).all()
    with pytest.raises(ValueError, match="estimator"):
        tiny_plan.soft_gates(0.5, estimator="mean")


# ------------------------------------------------------------- uniform fill
@pytest.mark.parametrize("overrides", [dict(num_layers=4, intermediate_size=50),
                                       dict(num_layers=3, num_heads=6, num_kv_heads=3, intermediate_size=80),
                                       dict(num_layers=2, num_heads=8, num_kv_heads=8)])
def test_a_uniform_keep_set_is_a_standard_dense_model_that_fills_its_budget(overrides):
    """Same whole KV groups and width in every block, hidden size a multiple of the heads
    (transformers checks it), at most the budget, and no further step of either kind fits."""
    config = tiny_config(**overrides)
    units, G = Units(config, 16), config.group_size
    rng = np.random.default_rng(0)
    widths = np.sort(units.group_widths)[::-1]  # MLP steps, a narrow group last
    smallest = config.replace(num_heads=G, num_kv_heads=1, intermediate_size=16).num_prunable_params()
    for budget in rng.integers(smallest, units.total, 20):
        logits = {k: rng.normal(size=s) for k, s in
                  dict(attn_layer=(units.num_layers,), mlp_layer=(units.num_layers,),
                       head=(units.num_layers, units.num_heads), mlp_group=(units.num_layers, units.num_groups)).items()}
        keep = fill_uniform(units, logits, int(budget))
        small = keep.config()
        assert small.layers is None and small.num_layers == config.num_layers
        assert small.num_heads == G * small.num_kv_heads and config.hidden_size % small.num_heads == 0
        assert keep.num_params() == small.num_prunable_params() <= budget
        m = int(keep.groups[0].sum())
        more_kv = [k for k in range(small.num_kv_heads + 1, config.num_kv_heads + 1)
                   if config.hidden_size % (k * G) == 0][:1]
        bigger = [small.replace(num_kv_heads=k, num_heads=k * G) for k in more_kv]
        bigger += [small.replace(intermediate_size=small.intermediate_size + int(widths[m]))] if m < len(widths) else []
        assert all(b.num_prunable_params() > budget for b in bigger)
        # within each block, the kept KV groups and MLP groups are the best-ranked ones
        kv_score = logits["head"].reshape(units.num_layers, config.num_kv_heads, G).mean(-1)
        for l in range(units.num_layers):
            kept = keep.kv_kept()[l]
            assert kv_score[l][kept].min() >= kv_score[l][~kept].max(initial=-np.inf)
            full = units.group_widths == 16
            g, on = logits["mlp_group"][l][full], keep.groups[l][full]
            assert g[on].min() >= g[~on].max(initial=-np.inf)
    with pytest.raises(ValueError, match="below the smallest uniform model"):
        fill_uniform(units, logits, smallest - 1)



@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("currency", ["flops", "bytes"])
def test_keep_in_another_currency_lands_within_one_unit_of_its_budget(currency, uniform):
    plan = random_plan(tiny_config(), seed=4)
    units = plan.units
    costs = units.costs(currency)
    for size in (0.8, 0.5):
        keep = plan.keep(size, uniform=uniform, cost=currency)
        budget = size * costs.of(units.full())
        unit = max(costs.head + costs.kv + costs.attn_fixed, costs.groups.max() + costs.mlp_fixed)
        step = units.num_layers * (units.config.group_size * costs.head + costs.kv) if uniform else unit
        assert budget - step < costs.of(keep) <= budget
    # an amount for the whole model, outside the blocks included
    amount = costs.base + 0.6 * costs.of(units.full())
    assert costs.base + costs.of(plan.keep(amount, cost=currency)) <= amount


def test_a_fit_in_flops_cuts_to_flops_by_default_and_to_parameters_on_request(tmp_path):
    from ppn.fit import fit
    from ppn.testing import smoke_fit_config, tiny_model, tiny_tokens

    result = fit(tiny_model(), tiny_tokens(), smoke_fit_config(cost="flops", cost_context=256, steps=3),
                 progress=False)
    rows = result.metrics
    assert all(abs(np.mean(r["expected_size"]) - np.mean(r["rho"])) < 1e-3 for r in rows)
    plan = Plan.load(Plan.from_fit(result).save(tmp_path / "plan.json"))
    u = plan.units
    assert (u.currency, u.context) == ("flops", 256)
    flops, params = u.costs("flops", 256), u.costs("params")
    unit = max(flops.head + flops.kv + flops.attn_fixed, flops.groups.max() + flops.mlp_fixed)
    for size in (0.4, 0.7):
        keep = plan.keep(size)  # the fit's currency
        assert size * u.size_total - unit < flops.of(keep) <= size * u.size_total
        assert plan.keep(size, cost="flops") == keep
        by_params = plan.keep(size, cost="params")
        assert by_params.num_params() <= params.budget(u, size) and by_params != keep
        assert len(plan.sample_keep(size, 2)) == 2
        assert all(flops.of(k) <= size * u.size_total for k in plan.sample_keep(size, 2))
    # a plan written before fits in FLOPs (no "size" entry) reads sizes as parameters
    doc = json.loads((tmp_path / "plan.json").read_text())
    del doc["size"]
    (tmp_path / "old.json").write_text(json.dumps(doc))
    assert Plan.load(tmp_path / "old.json").units.currency == "params"
    doc["size"] = {"currency": "watts", "context": 1}
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="not a valid ppn plan.*'watts'"):
        Plan.load(tmp_path / "bad.json")
