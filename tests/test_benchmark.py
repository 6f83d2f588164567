"""The benchmark end to end on a tiny model: every method's rows, the results
schema, resuming, and bad settings."""

import dataclasses
import json

import pytest

from ppn.harness import benchmark
from ppn.harness.benchmark import BenchConfig
from ppn.cli import main

ROW_TYPES = {"method": str, "pattern": str, "size": float, "kept_prunable": int, "kept_fraction": float,
             "kept_total": int, "perplexity": float, "eval": str, "tokens_used": int, "prune_seconds": float}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig.smoke_test(root)
    return cfg, benchmark.run(cfg, progress=False)


def test_every_method_has_its_rows(smoke):
    cfg, rows = smoke
    keys = {r["key"] for r in rows}
    assert "dense" in keys and "dense fine-tuned" in keys and "best structured fine-tuned@0.5" in keys
    assert "sparsegpt masked fine-tuned@0.5" in keys
    for s in cfg.sizes:
        assert {f"{m}@{s}" for m in ("ppn", "block_influence", "flap", "wanda_structured", "random")} <= keys
    for s in cfg.unstructured_sizes:
        assert {f"{m}@{s}" for m in ("magnitude", "wanda", "sparsegpt")} <= keys
    assert {f"{m} {nm}@0.5" for m in ("magnitude", "wanda", "sparsegpt") for nm in ("2:4", "4:8")} <= keys


def test_results_match_the_schema(smoke):
    cfg, rows = smoke
    doc = json.loads(open(cfg.out).read())
    assert doc["experiment"] == "benchmark_smoke" and doc["machine"]["cpu_count"] >= 1
    assert doc["config"] == json.loads(json.dumps(dataclasses.asdict(cfg)))  # the whole config, enough to rerun it
    assert len(doc["records"]) == len(rows)
    dense = next(r for r in doc["records"] if r["method"] == "dense")
    for r in doc["records"]:
        for column, kind in ROW_TYPES.items():
            assert isinstance(r[column], kind) or (kind is float and isinstance(r[column], int)), (r["key"], column)
        assert 0 < r["kept_fraction"] <= 1 and r["perplexity"] > 1
        assert r["kept_total"] - r["kept_prunable"] == dense["kept_total"] - dense["kept_prunable"]
        if r["pattern"] == "structured" and "fine-tuned" not in r["method"]:
            assert r["prefill_ratio"] > 0 and r["decode_ratio"] > 0
    for r in doc["records"]:
        if r["pattern"] in ("unstructured", "2:4", "4:8"):
            # one-shot unstructured pruning removes exactly 1 - rho of every block linear (norms stay)
            assert r["kept_fraction"] == pytest.approx(r["size"], abs=0.01)
        elif r["method"] == "ppn":
            assert r["kept_fraction"] <= r["size"] + 1e-9
    md = open(cfg.out.replace(".json", ".md")).read()
    assert "Wall time per method" in md and "| ppn |" in md
    assert open(cfg.out.replace(".json", ".png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_finished_benchmark_resumes_without_recomputing(smoke, monkeypatch):
    cfg, rows = smoke
    lines = open(f"{cfg.state_dir}/rows.jsonl").read().splitlines()
    monkeypatch.setattr(benchmark, "prune_unstructured", lambda *a, **k: pytest.fail("recomputed a finished row"))
    again = benchmark.run(cfg, progress=False)
    assert [r["perplexity"] for r in again] == [r["perplexity"] for r in rows]
    assert open(f"{cfg.state_dir}/rows.jsonl").read().splitlines() == lines


def test_finetuned_without_structured_baselines_tunes_the_dense_model_only(smoke, tmp_path):
    cfg = BenchConfig.smoke_test(tmp_path, plan=smoke[0].plan, methods=("dense", "ppn", "finetuned"), speed=False)
    rows = benchmark.run(cfg, progress=False)
    assert [r["key"] for r in rows] == ["dense", "ppn@0.5", "dense fine-tuned"]
    assert rows[2]["tokens_used"] == rows[1]["tokens_used"] > 0  # the budget study's equal budget


def test_finetune_steps_sets_the_budget_without_a_plan(tmp_path):
    """The fine-tuned row of a fit whose plan is not at hand: FitConfig defaults with N steps, no fit run."""
    from ppn.fit import FitConfig

    cfg = BenchConfig.smoke_test(tmp_path, methods=("finetuned",), finetune_steps=3, speed=False)
    rows = benchmark.run(cfg, progress=False)
    defaults = FitConfig()
    assert [r["key"] for r in rows] == ["dense fine-tuned"]
    assert rows[0]["tokens_used"] == FitConfig(steps=3).train_tokens == 3 * defaults.batch_size * (defaults.seqlen + 1)
    assert not (tmp_path / "fit").exists()


def test_the_fine_tunes_take_the_recommended_fits_optimiser_when_asked(tmp_path):
    """Same tokens, with the fit's own learning rate and schedule when asked."""
    from ppn.fit import FitConfig

    def tuning(optimizer):
        cfg = BenchConfig.smoke_test(tmp_path, finetune_steps=12, finetune_optimizer=optimizer)
        return benchmark._Bench(cfg, False, {}).fit_config()

    assert tuning("default") == FitConfig(steps=12)
    assert tuning("recommended") == FitConfig.recommended(steps=12)
    assert tuning("recommended").train_tokens == tuning("default").train_tokens
    with pytest.raises(ValueError, match="finetune_optimizer must be 'default' or 'recommended', got 'sgd'"):
        BenchConfig(finetune_optimizer="sgd")


def test_a_row_cut_by_a_kill_is_recomputed(tmp_path):
    cfg = BenchConfig.smoke_test(tmp_path, methods=("dense", "magnitude"), speed=False)
    first = benchmark.run(cfg, progress=False)
    path = tmp_path / "state" / "rows.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    again = benchmark.run(cfg, progress=False)
    assert [r["key"] for r in again] == [r["key"] for r in first]
    assert again[-1]["perplexity"] == pytest.approx(first[-1]["perplexity"], rel=1e-6)


def test_a_state_folder_of_other_settings_is_refused(tmp_path):
    (dense,) = benchmark.run(BenchConfig.smoke_test(tmp_path, methods=("dense",), speed=False), progress=False)
    for other in (dict(eval_windows=3), dict(split="reserved")):
        with pytest.raises(ValueError, match="other settings"):
            benchmark.run(BenchConfig.smoke_test(tmp_path, methods=("dense",), speed=False, **other), progress=False)
    # the reserved split is other text: the same model, another perplexity, its title saying so
    (reserved,) = benchmark.run(BenchConfig.smoke_test(tmp_path / "r", methods=("dense",), speed=False,
                                                       split="reserved"), progress=False)
    assert reserved["perplexity"] != pytest.approx(dense["perplexity"], rel=1e-6)
    assert "reserved perplexity" in (tmp_path / "r" / "benchmark_smoke.md").read_text()


@pytest.mark.parametrize("fields, message", [
    (dict(methods=("dense", "obs")), "unknown method"),
    (dict(nm=((4, 4),)), "0 < N < M"),
    (dict(sizes=(0.5, 1.5)), r"\(0, 1\]"),
    (dict(unstructured_sizes=(0.0,)), r"\(0, 1\]"),
    (dict(finetune_steps=0), "positive number of steps"),
    (dict(split="test"), "'validation' or 'reserved'"),
])
def test_bad_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        BenchConfig(**fields)


def test_cli_names_an_unknown_method(tmp_path, capsys):
    assert main(["bench", "--smoke", "--state-dir", str(tmp_path), "--methods", "dense,obs"]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_cli_sets_the_sizes_and_patterns():
    from ppn.cli import build_parser
    from ppn.harness.arguments import bench_config

    quick = bench_config(build_parser().parse_args(["bench", "--quick"]))
    assert quick.sizes == benchmark.QUICK_SIZES and quick.nm == ((2, 4),) and quick.eval_windows == 64
    cfg = bench_config(build_parser().parse_args(
        ["bench", "--quick", "--sizes", "0.9,0.7,0.5,0.4,0.3", "--unstructured-sizes", "0.4", "--nm", "2:4,4:8"]))
    assert cfg.sizes == benchmark.SIZES and cfg.unstructured_sizes == (0.4,) and cfg.nm == ((2, 4), (4, 8))
    assert cfg.eval_windows == 64  # the rest of the preset stays
    assert bench_config(build_parser().parse_args(["bench", "--nm", ""])).nm == ()


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "0.5,half"], "comma-separated fractions"),
    (["--nm", "2-4"], "N:M patterns"),
])
def test_cli_names_a_malformed_list(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--smoke", *argv])
    assert message in capsys.readouterr().err


def test_cli_refuses_sizes_outside_the_range(tmp_path, capsys):
    assert main(["bench", "--smoke", "--state-dir", str(tmp_path), "--sizes", "0.5,1.2"]) == 2
    assert "(0, 1]" in capsys.readouterr().err
