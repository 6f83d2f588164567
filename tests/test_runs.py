"""Run folders: a killed fit resumes to the unbroken result, a finished or different run is not
overwritten, a killed write leaves nothing behind, and metrics.jsonl reads back."""

import dataclasses
import json
import random
import subprocess
import sys
import time

import numpy as np
import pytest

from ppn.fit import FitConfig, fit
from ppn.runs import RunFolder, mark_done, read_metrics, step_seconds
from ppn.testing import assert_same_weights, run_killed_at, smoke_fit_config, tiny_model, tiny_tokens

TOKENS = tiny_tokens()
SMALL = smoke_fit_config()


def test_resume_after_a_kill_equals_an_unbroken_run(tmp_path):
    cfg = smoke_fit_config(steps=7, checkpoint_every=3)
    unbroken = fit(tiny_model(), TOKENS, cfg, run_dir=tmp_path / "a", progress=False)
    # killed after the checkpoint at step 3, mid-way to the next
    run_killed_at(5, lambda: fit(tiny_model(), TOKENS, cfg, run_dir=tmp_path / "b", progress=False))
    killed = read_metrics(tmp_path / "b")
    assert [r["step"] for r in killed] == [0, 1, 2]
    resumed = fit(tiny_model(), TOKENS, cfg, run_dir=tmp_path / "b", progress=False)
    assert [r["step"] for r in resumed.metrics] == list(range(7))
    # the run's update time counts the steps before the kill too
    assert step_seconds(resumed.metrics) == pytest.approx(
        step_seconds(killed) + sum(r["seconds"] for r in resumed.metrics[3:])) and step_seconds(killed) > 0
    for k, v in unbroken.guide_params.items():
        np.testing.assert_allclose(resumed.guide_params[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
    assert_same_weights(unbroken.model, resumed.model)


KILLED_FIT = """
import sys
from ppn.fit import fit
from ppn.testing import smoke_fit_config, tiny_model, tiny_tokens
fit(tiny_model(), tiny_tokens(), smoke_fit_config(steps={steps}, checkpoint_every=2, init="prior"),
    run_dir=sys.argv[1], progress=False)
"""


def test_five_sigkills_at_random_moments_resume_bit_identical_and_leave_no_partial_files(tmp_path):
    """A fit in a subprocess is SIGKILLed five times: at random moments once it
    trains (its metrics are on disk), and once at the first sight of a checkpoint
    being written. Each time
    it resumes; the finished run equals an unbroken one bit for bit."""
    steps, run = 40, tmp_path / "run"
    script = KILLED_FIT.format(steps=steps)
    rng, kills = random.Random(0), 0
    while kills < 5:
        proc = subprocess.Popen([sys.executable, "-c", script, str(run)], stderr=subprocess.PIPE)
        while proc.poll() is None and not (run / "metrics.jsonl").exists():
            time.sleep(0.02)
        if kills == 2:  # while orbax writes a checkpoint: its temporary folder is there
            deadline = time.monotonic() + 20
            while proc.poll() is None and time.monotonic() < deadline and not any(
                    "tmp" in p.name for p in (run / "checkpoints").glob("*")):
                time.sleep(0.005)
        else:
            time.sleep(rng.uniform(0.0, 1.0))
        assert proc.poll() is None, f"the fit finished before kill {kills + 1}: {proc.stderr.read()[-2000:]!r}"
        proc.kill()
        proc.wait()
        kills += 1
    done = subprocess.run([sys.executable, "-c", script, str(run)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    cfg = smoke_fit_config(steps=steps, checkpoint_every=2, init="prior")
    unbroken = fit(tiny_model(), TOKENS, cfg, progress=False)
    resumed = fit(tiny_model(), TOKENS, cfg, run_dir=run, progress=False)  # reads the finished run back
    assert [r["step"] for r in read_metrics(run)] == list(range(steps))
    for k, v in unbroken.guide_params.items():
        np.testing.assert_array_equal(resumed.guide_params[k], v, err_msg=k)
    assert_same_weights(unbroken.model, resumed.model, rtol=0, atol=0)
    assert [p for p in run.rglob("*") if "tmp" in p.name.lower()] == []


def test_a_finished_run_is_not_overwritten(tmp_path):
    fit(tiny_model(), TOKENS, smoke_fit_config(steps=2), run_dir=tmp_path / "r", progress=False)
    mark_done(tmp_path / "r")
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match="holds a finished run"):
        fit(tiny_model(), TOKENS, SMALL, run_dir=tmp_path / "r", progress=False)
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before


def test_resuming_with_another_config_is_refused(tmp_path):
    fit(tiny_model(), TOKENS, smoke_fit_config(steps=2), run_dir=tmp_path / "r", progress=False)
    with pytest.raises(ValueError, match="another configuration"):
        fit(tiny_model(), TOKENS, smoke_fit_config(steps=2, lr_gates=0.5), run_dir=tmp_path / "r", progress=False)


def test_resuming_with_another_teacher_or_loss_is_refused_naming_it(tmp_path):
    base = smoke_fit_config(teacher="start", teacher_weight=0.5)
    RunFolder(tmp_path, base, tiny_model())
    for change, name in ((dict(teacher_weight=1.0), "teacher_weight"), (dict(teacher=str(tmp_path)), "teacher")):
        with pytest.raises(ValueError, match=f"another configuration \\({name} "):
            RunFolder(tmp_path, FitConfig(**{**base.__dict__, **change}), tiny_model())


def test_a_run_recorded_before_a_knob_existed_resumes_while_the_knob_stays_at_its_default(tmp_path):
    base = smoke_fit_config()
    RunFolder(tmp_path, base, tiny_model())
    record = json.loads((tmp_path / "config.json").read_text())
    del record["fit"]["weight_decay"], record["fit"]["lr_decay"]  # written by an older ppn
    (tmp_path / "config.json").write_text(json.dumps(record))
    RunFolder(tmp_path, base, tiny_model())
    with pytest.raises(ValueError, match="another configuration \\(weight_decay "):
        RunFolder(tmp_path, dataclasses.replace(base, weight_decay=0.1), tiny_model())


def test_a_run_recorded_with_a_removed_option_resumes_only_if_it_was_off(tmp_path):
    """Self-distillation (`distill_weight`), written by an older ppn: off is today's fit, on is named."""
    base = smoke_fit_config()
    RunFolder(tmp_path, base, tiny_model())
    record = json.loads((tmp_path / "config.json").read_text())
    record["fit"]["distill_weight"] = 0.0
    (tmp_path / "config.json").write_text(json.dumps(record))
    RunFolder(tmp_path, base, tiny_model())
    assert FitConfig.from_dict(record["fit"]) == base
    record["fit"]["distill_weight"] = 1.0
    (tmp_path / "config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="another configuration \\(distill_weight "):
        RunFolder(tmp_path, base, tiny_model())
    with pytest.raises(ValueError, match="distill_weight=1.0, an option later versions of ppn removed"):
        FitConfig.from_dict(record["fit"])


def test_a_killed_write_leaves_nothing_a_resume_would_read(tmp_path):
    """Temporary files of an atomic write and orbax's unfinished checkpoints are removed."""
    RunFolder(tmp_path, SMALL, tiny_model())
    (tmp_path / ".metrics.jsonl.k1ll3d").write_text('{"step": 0')
    unfinished = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1700000000"
    unfinished.mkdir(parents=True)
    run = RunFolder(tmp_path, SMALL, tiny_model())
    assert not (tmp_path / ".metrics.jsonl.k1ll3d").exists() and not unfinished.exists()
    state = {"x": np.zeros(3, np.float32)}
    step, restored, nonfinite = run.restore(state)
    assert (step, nonfinite) == (0, 0) and restored is state


def test_metrics_are_written_whole_and_read_back_up_to_a_step(tmp_path):
    assert read_metrics(tmp_path) == [] and read_metrics(tmp_path / "nowhere") == []
    run = RunFolder(tmp_path, SMALL, tiny_model())
    rows = [{"step": s, "loss": float(s)} for s in range(5)]
    run.write_metrics(rows)
    assert read_metrics(tmp_path) == rows
    assert run.metrics(3) == rows[:3]
    assert RunFolder(None, SMALL, tiny_model()).metrics(3) == []


def test_checkpoints_fall_due_every_n_steps_but_never_sooner_than_min_seconds():
    cfg = FitConfig(steps=10, checkpoint_every=2, checkpoint_min_seconds=0)
    folder = RunFolder(None, cfg, tiny_model())
    assert [s for s in range(1, 11) if folder.due(s, cfg)] == [2, 4, 6, 8, 10]
    slow = dataclasses.replace(cfg, checkpoint_min_seconds=3600)
    assert [s for s in range(1, 11) if folder.due(s, slow)] == [10]  # only the last step: the start was just now
    folder.saved_at -= 3600  # an hour since the last checkpoint: the next due step writes
    assert [s for s in range(1, 11) if folder.due(s, slow)] == [2, 4, 6, 8, 10]
    with pytest.raises(ValueError, match="checkpoint_min_seconds"):
        FitConfig(checkpoint_min_seconds=-1)
