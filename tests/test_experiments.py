"""Every experiment script runs end to end in its --smoke mode (tiny model, seconds)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["dense_baseline.py"])
def test_experiment_smoke(tmp_path, script):
    run = subprocess.run([sys.executable, str(ROOT / "experiments" / script), "--smoke", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = list(tmp_path.glob("*.json"))
    assert len(results) == 1 and results[0].with_suffix(".md").exists()
    doc = json.loads(results[0].read_text())
    assert doc["machine"]["cpu_count"] >= 1 and doc["records"]
    values = {(r["measure"], r["implementation"]): r["value"] for r in doc["records"]}
    ppl = [v for (m, _), v in values.items() if m.startswith("perplexity")]
    # a random tiny model is near-uniform over its 97 tokens; JAX and PyTorch agree
    assert 50 < ppl[0] < 200 and abs(ppl[0] / ppl[1] - 1) < 1e-4
    assert all(v > 0 for (m, _), v in values.items() if "tokens/s" in m)
