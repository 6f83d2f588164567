"""The `ppn` command line on a tiny checkpoint."""

import json
import logging
import os
import subprocess
import sys
import warnings
from importlib.metadata import version

import numpy as np
import pytest

import ppn
from ppn import cli, data, speed
from ppn.harness import arguments
from ppn.testing import smoke_fit_config, tiny_model, tiny_tokens


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A tiny model saved with a real (byte-level BPE) tokenizer trained on a few lines."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["to be or not to be, that is the question"] * 10,
                            trainers.BpeTrainer(vocab_size=97, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    model = tiny_model(vocab_size=tok.get_vocab_size())
    return ppn.save_model(model, tmp_path / "ckpt", tokenizer=tokenizer), model


def test_eval_writes_results(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("PPN_CACHE", str(tmp_path / "cache"))
    path, model = tiny_checkpoint
    text = tmp_path / "corpus.txt"
    text.write_text("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 40)
    out = tmp_path / "res" / "ev.json"
    assert cli.main(["eval", "--model", str(path), "--text", str(text), "--out", str(out)]) == 0
    record = json.loads(out.read_text())["records"][0]
    assert record["windows"] >= 1 and record["tokens"] == record["windows"] * 511
    assert np.isfinite(record["perplexity"]) and record["perplexity"] > 1
    printed = capsys.readouterr()
    assert printed.out == f"{out}\n"  # stdout: the path alone, for scripts
    assert f"perplexity {record['perplexity']:.3f}" in printed.err
    assert out.with_suffix(".md").exists()
    # --quiet, before or after the command: no messages and no progress bar
    for argv in (["--quiet", "eval"], ["eval", "-q"]):
        assert cli.main([*argv, "--model", str(path), "--text", str(text), "--out", str(out)]) == 0
        assert capsys.readouterr() == (f"{out}\n", "")
    # --text general: that split of the general-English text (stood in for here: it is fetched once)
    monkeypatch.setattr(data, "general_english", lambda split: f"{split} " + text.read_text())
    assert cli.main(["eval", "--model", str(path), "--text", "general", "--split", "reserved", "--out", str(out)]) == 0
    general = json.loads(out.read_text())["records"][0]
    assert general["data"] == "general/reserved" and general["perplexity"] != record["perplexity"]


def test_eval_reports_a_missing_model_clearly(tmp_path, capsys, monkeypatch):
    """Said once, even where a library has given the root logger a handler of its own."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.StreamHandler(sys.stderr)])
    assert cli.main(["eval", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "r.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ppn eval: error: no checkpoint at") and err.count("no checkpoint at") == 1
    assert not (tmp_path / "r.json").exists()


def test_unknown_subcommand_exits():
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])


def test_resize_writes_a_smaller_checkpoint(tmp_path, tiny_checkpoint, capsys):
    path, model = tiny_checkpoint
    result = ppn.fit(model, tiny_tokens(2000, vocab_size=model.config.vocab_size), smoke_fit_config(steps=2),
                     progress=False)
    plan = ppn.Plan.from_fit(result)
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "small"
    assert cli.main(["resize", "--plan", str(tmp_path / "plan.json"), "--size", "0.5", "--from", str(path),
                     "--out", str(out)]) == 0
    small = ppn.load_model(out)
    assert small.config.num_prunable_params() == plan.keep(0.5).num_params()
    expected = ppn.prune(ppn.load_model(path), plan, 0.5)
    ids = np.arange(10)[None] % model.config.vocab_size
    np.testing.assert_array_equal(np.asarray(small(ids)), np.asarray(expected(ids)))
    assert (out / "tokenizer.json").exists()
    assert capsys.readouterr().out == f"{out}\n"
    assert cli.main(["resize", "--plan", str(tmp_path / "plan.json"), "--size", "1.7", "--from", str(path),
                     "--out", str(tmp_path / "x")]) == 1
    assert "must be whole" in capsys.readouterr().err
    amount = plan.units.costs("flops").base + 0.5 * plan.units.costs("flops").of(plan.units.full())
    assert cli.main(["resize", "--plan", str(tmp_path / "plan.json"), "--size", str(amount), "--cost", "flops",
                     "--from", str(path), "--out", str(tmp_path / "flops")]) == 0
    flops = ppn.load_model(tmp_path / "flops").config.num_prunable_params()
    assert flops == ppn.Plan.load(tmp_path / "plan.json").keep(amount, cost="flops").num_params()


def test_resize_to_the_smallest_size_meeting_a_perplexity_bar(tmp_path, tiny_checkpoint, capsys):
    path, model = tiny_checkpoint
    result = ppn.fit(model, tiny_tokens(2000, vocab_size=model.config.vocab_size), smoke_fit_config(steps=2),
                     progress=False)
    ppn.Plan.from_fit(result).save(tmp_path / "plan.json")
    text = tmp_path / "corpus.txt"
    text.write_text("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 60)
    argv = ["resize", "--plan", str(tmp_path / "plan.json"), "--from", str(path), "--text", str(text),
            "--samples", "2", "--windows", "2", "--prob", "0.9"]
    out = tmp_path / "small"
    # a bar every size meets: the smallest size searched, cut and saved
    assert cli.main([*argv, "--max-perplexity", "1e9", "--out", str(out)]) == 0
    assert ppn.load_model(out).config.num_prunable_params() == ppn.Plan.load(tmp_path / "plan.json").keep(0.1).num_params()
    assert "size 0.1: perplexity <= 1000000000.0 with probability 1.000" in capsys.readouterr().err
    # a bar even the dense model misses: what it reaches, and nothing written
    assert cli.main([*argv, "--max-perplexity", "1.01", "--out", str(tmp_path / "none")]) == 1
    assert "the dense network reaches it with probability 0.000" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    with pytest.raises(SystemExit):  # a size and a bar: one or the other
        cli.main([*argv, "--size", "0.5", "--max-perplexity", "10", "--out", str(out)])


def test_profile_writes_a_latency_table_that_resize_cuts_to(tmp_path, tiny_checkpoint, capsys):
    path, model = tiny_checkpoint
    costs = tmp_path / "costs.json"
    assert cli.main(["profile", "--model", str(path), "--context", "16", "--repeats", "1", "--out", str(costs)]) == 0
    assert capsys.readouterr().out == f"{costs}\n"
    plan = ppn.fit(model, tiny_tokens(2000, vocab_size=model.config.vocab_size), smoke_fit_config(steps=2),
                   progress=False)
    plan = ppn.Plan.from_fit(plan)
    plan.save(tmp_path / "plan.json")
    table = speed.load_costs(costs, plan.units)
    target = table.base + 0.7 * table.of(plan.units.full())
    assert cli.main(["resize", "--plan", str(tmp_path / "plan.json"), "--size", str(target), "--cost", str(costs),
                     "--from", str(path), "--out", str(tmp_path / "fast")]) == 0
    assert ppn.load_model(tmp_path / "fast").config.num_prunable_params() == plan.keep(target, cost=str(costs)).num_params()
    # --measure times the cut and corrects it (a tiny model's timings are noise: it runs and writes a model)
    assert cli.main(["resize", "--plan", str(tmp_path / "plan.json"), "--size", str(target), "--cost", str(costs),
                     "--from", str(path), "--measure", "--out", str(tmp_path / "timed")]) == 0
    assert 0 < ppn.load_model(tmp_path / "timed").config.num_prunable_params() <= plan.units.total
    assert cli.main(["resize", "--plan", str(tmp_path / "plan.json"), "--size", "0.7", "--measure",
                     "--from", str(path), "--out", str(tmp_path / "none")]) == 2
    assert "--measure needs --cost COSTS.json" in capsys.readouterr().err and not (tmp_path / "none").exists()
    with pytest.raises(SystemExit) as e:
        cli.main(["resize", "--plan", "p.json", "--size", "0.5", "--cost", "watts", "--out", "o"])
    assert e.value.code == 2 and "COSTS.json" in capsys.readouterr().err


def test_fit_set_overrides_any_fit_config_field():
    from ppn.cli import build_parser
    from ppn.harness.arguments import job_config

    args = build_parser().parse_args(["fit", "--steps", "7", "--set", "lr_weights=1e-4", "--set", "init=prior",
                                      "--set", "train_weights=false", "--set", "data_tokens=none"])
    fit = job_config(args).fit
    assert (fit.steps, fit.lr_weights, fit.init, fit.train_weights, fit.data_tokens) == (7, 1e-4, "prior", False, None)


@pytest.mark.parametrize("pair, message", [("nope=1", "FIELD one of"), ("steps=many", "takes a int"),
                                           ("train_weights=maybe", "true or false"), ("init=bogus", "unknown init")])
def test_fit_set_rejects_bad_overrides(pair, message, capsys):
    assert cli.main(["fit", "--smoke", "--set", pair]) == 2
    assert message in capsys.readouterr().err


def test_random_weights_need_only_the_config_and_tokenizer(tiny_checkpoint):
    from ppn.checkpoint import random_model
    from ppn.harness.job import load_inputs

    path, saved = tiny_checkpoint
    for f in path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError):
        ppn.load_model(path)
    model, tokenizer, train, valid = load_inputs(str(path), random_weights=True)
    assert model.config == saved.config and ppn.count_params(model) == ppn.count_params(saved)
    other = random_model(path, seed=1)
    assert not np.allclose(np.asarray(model.embed[...]), np.asarray(other.embed[...]))
    assert tokenizer is not None and train.max() < saved.config.vocab_size and len(valid) > 0
    assert random_model(path, dtype="bfloat16").dtype == np.dtype("bfloat16")
    job = arguments.job_config(cli.build_parser().parse_args(["fit", "--model", str(path), "--random-weights"]))
    assert job.random_weights and job.model == str(path)
    with pytest.raises(ValueError, match="not a file"):
        random_model(path / "config.json")


def test_exit_codes_say_what_went_wrong(tmp_path, capsys, monkeypatch):
    """1: the command failed; 2: bad arguments; 130: interrupted, one line and no traceback."""
    assert cli.main(["resize", "--plan", str(tmp_path / "none.json"), "--size", "0.5", "--out", str(tmp_path)]) == 1
    assert "ppn resize: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["resize", "--plan", "p.json", "--size", "0.5", "--out", "o", "--frobnicate"])
    assert e.value.code == 2 and "unrecognized arguments: --frobnicate" in capsys.readouterr().err

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_fetch", interrupted)
    assert cli.main(["fetch", "smollm2-135m"]) == 130
    assert capsys.readouterr() == ("", "ppn fetch: interrupted\n")


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"ppn {version('ppn')} (malloc: ")


def test_tqdm_disable_turns_the_bars_off(tmp_path):
    """tqdm reads TQDM_DISABLE when it is imported and only for bars given no `disable`."""
    script = ("import numpy as np; from ppn.testing import tiny_model; from ppn.evaluate import perplexity; "
              "perplexity(tiny_model(), np.arange(64) % 97, seqlen=16)")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    hidden = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=env | {"TQDM_DISABLE": "1"})
    assert shown.returncode == hidden.returncode == 0, shown.stderr + hidden.stderr
    assert "perplexity: 100%" in shown.stderr and "perplexity" not in hidden.stderr


def test_fit_flags_reach_the_configs(tmp_path, capsys):
    args = cli.build_parser().parse_args(["fit", "--run-dir", str(tmp_path / "run"), "--target-sizes", "0.5,0.3",
                                          "--teacher", "start", "--set", "teacher_weight=0.5",
                                          "--train-text", "mine.txt", "--valid-text", "notes"])
    job = arguments.job_config(args)
    assert (job.fit.target_sizes, job.fit.teacher, job.fit.teacher_weight) == ((0.5, 0.3), "start", 0.5)
    assert (job.train_text, job.valid_text) == ("mine.txt", "notes")
    assert job.results == str(tmp_path / "run" / "results.json")  # the run folder, not ./results
    # the main job fits with the recommended quality options unless told otherwise
    assert arguments.job_config(cli.build_parser().parse_args(["fit"])).fit == ppn.FitConfig.recommended()
    assert arguments.job_config(cli.build_parser().parse_args(["fit", "--set", "rescale=false"])).fit.rescale is False
    args = cli.build_parser().parse_args(["fit", "--set", "target_sizes=0.4,0.2", "--results", "r/x.json"])
    assert arguments.job_config(args).fit.target_sizes == (0.4, 0.2) and arguments.job_config(args).results == "r/x.json"
    for bad in ("0.5,1.5", "0", "half"):
        with pytest.raises(SystemExit) as e:
            cli.build_parser().parse_args(["fit", "--target-sizes", bad])
        assert e.value.code == 2 and "(0, 1]" in capsys.readouterr().err


def test_own_text_replaces_the_shakespeare_splits(tmp_path, tiny_checkpoint):
    from ppn import data
    from ppn.harness.job import load_inputs

    path, _ = tiny_checkpoint
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("to be or not to be " * 50)
    (folder / "sub" / "b.md").write_text("# that is the question\n" * 20)
    (folder / "skip.json").write_text("{}")
    valid = tmp_path / "valid.txt"
    valid.write_text("whether tis nobler in the mind to suffer " * 30)
    _, tokenizer, train_ids, valid_ids = load_inputs(str(path), train_text=str(folder), valid_text=str(valid))
    np.testing.assert_array_equal(train_ids, data.tokenize(data.load_text(folder), tokenizer))
    np.testing.assert_array_equal(valid_ids, data.tokenize(valid.read_text(), tokenizer))
    assert data.load_text(folder) == "to be or not to be " * 50 + "\n\n" + "# that is the question\n" * 20
    # several weighted sources: mixed by weight, "shakespeare" naming the train split
    _, _, mixed, _ = load_inputs(str(path), train_text=(f"{folder}=1", f"{valid}=3"))
    np.testing.assert_array_equal(mixed, data.mix_tokens([train_ids, valid_ids], [1, 3]))
    args = cli.build_parser().parse_args(["fit", "--train-text", "shakespeare=0.8", "--train-text", f"{folder}=0.2"])
    assert arguments.job_config(args).train_text == ("shakespeare=0.8", f"{folder}=0.2")


def test_quiet_smoke_fit_on_own_text_writes_into_the_run_folder(tmp_path, capsys):
    text = tmp_path / "own.txt"
    text.write_text("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 60)
    run_dir = tmp_path / "run"
    assert cli.main(["--quiet", "fit", "--smoke", "--run-dir", str(run_dir), "--train-text", str(text),
                     "--valid-text", str(text)]) == 0
    assert capsys.readouterr() == (f"{run_dir / 'results.json'}\n", "")
    rows = json.loads((run_dir / "results.json").read_text())["records"]
    assert (run_dir / "results.md").exists() and [r["size"] for r in rows if r["method"] == "ppn"] == [
        0.9, 0.7, 0.5, 0.4, 0.3]
    job = json.loads((run_dir / "job.json").read_text())
    assert job["train_text"] == job["valid_text"] == str(text)


@pytest.fixture
def jax_cache_config():
    """JAX's cache settings, as a process without JAX_COMPILATION_CACHE_DIR starts, restored afterwards."""
    import jax

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", None)
    yield jax.config
    for name, value in saved.items():
        jax.config.update(name, value)


def test_the_compilation_cache_is_on_in_the_ppn_cache_unless_turned_off(tmp_path, monkeypatch, jax_cache_config):
    monkeypatch.setenv("PPN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PPN_NO_COMPILATION_CACHE", raising=False)
    monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
    assert cli.enable_compilation_cache(False) is None and jax_cache_config.jax_compilation_cache_dir is None
    monkeypatch.setenv("PPN_NO_COMPILATION_CACHE", "1")
    assert cli.enable_compilation_cache() is None and jax_cache_config.jax_compilation_cache_dir is None
    monkeypatch.setenv("PPN_NO_COMPILATION_CACHE", "0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.enable_compilation_cache() == str(tmp_path / "cache" / "jax")
        # a program JAX cannot write to the cache is compiled again next time; nothing for the user to read
        warnings.warn("Error writing persistent compilation cache entry for 'jit_init': JaxRuntimeError")
        warnings.warn("any other warning")
    assert [str(w.message) for w in caught] == ["any other warning"]
    assert jax_cache_config.jax_compilation_cache_dir == str(tmp_path / "cache" / "jax")
    assert jax_cache_config.jax_persistent_cache_min_compile_time_secs == cli.CACHE_MIN_COMPILE_SECS
    jax_cache_config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))  # one set by the user stays
    assert cli.enable_compilation_cache() == str(tmp_path / "mine")
    for argv in (["--no-compilation-cache", "fit"], ["fit", "--no-compilation-cache"]):
        assert cli.build_parser().parse_args(argv).compilation_cache is False
    assert cli.build_parser().parse_args(["fit"]).compilation_cache is True


def test_a_command_fills_the_compilation_cache(tmp_path, tiny_checkpoint):
    """In a fresh process, as `ppn` runs: compiled programs land in <PPN_CACHE>/jax."""
    path, _ = tiny_checkpoint
    text = tmp_path / "corpus.txt"
    text.write_text("Shall I compare thee to a summer's day? " * 40)
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "PPN_NO_COMPILATION_CACHE",
                                                             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    env["PPN_CACHE"] = str(tmp_path / "cache")
    argv = [sys.executable, "-m", "ppn.cli", "--quiet", "eval", "--model", str(path), "--text", str(text),
            "--out", str(tmp_path / "ev.json")]
    run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert any((tmp_path / "cache" / "jax").glob("*-cache"))


def test_the_main_jobs_dense_row_is_measured_once_per_weights_and_texts(tmp_path, monkeypatch):
    from ppn.harness import job

    monkeypatch.setenv("PPN_CACHE", str(tmp_path / "cache"))
    calls = []
    real = job.perplexity
    monkeypatch.setattr(job, "perplexity", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, tokens = tiny_model(), tiny_tokens(2000)
    measure = job.measurer(tokens, tokens[::-1].copy(), 32, 2, progress=False)
    first = measure(model, cache=True)
    assert set(first) == {"perplexity", "general_perplexity"} and len(calls) == 2
    assert measure(model, cache=True) == first and len(calls) == 2  # read back, not measured
    assert measure(tiny_model(seed=1), cache=True) != first and len(calls) == 4  # other weights
    assert job.measurer(tokens[1000:], None, 32, 2, progress=False)(model, cache=True)["perplexity"] != \
        first["perplexity"] and len(calls) == 5  # another text
    assert measure(model) == first and len(calls) == 7  # without the cache: measured again
    assert measure(model, general=False) == {"perplexity": first["perplexity"]} and len(calls) == 8  # in domain only


def test_the_command_preloads_tcmalloc_where_the_system_has_it(monkeypatch):
    import ctypes.util

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: f"lib{name}.so.4" if name == "tcmalloc_minimal" else None)
    assert cli.tcmalloc_environment({"A": "1"}) == {"A": "1", "LD_PRELOAD": "libtcmalloc_minimal.so.4"}
    assert cli.tcmalloc_environment({"LD_PRELOAD": "x.so"})["LD_PRELOAD"] == "libtcmalloc_minimal.so.4 x.so"
    assert cli.tcmalloc_environment({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}) is None  # done: no second exec
    assert cli.tcmalloc_environment({"PPN_MALLOC": "system"}) is None
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert cli.tcmalloc_environment({}) is None
    monkeypatch.setattr(sys, "platform", "darwin")
    assert cli.tcmalloc_environment({}) is None


@pytest.mark.skipif(cli.tcmalloc_environment(dict(os.environ)) is None, reason="no tcmalloc here, or preloaded")
def test_the_ppn_command_runs_with_tcmalloc_mapped():
    """As a user types it: the console command re-executes itself once, with tcmalloc in its memory map."""
    script = "import sys; from ppn import cli; sys.argv = ['ppn', '--version']; cli.main()"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.endswith("(malloc: tcmalloc)\n"), out.stdout + out.stderr
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env=os.environ | {"PPN_MALLOC": "system"})
    assert out.returncode == 0 and out.stdout.endswith("(malloc: system)\n"), out.stdout + out.stderr
