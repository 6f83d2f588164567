"""The `ppn` command line on a tiny checkpoint."""

import json

import numpy as np
import pytest

import ppn
from ppn import cli
from ppn.testing import tiny_model


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
    assert "perplexity" in capsys.readouterr().out
    assert out.with_suffix(".md").exists()


def test_eval_reports_a_missing_model_clearly(tmp_path, capsys):
    assert cli.main(["eval", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "r.json")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_unknown_subcommand_exits():
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])


def test_resize_writes_a_smaller_checkpoint(tmp_path, tiny_checkpoint, capsys):
    from ppn.fit import FitConfig

    path, model = tiny_checkpoint
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, 2000)
    result = ppn.fit(model, tokens, FitConfig(steps=2, batch_size=2, seqlen=16, group_width=16), progress=False)
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
    assert cli.main(["resize", "--plan", str(tmp_path / "plan.json"), "--size", "1.7", "--from", str(path),
                     "--out", str(tmp_path / "x")]) == 2
    assert "must be whole" in capsys.readouterr().err


def test_fit_set_overrides_any_fit_config_field():
    from ppn.cli import build_parser, job_config

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
    from ppn.pipeline import load_inputs

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
    job = cli.job_config(cli.build_parser().parse_args(["fit", "--model", str(path), "--random-weights"]))
    assert job.random_weights and job.model == str(path)
    with pytest.raises(ValueError, match="not a file"):
        random_model(path / "config.json")
