"""Every experiment script runs end to end in its --smoke mode (tiny model, seconds)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    """An experiment script imported as a module (its functions, without running it)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _smoke(script, *args):
    run = subprocess.run([sys.executable, str(ROOT / "experiments" / script), "--smoke", *map(str, args)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_dense_baseline_smoke(tmp_path):
    _smoke("dense_baseline.py", "--out-dir", tmp_path)
    results = list(tmp_path.glob("*.json"))
    assert len(results) == 1 and results[0].with_suffix(".md").exists()
    doc = json.loads(results[0].read_text())
    assert doc["machine"]["cpu_count"] >= 1 and doc["records"]
    values = {(r["measure"], r["implementation"]): r["value"] for r in doc["records"]}
    ppl = [v for (m, _), v in values.items() if m.startswith("perplexity")]
    # a random tiny model is near-uniform over its 97 tokens; JAX and PyTorch agree
    assert 50 < ppl[0] < 200 and abs(ppl[0] / ppl[1] - 1) < 1e-4
    assert all(v > 0 for (m, _), v in values.items() if "tokens/s" in m)


def test_main_job_smoke(tmp_path):
    """experiments/fit.py: fit, plan, posterior, plots, one row per size, and a finished run is not redone."""
    run_dir, results = tmp_path / "run", tmp_path / "res" / "fit.json"
    _smoke("fit.py", "--run-dir", run_dir, "--results", results)
    for name in ["plan.json", "posterior.nc", "metrics.jsonl", "keep_frequency.png", "structure.png",
                 "forest.png", "training.png", "table.md", "quality_band.png", "DONE", "model/config.json"]:
        assert (run_dir / name).exists(), name
    rows = json.loads(results.read_text())["records"]
    ppn_rows = [r for r in rows if r["method"] == "ppn"]
    band = json.loads((run_dir / "quality_band.json").read_text())
    assert band["sizes"] == [0.3, 0.4, 0.5, 0.7, 0.9] and band["num_samples"] == 4
    assert all(lo <= mid <= hi for lo, mid, hi in zip(band["q05"], band["q50"], band["q95"]))
    assert [r["size"] for r in ppn_rows] == [0.9, 0.7, 0.5, 0.4, 0.3]
    assert all(r["kept_fraction"] <= r["size"] + 1e-9 for r in ppn_rows)
    assert all(0 < r["fit_step_seconds"] <= r["fit_seconds"] for r in ppn_rows)  # updates only, within the wall time
    assert len([r for r in rows if r["method"].startswith("random")]) == 5
    # out-of-domain beside in-domain, every row but the random floor's (in domain only)
    assert all(("general_perplexity" in r) == (not r["method"].startswith("random")) for r in rows)
    assert all(r["general_perplexity"] > 1 for r in rows if "general_perplexity" in r)
    again = subprocess.run([sys.executable, str(ROOT / "experiments" / "fit.py"), "--smoke", "--run-dir",
                            str(run_dir), "--results", str(results)], capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "holds a finished run" in again.stderr
    # the same table at another evaluation size, from the run folder alone
    subprocess.run([sys.executable, str(ROOT / "experiments" / "evaluate_run.py"), "--run-dir", str(run_dir),
                    "--out-dir", str(tmp_path), "--windows", "3"], check=True, capture_output=True, timeout=600)
    again = json.loads((tmp_path / "run_3windows.json").read_text())["records"]
    assert [r["method"] for r in again] == ["dense", "ppn (fitted weights, unpruned)"] + ["ppn"] * 5
    assert [r["kept_prunable"] for r in again[2:]] == [r["kept_prunable"] for r in ppn_rows]
    assert all(r["eval"] == "3 windows" and r["perplexity"] > 1 and r["general_perplexity"] > 1 for r in again)
    # the final numbers' split: the same cuts on other text
    subprocess.run([sys.executable, str(ROOT / "experiments" / "evaluate_run.py"), "--run-dir", str(run_dir),
                    "--out-dir", str(tmp_path), "--windows", "3", "--split", "reserved"], check=True,
                   capture_output=True, timeout=600)
    reserved = json.loads((tmp_path / "run_3windows_reserved.json").read_text())
    assert reserved["config"]["split"] == "reserved"
    assert [r["kept_prunable"] for r in reserved["records"]] == [r["kept_prunable"] for r in again]
    assert all(r["perplexity"] != pytest.approx(a["perplexity"], rel=1e-6) for r, a in zip(reserved["records"], again))
    # decisions under uncertainty on the run folder: the band, a second run against it, ensembles, a bar
    subprocess.run([sys.executable, str(ROOT / "experiments" / "uncertainty.py"), "--run-dir", str(run_dir),
                    "--second", str(run_dir), "--bar", "1e9", "--samples", "2", "--windows", "2", "--ablations", "4",
                    "--out-dir", str(tmp_path / "dec")], check=True, capture_output=True, timeout=600)
    band = json.loads((tmp_path / "dec" / "run_band.json").read_text())
    assert [r["size"] for r in band["records"]] == [0.3, 0.4, 0.5, 0.7, 0.9] and "uncertainty.py" in band["command"]
    # the run against itself: its own cut is the band's median network
    assert all(r["second_seed"] == pytest.approx(r["median_network"], rel=1e-5) for r in band["records"])
    ens = json.loads((tmp_path / "dec" / "run_ensembles.json").read_text())["records"]
    assert [r["predictor"] for r in ens] == ["dense", "median network", "ensemble of 1", "ensemble of 4",
                                             "ensemble of 8"]
    (bar,) = json.loads((tmp_path / "dec" / "run_smallest_size.json").read_text())["records"]
    assert bar["size"] == 0.1 and bar["meets_bar_on_reserved"]
    calibration = json.loads((tmp_path / "dec" / "run_keep_calibration.json").read_text())["records"]
    assert sum(r["units"] for r in calibration) == 4 and (tmp_path / "dec" / "run_keep_calibration.png").exists()
    seeds = json.loads((tmp_path / "dec" / "run_seed_disagreement.json").read_text())["records"]
    assert sorted(r["size"] for r in seeds) == [0.3, 0.4, 0.5, 0.7, 0.9] and all(r["observed"] == 0 for r in seeds)
    # a bar on general English needs the run's real tokenizer: refused by name on a smoke run's random tokens
    refused = subprocess.run([sys.executable, str(ROOT / "experiments" / "uncertainty.py"), "--run-dir", str(run_dir),
                              "--bar", "10", "--general", "--parts", "smallest_size", "--out-dir", str(tmp_path / "g")],
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "--general measures general English" in refused.stderr


def test_scratch_smoke(tmp_path):
    _smoke("scratch.py", "--run-root", tmp_path / "runs", "--out-dir", tmp_path)
    doc = json.loads((tmp_path / "scratch_smoke.json").read_text())
    rows = doc["records"]
    assert [r["method"] for r in rows[:2]] == ["dense (a)", "gated full pass (b)"]
    for method in ("ppn (b)", "flap (a)", "sparsegpt (a)", "wanda (a)"):
        mine = [r for r in rows if r["method"] == method]
        assert [r["size"] for r in mine] == [0.9, 0.7, 0.5, 0.4, 0.3, 0.2]
        assert all(r["kept_fraction"] <= r["size"] + 1e-9 and r["perplexity"] > 1 for r in mine)
    assert all(r["ratio_to_dense_a"] == pytest.approx(r["perplexity"] / rows[0]["perplexity"]) for r in rows)
    assert doc["config"]["dense_fit"]["lr_decay"] == "cosine" and doc["config"]["gated_fit"]["sandwich"]
    assert (tmp_path / "scratch_smoke.png").exists()


def test_gate_gap_smoke(tmp_path):
    _smoke("gate_gap.py", "--out-dir", tmp_path)
    rows = json.loads((tmp_path / "gate_gap_smoke.json").read_text())["records"]
    assert [r["size"] for r in rows] == [0.9, 0.7, 0.5, 0.4, 0.3]
    assert all(r["hard_pruned_perplexity"] > 1 and r["soft_gated_perplexity"] > 1 for r in rows)


def test_finetune_dense_smoke(tmp_path):
    import ppn

    _smoke("finetune_dense.py", "--out-dir", tmp_path, "--save", tmp_path / "tuned")
    doc = json.loads((tmp_path / "finetune_dense_smoke.json").read_text())
    rows = doc["records"]
    assert [r["method"] for r in rows] == ["dense", "dense fine-tuned (ppn fit budget)"]
    assert rows[1]["train_tokens"] == 4 * 2 * 33 and doc["config"]["save"] == str(tmp_path / "tuned")
    # the saved model is the tuned one: its perplexity on the same windows is the row's
    tuned = ppn.load_model(tmp_path / "tuned")
    rng = np.random.default_rng(0)  # the script's smoke text: train, then valid
    rng.integers(0, 97, 10_000)
    valid = rng.integers(0, 97, 4 * 64)
    assert ppn.perplexity(tuned, valid, seqlen=64, max_windows=2).perplexity == pytest.approx(rows[1]["perplexity"],
                                                                                            rel=1e-5)


def test_fit_memory_smoke(tmp_path):
    _smoke("fit_memory.py", "--out-dir", tmp_path, "--variant", "sizes")
    doc = json.loads((tmp_path / "fit_memory_smoke.json").read_text())
    assert doc["config"]["fit"]["size_sampling"] == "sequence" and doc["config"]["fit"]["teacher"] is None  # the variant
    rows = doc["records"]
    assert [r["phase"] for r in rows] == ["model and data loaded", "fit start (init, compile)", "fit steps"]
    loaded = rows[0]["peak_gib"]
    assert all(0.05 < r["median_gib"] <= r["peak_gib"] < 64 for r in rows)
    assert rows[2]["peak_gib"] >= loaded * 0.9 and rows[1]["seconds"] > 0 and rows[2]["seconds"] > 0
    steps = rows[2]
    assert steps["step_per_forward"] > 1 and 0 <= steps["system_cpu_share"] <= 1
    assert steps["minor_faults_per_second"] >= 0 and steps["allocator"]


def test_size_tracking_smoke(tmp_path):
    _smoke("size_tracking.py", "--out-dir", tmp_path)
    rows = json.loads((tmp_path / "size_tracking_smoke.json").read_text())["records"]
    assert [r["constraint"] for r in rows] == ["offset", "lagrange"] and all(r["steps"] == 6 for r in rows)
    assert rows[0]["max_abs_error"] < 1e-4  # the push offset solves E[size] = rho at every step
    assert rows[1]["max_abs_error"] > rows[0]["max_abs_error"]
    assert (tmp_path / "size_tracking_smoke.png").read_bytes()[:4] == b"\x89PNG"


def test_size_tracking_names_a_folder_that_is_not_a_run(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "experiments" / "size_tracking.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and "no metrics.jsonl" in run.stderr


def _bench_file(path, tokens, ppn_ppl, dense_ppl, dense_tokens=None):
    rows = [{"method": "ppn", "size": 0.5, "tokens_used": tokens, "perplexity": ppn_ppl},
            {"method": "dense fine-tuned (fit budget)", "size": 1.0, "tokens_used": dense_tokens or tokens,
             "perplexity": dense_ppl}]
    path.write_text(json.dumps({"records": rows}))
    return path


def _budget_study(*args):
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "budget_study.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_budget_study_draws_the_measured_budgets_only(tmp_path):
    """Two budgets short of the aim: two rows, nothing extrapolated beyond them."""
    files = [_bench_file(tmp_path / f"b{t}.json", t, 20 * 3 * (t / 1e5) ** -0.5, 20.0) for t in (200_000, 100_000)]
    run = _budget_study(*files, "--out-dir", tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads((tmp_path / "budget_study.json").read_text())["records"]
    assert [r["train_tokens"] for r in rows] == [100_000, 200_000] and not any(r["meets_aim"] for r in rows)
    assert (tmp_path / "budget_study.png").read_bytes()[:4] == b"\x89PNG"


def test_budget_study_reports_a_measured_budget_that_meets_the_aim(tmp_path):
    files = [_bench_file(tmp_path / "a.json", 100, 60.0, 20.0), _bench_file(tmp_path / "b.json", 400, 29.0, 20.0)]
    assert _budget_study(*files, "--out-dir", tmp_path).returncode == 0
    rows = json.loads((tmp_path / "budget_study.json").read_text())["records"]
    assert [r["meets_aim"] for r in rows] == [False, True]


def test_budget_study_pairs_a_fit_file_with_a_fine_tune_file_of_the_same_budget(tmp_path):
    """ppn rows from `ppn fit` (train_tokens) meet the fine-tuned row of a separate bench file."""
    fit = tmp_path / "fit.json"
    fit.write_text(json.dumps({"records": [
        {"method": "dense", "size": 1.0, "train_tokens": 0, "perplexity": 31.0},
        {"method": "ppn", "size": 0.5, "train_tokens": 400, "perplexity": 36.0},
        {"method": "ppn", "size": 0.3, "train_tokens": 400, "perplexity": 60.0}]}))
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({"records": [{"method": "dense fine-tuned (fit budget)", "size": 1.0,
                                              "tokens_used": 400, "perplexity": 20.0}]}))
    files = [_bench_file(tmp_path / "a.json", 100, 60.0, 20.0), fit, tuned]
    assert _budget_study(*files, "--out-dir", tmp_path).returncode == 0
    rows = json.loads((tmp_path / "budget_study.json").read_text())["records"]
    assert [(r["train_tokens"], r["ratio"]) for r in rows[:2]] == [(100, 3.0), (400, 1.8)]
    assert rows[1]["source"] == "fit.json + tuned.json"


def test_budget_study_refuses_two_different_ppn_runs_of_one_budget(tmp_path):
    files = [_bench_file(tmp_path / "a.json", 100, 60.0, 20.0), _bench_file(tmp_path / "b.json", 100, 50.0, 20.0)]
    run = _budget_study(*files, "--out-dir", tmp_path)
    assert run.returncode != 0 and "100 training tokens: ppn@0.5 rows disagree" in run.stderr


def test_budget_study_reads_only_the_dense_row_of_a_dense_file(tmp_path):
    """A bench file whose ppn rows are another fit's gives its dense row alone; as a plain file it conflicts."""
    fit, other = _bench_file(tmp_path / "fit.json", 100, 60.0, 20.0), _bench_file(tmp_path / "old.json", 400, 50.0, 25.0)
    mine = _bench_file(tmp_path / "mine.json", 400, 40.0, 25.0, dense_tokens=1)  # its dense row is of another budget
    run = _budget_study(fit, mine, "--dense", other, "--out-dir", tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads((tmp_path / "budget_study.json").read_text())["records"]
    assert [(r["train_tokens"], r["ppn_perplexity"], r["ratio"]) for r in rows] == [(100, 60.0, 3.0), (400, 40.0, 1.6)]
    assert _budget_study(fit, mine, other, "--out-dir", tmp_path).returncode != 0  # 40 and 50 at one budget


def test_budget_study_refuses_unequal_budgets_and_missing_rows(tmp_path):
    run = _budget_study(_bench_file(tmp_path / "a.json", 100, 60.0, 20.0, dense_tokens=50), "--out-dir", tmp_path)
    assert run.returncode != 0 and "not an equal budget" in run.stderr
    (tmp_path / "c.json").write_text(json.dumps({"records": [{"method": "ppn", "size": 0.5, "tokens_used": 1,
                                                               "perplexity": 2.0}]}))
    run = _budget_study(tmp_path / "c.json", "--out-dir", tmp_path)
    assert run.returncode != 0 and "dense fine-tuned" in run.stderr
    run = _budget_study(_bench_file(tmp_path / "d.json", 100, 60.0, 20.0), "--size", "0.3", "--out-dir", tmp_path)
    assert run.returncode != 0 and "no ppn row at size 0.3" in run.stderr


# ----------------------------------------------------------------------------- study files
def _studies():
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import run_study
    finally:
        sys.path.pop(0)
    return run_study


@pytest.mark.parametrize("path", sorted((ROOT / "experiments" / "studies").glob("*.toml")), ids=lambda p: p.stem)
def test_every_study_file_parses_and_its_results_record_its_commands(path):
    run_study = _studies()
    study = run_study.load_study(path)
    assert study["study"] == path.stem and (ROOT / study["script"]).exists() and study["run"]
    for run in study["run"]:
        results = ROOT / run["results"]
        if results.exists():  # a run still to do has no file yet
            assert json.loads(results.read_text())["command"] == run_study.command(study, run), run


def test_a_malformed_or_unknown_study_is_named(tmp_path):
    run_study = _studies()
    bad = tmp_path / "bad.toml"
    bad.write_text('study = "bad"\nscript = "x.py"\nabout = "?"\n[[run]]\nargs = "not a list"\nresults = "r.json"\n')
    with pytest.raises(ValueError, match="run 0 needs args"):
        run_study.load_study(bad)
    with pytest.raises(FileNotFoundError, match="known studies: .*quality"):
        run_study.load_study("no-such-study")


def test_parallel_runs_finish_the_others_and_name_the_failure(tmp_path):
    run_study = _studies()
    script = tmp_path / "write.py"
    script.write_text("import sys, pathlib\nprint('hello from', sys.argv[1])\n"
                      "pathlib.Path(sys.argv[1]).write_text('{}')\nsys.exit(int(sys.argv[2]))\n")
    outs = [tmp_path / f"ppn_parallel_test_{i}.json" for i in range(3)]
    runs = "".join(f'[[run]]\nargs = ["{o}", "{int(i == 1)}"]\nresults = "{o}"\n' for i, o in enumerate(outs))
    study = tmp_path / "par.toml"
    study.write_text(f'study = "par"\nscript = "{script}"\nabout = "test"\n{runs}')
    try:
        with pytest.raises(SystemExit, match=f"failed runs: {script} {outs[1]} 1$"):
            run_study.main([str(study)], parallel=2)
        assert all(o.exists() for o in outs)  # the failing run wrote its file before it failed; the others ran on
        assert f"hello from {outs[2]}" in run_study.log_path({"results": str(outs[2])}).read_text()
    finally:
        for o in outs:
            run_study.log_path({"results": str(o)}).unlink(missing_ok=True)


def test_latency_target_smoke(tmp_path):
    _smoke("latency_target.py", "--out-dir", tmp_path)
    doc = json.loads((tmp_path / "latency_target_smoke.json").read_text())
    rows = doc["records"]
    assert [r["target_fraction"] for r in rows] == [1.0, 0.8, 0.6, 0.4]
    # a tiny model's timings are noise (decode can time at 0 ms); each cut is timed and compared with its target
    assert all(r["measured_ms"] >= 0 for r in rows)
    assert all(r["relative_error"] == pytest.approx(r["measured_ms"] / r["target_ms"] - 1) for r in rows[1:])
    # each cut's predicted latency is within its target (the table's fill never overshoots), smaller targets cost less
    assert all(r["predicted_ms"] <= r["target_ms"] * (1 + 1e-9) for r in rows[1:])
    assert [r["predicted_ms"] for r in rows] == sorted((r["predicted_ms"] for r in rows), reverse=True)
    assert doc["config"]["costs_table"]["format"] == "ppn-costs/1" and (tmp_path / "costs_smoke.json").exists()
    # the measured refinement: at most 4 cuts, its error against the same target
    assert all(1 <= r["refined_rounds"] <= 4 for r in rows[1:])
    assert all(r["refined_error"] == pytest.approx(r["refined_ms"] / r["target_ms"] - 1) for r in rows[1:])


def test_fair_rows_smoke(tmp_path):
    _smoke("fair_rows.py", "--out", tmp_path / "fair.json")
    rows = json.loads((tmp_path / "fair.json").read_text())["records"]
    methods = [r["method"] for r in rows]
    assert methods[:2] == ["dense", "sparsegpt"] and "sparsegpt masked fine-tuned (fit budget)" in methods
    assert "dense fine-tuned (fit budget)" in methods and "flap fine-tuned (fit budget)" in methods
    masked = next(r for r in rows if r["method"].startswith("sparsegpt masked"))
    one_shot = rows[1]
    # the mask stays: as many kept weights after fine-tuning as SparseGPT left
    assert masked["kept_prunable"] == one_shot["kept_prunable"] and masked["tokens_used"] > one_shot["tokens_used"]


def test_fair_rows_without_flap_runs_no_flap_row(tmp_path):
    _smoke("fair_rows.py", "--methods", "dense,sparsegpt,finetuned", "--out", tmp_path / "fair.json")
    methods = [r["method"] for r in json.loads((tmp_path / "fair.json").read_text())["records"]]
    assert methods == ["dense", "sparsegpt", "dense fine-tuned (fit budget)", "sparsegpt masked fine-tuned (fit budget)"]


def test_fair_rows_without_dense_tunes_only_the_cut(tmp_path):
    """The rows a budget lacks, without re-tuning the dense model it already has."""
    _smoke("fair_rows.py", "--methods", "sparsegpt,finetuned", "--out", tmp_path / "fair.json")
    methods = [r["method"] for r in json.loads((tmp_path / "fair.json").read_text())["records"]]
    assert methods == ["sparsegpt", "sparsegpt masked fine-tuned (fit budget)"]


def test_fair_rows_with_the_recommended_optimiser_go_to_their_own_file_and_state():
    cfg = _script("fair_rows").config(150, optimizer="recommended")
    assert cfg.finetune_optimizer == "recommended" and cfg.finetune_steps == 150
    assert cfg.out == "results/benchmark/fair_rows_steps150_recommended.json" and cfg.state_dir.endswith("_recommended")
    assert _script("fair_rows").config(150).out == "results/benchmark/fair_rows_steps150.json"


def _fake_run(root, tag, plan, ppl):
    """A finished quality-study run folder under root/runs/quality/<tag>: its plan,
    job.json and the results JSON the job wrote (ppn rows at 0.9 ... 0.3)."""
    run_dir = root / "runs" / "quality" / tag
    plan.save(run_dir / "plan.json")
    (run_dir / "job.json").write_text(json.dumps({"run_dir": f"runs/quality/{tag}",
                                                  "results": f"results/quality/{tag}.json"}))
    records = [{"method": "ppn", "size": s, "perplexity": ppl * (2 - s)} for s in (0.9, 0.7, 0.5, 0.4, 0.3)]
    (root / "results" / "quality").mkdir(parents=True, exist_ok=True)
    (root / "results" / "quality" / f"{tag}.json").write_text(json.dumps({"records": records}))
    return run_dir


def test_map_compare_measures_disagreement_between_guides_and_seeds(tmp_path):
    from ppn.decisions import mismatch
    from ppn.plan import Plan
    from ppn.testing import random_plan, tiny_config

    config = tiny_config(num_layers=4, intermediate_size=128)
    runs = [_fake_run(tmp_path, tag, random_plan(config, seed=seed), ppl) for tag, seed, ppl in
            (("normal0", 0, 10.0), ("normal1", 1, 11.0), ("map0", 0, 12.0), ("map1", 2, 13.0))]
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "experiments" / "map_compare.py"), "--normal", *map(str, runs[:2]),
           "--map", *map(str, runs[2:]), "--out-dir", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads((out / "map_compare.json").read_text())
    by_run = {Path(r["run"]).name: r for r in doc["records"] if r["kind"] == "run"}
    assert by_run["map1"]["ppl_0.5"] == pytest.approx(13.0 * 1.5)
    assert by_run["normal0"]["ppl_0.9"] == pytest.approx(11.0)
    assert all(0 <= r[f"undecided_{s}"] <= 1 for r in by_run.values() for s in (0.9, 0.5, 0.3))
    sizes = [r for r in doc["records"] if r["kind"] == "size"]
    assert [r["size"] for r in sizes] == [0.9, 0.7, 0.5, 0.4, 0.3]
    plans = [Plan.load(r / "plan.json") for r in runs]
    for r in sizes:
        keep = [p.keep(r["size"]) for p in plans]
        assert mismatch(keep[0], keep[0]) == 0
        assert mismatch(keep[1], keep[3]) == pytest.approx(mismatch(keep[3], keep[1]))
        # seed 0's two plans are one plan: the mean over seeds is half of seed 1's (normal) against map1's
        assert r["normal_vs_map_same_seed"] == pytest.approx(mismatch(keep[1], keep[3]) / 2)
        assert r["normal_seed_to_seed"] == pytest.approx(mismatch(keep[0], keep[1]))
    assert 0 < sizes[2]["normal_seed_to_seed"] < 1 and 0 < sizes[2]["map_seed_to_seed"] < 1
    assert doc["config"]["normal"] == [str(p) for p in runs[:2]] and (out / "map_compare.png").stat().st_size > 0
    # the same seeds in both lists, and finished runs only
    bad = subprocess.run(cmd[:5] + ["--map", str(runs[2])], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "same number" in bad.stderr
    (tmp_path / "results" / "quality" / "map1.json").unlink()
    missing = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert missing.returncode != 0 and "results file" in missing.stderr and "map1" in missing.stderr


def test_fresh_machine_runs_the_readme_commands_and_ci_runs_the_test_one():
    fresh = _script("fresh_machine")
    commands = fresh.readme_commands((ROOT / "README.md").read_text())
    assert commands["main"].endswith("ppn fit") and "pytest" in commands["tests"]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [commands["tests"]]
    with pytest.raises(ValueError, match="no section"):
        fresh.readme_commands("# ppn\n")
    with pytest.raises(ValueError, match="exactly two one-line bash blocks"):
        fresh.readme_commands(f"{fresh.SECTION}\n```bash\npip install -e .\n```\n## Next\n```bash\nx\n```\n")


def test_the_recommended_fit_is_the_quality_study_variant_it_was_chosen_from():
    """`FitConfig.recommended()` was chosen on results/quality/combined_lr1e-3_cosine_targets_*:
    the variant's config must be exactly it, and the older variants must keep their meaning."""
    from ppn.fit import FitConfig

    quality = _script("quality_ablation")
    assert quality.job("combined_lr1e-3_cosine_targets").fit == FitConfig.recommended()
    assert quality.job("combined_lr1e-3_cosine_targets_map").fit == FitConfig.recommended(guide="delta")
    assert quality.job("combined_lr3e-4").fit.lr_weights == 3e-4 and not quality.job("combined_lr3e-4").fit.target_sizes


def test_quality_overview_gathers_each_fit_and_takes_general_english_from_a_reevaluation(tmp_path):
    overview = _script("quality_overview")
    folder = tmp_path / "quality"
    folder.mkdir()

    def write(name, general):
        records = [{"method": "ppn (fitted weights, unpruned)", "size": 1.0, "perplexity": 9.0}]
        records += [{"method": "ppn", "size": s, "perplexity": 10 / s, "fit_seconds": 5.0,
                     **({"general_perplexity": 20 / s} if general else {})} for s in overview.SIZES]
        (folder / f"{name}.json").write_text(json.dumps({"git_commit": "abcdef0123", "records": records}))

    write("kl_steps150_seed1", general=False)
    write("kl_steps150_seed1_quick", general=True)  # the re-evaluation with general English
    write("targets_steps600_seed0", general=True)
    (folder / "targets_steps600_seed0.plan.json").write_text("{}")  # a plan beside a fit is not a fit
    fair = tmp_path / "fair.json"
    fair.write_text(json.dumps({"records": [
        {"method": "dense", "size": 1.0, "perplexity": 8.0, "general_perplexity": 7.0},
        {"method": "flap", "size": 0.5, "perplexity": 900.0, "general_perplexity": 2000.0},
        {"method": "sparsegpt masked fine-tuned (fit budget)", "size": 0.5, "perplexity": 9.0,
         "general_perplexity": None}]}))
    rows = overview.main(str(folder), str(fair))
    assert [(r["variant"], r["steps"], r["seed"]) for r in rows] == [("kl", 150, 1), ("targets", 600, 0)]
    assert rows[0]["ppl_0.5"] == pytest.approx(20.0) and rows[0]["general_0.5"] == pytest.approx(40.0)
    assert rows[0]["unpruned"] == 9.0 and rows[0]["commit"] == "abcdef0"
    doc = json.loads((folder / "quality_overview.json").read_text())
    assert len(doc["records"]) == 2 and (folder / "quality_overview.png").stat().st_size > 0
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no quality-study results"):
        overview.fits(empty)
