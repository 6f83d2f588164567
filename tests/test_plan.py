"""Plan files under attack: whatever a mutation does to a valid plan file, loading
it either gives back a valid plan or raises a ValueError that names the file."""

import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppn.plan import Plan
from ppn.testing import random_plan, tiny_config

PLAN = random_plan(tiny_config(), seed=2, rescale=True)
DOC = PLAN.to_json()
TEXT = json.dumps(DOC)

# Where a mutation lands: a path of keys and indices into the plan's JSON document.
PATHS = [("format",), ("config", "hidden_size"), ("config", "num_heads"), ("group_width",), ("prior",),
         ("sites", "delta", "loc"), ("sites", "delta", "scale"), ("sites", "alpha0", "loc"),
         ("sites", "eps_head", "loc"), ("sites", "zeta_mlp_group", "scale"), ("sites", "delta", "positive"),
         ("sites",), ("rescale", "head"), ("rescale", "mlp_in"), ("rescale",), ("config",)]
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
    doc["rescale"]["head"] = np.zeros((3, 3)).tolist()
    path.write_text(json.dumps(doc))
    try:
        Plan.load(path)
        raise AssertionError("a plan with mis-shaped rescaling loaded")
    except ValueError as e:
        assert "rescale 'head'" in str(e)
