"""Saved checkpoints as transformers writes them: the dtype key, older config keys,
shards with an index, the transformers-style names, and Hub repo ids."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import torch_logits

import ppn
from ppn.checkpoint import is_hub_id
from ppn.hf_format import hf_tensors
from ppn.safetensors_io import INDEX_FILE, SINGLE_FILE
from ppn.testing import random_plan, tiny_config, tiny_model

IDS = np.random.RandomState(0).randint(0, 97, (2, 12))


def assert_same_model(a, b):
    assert a.config == b.config and a.dtype == b.dtype
    for (name, x), (_, y) in zip(hf_tensors(a), hf_tensors(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


# ------------------------------------------------------------------ config.json
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_config_json_says_the_weights_dtype_under_transformers_5s_key(tmp_path, dtype):
    model = tiny_model(dtype=dtype)
    out = ppn.save_model(model, tmp_path / "ckpt")
    hf = json.loads((out / "config.json").read_text())
    assert hf["dtype"] == dtype and "torch_dtype" not in hf
    assert_same_model(ppn.load_model(out, dtype=dtype), model)


def test_older_config_keys_still_load(tmp_path):
    """`torch_dtype` (transformers 4), and a pruned config under model_type llama (ppn 0.1)."""
    model = ppn.prune(tiny_model(num_layers=3), random_plan(tiny_config(num_layers=3)), 0.5)
    assert model.config.layers is not None
    out = ppn.save_model(model, tmp_path / "ckpt")
    hf = json.loads((out / "config.json").read_text())
    hf["torch_dtype"] = hf.pop("dtype")
    hf["model_type"], hf["architectures"] = "llama", ["LlamaForCausalLM"]
    del hf["ppn_note"]
    (out / "config.json").write_text(json.dumps(hf))
    assert_same_model(ppn.load_model(out), model)


# ------------------------------------------------------------------ shards
def test_weights_above_max_shard_size_are_sharded_like_transformers(tmp_path):
    import torch
    import transformers

    model = tiny_model(seed=2)
    out = ppn.save_model(model, tmp_path / "ckpt", max_shard_size=20_000)  # bytes; the largest tensor has 12,416
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and not (out / SINGLE_FILE).exists()
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.loads((out / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == {name for name, _ in hf_tensors(model)}
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == 4 * ppn.count_params(model)
    assert_same_model(ppn.load_model(out), model)
    reference = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(np.asarray(model(IDS)), torch_logits(reference, IDS), atol=1e-5, rtol=0)
    # the default (transformers' 50GB) and a size as a string keep a small model in one file
    for size in ({}, dict(max_shard_size="1MB")):
        one = ppn.save_model(model, tmp_path / f"one-{len(size)}", **size)
        assert sorted(p.name for p in one.iterdir()) == ["config.json", SINGLE_FILE]


# ------------------------------------------------------------------ transformers' names
def test_from_pretrained_and_save_pretrained_are_load_and_save(tmp_path):
    assert ppn.from_pretrained is ppn.load_model and ppn.save_pretrained is ppn.save_model
    model = tiny_model(seed=4)
    out = ppn.save_pretrained(model, tmp_path / "ckpt")
    assert_same_model(ppn.from_pretrained(out), model)
    assert ppn.from_pretrained(out, dtype="bfloat16").dtype == jnp.bfloat16


# ------------------------------------------------------------------ Hub repo ids
@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache under tmp_path, offline. huggingface_hub reads its
    environment once, at import, so its constants are patched as well."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_hub_repo_id_loads_from_the_hub_cache(tmp_path, offline_hub):
    """The cache layout of huggingface_hub: models--org--name/{refs/main, snapshots/<commit>/}."""
    model = tiny_model(seed=6)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hub / "models--tiny-org--Tiny-Llama.v1"
    ppn.save_model(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert_same_model(ppn.load_model("tiny-org/Tiny-Llama.v1"), model)
    assert ppn.checkpoint.resolve_source("tiny-org/Tiny-Llama.v1") == repo / "snapshots" / commit


def test_an_unknown_hub_repo_id_is_named_in_the_error(offline_hub):
    with pytest.raises(FileNotFoundError, match=r"'no-org/no-such-model'.*Hugging Face Hub repo"):
        ppn.load_model("no-org/no-such-model")
    with pytest.raises(FileNotFoundError, match=r"'no-such-thing'.*nor a known model name"):
        ppn.load_model("no-such-thing")


@pytest.mark.parametrize("source, hub", [
    ("HuggingFaceTB/SmolLM2-135M", True), ("org/name.v1_2", True), ("name", False), ("a/b/c", False),
    ("./a", False), ("/abs/path", False), ("~/model", False), ("org/model.gguf", False), ("org/", False),
])
def test_what_counts_as_a_hub_repo_id(source, hub):
    assert is_hub_id(source) is hub
