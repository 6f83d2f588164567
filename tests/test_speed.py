"""ppn.speed: the arithmetic of throughput and of interleaved speed ratios (no speed targets here)."""

import time

import numpy as np

import pytest

from ppn import speed
from ppn.prune import prune
from ppn.testing import random_plan, tiny_config, tiny_model


def test_interleaved_ratio_is_reference_time_over_model_time(monkeypatch):
    # A fake clock: the reference takes 2 ticks, the model 1, except one slow spell
    # of 7 extra ticks in the model's first timed call, which the median ignores.
    now, calls = [0.0], [0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])

    def model():
        calls[0] += 1
        now[0] += 1 + (7 if calls[0] == 2 else 0)  # call 1 is the untimed warm-up

    def reference():
        now[0] += 2

    assert speed.interleaved_ratio(model, reference, repeats=5) == 2.0


def test_interleaved_ratio_alternates_the_two_calls():
    calls = []
    speed.interleaved_ratio(lambda: calls.append("model"), lambda: calls.append("reference"), repeats=3)
    assert calls == ["model", "reference"] + ["reference", "model"] * 3


def test_throughput_counts_tokens_and_relative_speed_of_a_model_to_itself():
    model = tiny_model()
    prefill = speed.prefill_throughput(model, batch=2, seqlen=16, repeats=2)
    assert prefill.tokens == 32 and prefill.tokens_per_second == prefill.tokens / prefill.seconds
    decode = speed.decode_throughput(model, prompt_len=4, new_tokens=6, repeats=1)
    assert decode.tokens == 6 and decode.repeats == 1
    ratios = speed.relative_speed(model, model, repeats=3, prefill=dict(batch=2, seqlen=16),
                                  decode=dict(prompt_len=4, new_tokens=6))
    assert set(ratios) == {"prefill_ratio", "decode_ratio"}
    assert all(0 < r < 100 for r in ratios.values())


COEF = dict(base=3.0, attn_layer=0.5, head=0.25, kv_head=0.125, mlp_layer=0.75, channel=0.01)


def _linear_latency(model):
    """Milliseconds exactly linear in the latency terms of a pruned tiny model (decode at half the prefill's)."""
    shapes = model.config.layer_shapes()
    counts = dict(base=1, attn_layer=sum(s.has_attention for s in shapes), head=sum(s.num_heads for s in shapes),
                  kv_head=sum(s.num_kv_heads for s in shapes), mlp_layer=sum(s.has_mlp for s in shapes),
                  channel=sum(s.intermediate_size for s in shapes))
    ms = sum(COEF[t] * counts[t] for t in speed.LATENCY_TERMS)
    return {"prefill": ms, "decode": ms / 2}


def test_profile_recovers_per_unit_latencies_and_keep_cuts_to_a_latency(tmp_path):
    model = tiny_model()
    table = speed.profile_costs(model, group_width=16, measure=_linear_latency, progress=False)
    for phase, scale in (("prefill", 1.0), ("decode", 0.5)):
        fitted = table["phases"][phase]["coefficients_ms"]
        assert all(abs(fitted[t] - scale * COEF[t]) < 1e-9 for t in speed.LATENCY_TERMS), (phase, fitted)
    path = speed.save_costs(table, tmp_path / "costs.json")
    plan = random_plan(model.config, group_width=16)
    costs = speed.load_costs(path, plan.units)
    dense_ms = costs.base + costs.of(plan.units.full())
    assert abs(dense_ms - _linear_latency(model)["decode"]) < 1e-9
    for target in (0.8 * dense_ms, 0.5 * dense_ms):
        keep = plan.keep(target, cost=str(path))
        ms = _linear_latency(prune(model, keep))["decode"]
        unit = max(costs.head + costs.kv + costs.attn_fixed, costs.groups.max() + costs.mlp_fixed)
        assert target - unit < ms <= target + 1e-9
    with pytest.raises(ValueError, match="outside the blocks alone"):
        plan.keep(0.9 * costs.base, cost=str(path))
    with pytest.raises(ValueError, match="the dense model has"):
        plan.keep(2 * dense_ms, cost=str(path))


def test_a_latency_below_one_millisecond_is_an_amount_not_a_fraction():
    units = random_plan(tiny_config(), group_width=16).units
    fast = speed.Costs("ms", 0.01, 0.005, 0.02, np.full(units.num_groups, 0.004), 0.02, 0.1)
    dense_ms = fast.base + fast.of(units.full())
    assert dense_ms < 1
    assert fast.budget(units, 0.9 * dense_ms) == pytest.approx(0.9 * dense_ms - fast.base)
    with pytest.raises(ValueError, match="outside the blocks alone"):
        fast.budget(units, 0.5 * fast.base)


def test_cost_tables_refuse_another_model_a_bad_phase_and_a_corrupt_file(tmp_path):
    table = speed.profile_costs(tiny_model(), group_width=16, measure=_linear_latency, progress=False)
    path = speed.save_costs(table, tmp_path / "costs.json")
    other = random_plan(tiny_config(hidden_size=48), group_width=16)
    with pytest.raises(ValueError, match="another model shape"):
        speed.load_costs(path, other.units)
    units = random_plan(tiny_config(), group_width=16).units
    with pytest.raises(ValueError, match="unknown phase 'train'"):
        speed.load_costs(path, units, phase="train")
    (tmp_path / "bad.json").write_text('{"format": "ppn-costs/1", "config": {}')
    with pytest.raises(ValueError, match="not a valid ppn cost table"):
        speed.load_costs(tmp_path / "bad.json", units)
    with pytest.raises(FileNotFoundError, match="no cost table"):
        speed.load_costs(tmp_path / "none.json", units)


def test_measured_latency_is_positive_for_both_phases():
    ms = speed.measure_latency(tiny_model(), context=16, new_tokens=4, repeats=1)
    assert set(ms) == set(speed.PHASES) and ms["prefill"] > 0 and ms["decode"] >= 0


def test_timed_decode_runs_the_generation_loop_from_a_filled_cache():
    import jax
    from flax import nnx

    from ppn.generate import generate

    model = tiny_model()
    prompt = np.random.default_rng(1).integers(0, model.config.vocab_size, (1, 12)).astype(np.int32)
    graphdef, state = nnx.split(model)
    token, cache = speed._prefilled(graphdef, state, prompt, 12 + 5)
    rest = speed._decode_steps(graphdef, state, token, cache, jax.random.split(jax.random.key(0), 4))
    np.testing.assert_array_equal(np.r_[np.asarray(token), np.asarray(rest)[0]], generate(model, prompt, 5)[0, 12:])


def test_profile_variants_include_cuts_that_differ_from_block_to_block():
    from ppn.units import Units

    units = Units(tiny_config(), 16)
    keeps = speed._profile_keeps(units, random_cuts=6)
    assert len(keeps) == 9 + 6
    differ = [len({tuple(row) for row in np.c_[k.effective().heads.sum(1), k.channels().sum(1)]}) > 1
              for k in keeps[9:]]
    assert sum(differ) >= 4, differ  # of 6 random cuts of a 2-block model
    terms = np.stack([speed.latency_terms(k) for k in keeps])
    assert np.linalg.matrix_rank(terms) == len(speed.LATENCY_TERMS)


def test_cut_to_latency_corrects_a_table_that_underestimates_the_blocks(tmp_path):
    model = tiny_model()
    path = speed.save_costs(speed.profile_costs(model, group_width=16, measure=_linear_latency, progress=False),
                            tmp_path / "costs.json")
    plan = random_plan(model.config, group_width=16)
    costs = speed.load_costs(path, plan.units)
    base = costs.base

    def slow_blocks(pruned):  # the blocks really take twice what the table says
        return base + 2.0 * (_linear_latency(pruned)["decode"] - base)

    target = base + 0.6 * costs.of(plan.units.full())
    first = slow_blocks(prune(model, plan.keep(target, cost=costs)))
    cut = speed.cut_to_latency(model, plan, target, costs, tolerance=0.02, measure=slow_blocks)
    unit = 2.0 * max(costs.head + costs.kv + costs.attn_fixed, costs.groups.max() + costs.mlp_fixed)
    assert first > target + unit  # the table alone misses by more than a unit
    assert cut.rounds > 1 and abs(cut.measured_ms - target) <= unit and cut.asked_ms < target
    assert cut.measured_ms == slow_blocks(prune(model, cut.keep))
    with pytest.raises(ValueError, match="outside the blocks alone"):
        speed.cut_to_latency(model, plan, 0.5 * base, costs, measure=slow_blocks)
