"""Loading only what is kept (`ppn.load_pruned`), uniform plans, and their export."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import torch_logits
from test_cli import tiny_checkpoint  # noqa: F401  (a fixture: tiny model with a tokenizer)

import ppn
from ppn import cli
from ppn.hf_format import hf_tensors
from ppn.safetensors_io import INDEX_FILE, SINGLE_FILE, SafetensorsReader
from ppn.units import KeepSet, Units
from ppn.testing import random_plan, tiny_config, tiny_model

ROOT = Path(__file__).resolve().parents[1]
IDS = np.random.RandomState(0).randint(0, 97, (2, 24))
# biases, a tied head and a narrow last MLP group (50 = 3 * 16 + 2); plans of one shape compile once
CONFIG = dict(num_layers=4, intermediate_size=50)
VARIANT = dict(CONFIG, qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=True)


def shard(directory: Path, parts: int = 3) -> None:
    """Rewrites a single-file checkpoint as `parts` shards with a Hugging Face index."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(directory / SINGLE_FILE)
    names = sorted(tensors)
    weight_map = {}
    for i, chunk in enumerate(np.array_split(np.arange(len(names)), parts)):
        file = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        save_file({names[j]: tensors[names[j]] for j in chunk}, str(directory / file), metadata={"format": "pt"})
        weight_map.update({names[j]: file for j in chunk})
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / SINGLE_FILE).unlink()


@pytest.fixture(scope="module", params=["single", "sharded"])
def checkpoint(request, tmp_path_factory):
    path = ppn.save_model(tiny_model(seed=3, **VARIANT), tmp_path_factory.mktemp(request.param) / "ckpt")
    if request.param == "sharded":
        shard(path)
    dense = ppn.load_model(path)
    return path, dense, random_plan(dense.config, seed=1, rescale=True)


def assert_same_model(a, b):
    assert a.config == b.config
    for (name, x), (_, y) in zip(hf_tensors(a), hf_tensors(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


@pytest.mark.parametrize("size, uniform", [(0.3, False), (0.6, False), (1.0, False), (0.7, True)])
def test_load_pruned_equals_prune_after_a_full_load(checkpoint, size, uniform):
    path, dense, plan = checkpoint
    loaded = ppn.load_pruned(path, plan, size, uniform=uniform)
    assert_same_model(loaded, ppn.prune(dense, plan, size, uniform=uniform))
    assert loaded.config.num_prunable_params() == plan.keep(size, uniform=uniform).num_params()


def test_load_pruned_reads_only_the_kept_rows_and_columns(checkpoint, monkeypatch):
    path, dense, _ = checkpoint
    units = Units(dense.config, 16)
    # block 0 loses its attention, block 1 its MLP, block 2 both; the rest keep scattered units
    attn, mlp = np.array([0, 1, 0, 1], bool), np.array([1, 0, 0, 1], bool)
    heads = np.tile([True, False, False, True], (4, 1))
    groups = np.tile([True, False, True, False][:units.num_groups], (4, 1))
    keep = KeepSet(units, attn, mlp, heads, groups)
    read: dict[str, int] = {}
    slice_of = SafetensorsReader._slice

    def counting(f, name, index):
        piece = slice_of(f, name, index)
        read[name] = read.get(name, 0) + piece.size
        return piece

    monkeypatch.setattr(SafetensorsReader, "_slice", staticmethod(counting))
    pruned = ppn.load_pruned(path, keep)
    assert_same_model(pruned, ppn.prune(dense, keep))
    assert not any(n.startswith(("model.layers.0.self_attn", "model.layers.0.input_layernorm",
                                 "model.layers.1.mlp", "model.layers.1.post_attention", "model.layers.2."))
                   for n in read)
    assert read == {name: int(np.asarray(t).size) for name, t in hf_tensors(pruned)}
    assert sum(read.values()) == ppn.count_params(pruned) < ppn.count_params(dense)


# ------------------------------------------------------------------ uniform plans
def test_pruned_exports_describe_themselves(tmp_path, checkpoint):
    """Non-uniform: ppn's own model type with per-block shapes in ppn_layers and a note
    naming --uniform; uniform: a plain llama config. ppn reads both back identically."""
    path, _, plan = checkpoint
    for uniform in (False, True):
        small = ppn.load_pruned(path, plan, 0.7, uniform=uniform)
        out = ppn.save_model(small, tmp_path / f"out-{uniform}")
        hf = json.loads((out / "config.json").read_text())
        assert ("ppn_layers" in hf) is (not uniform)
        if uniform:
            assert (hf["model_type"], hf["architectures"]) == ("llama", ["LlamaForCausalLM"]) and "ppn_note" not in hf
        else:
            assert (hf["model_type"], hf["architectures"]) == ("ppn_pruned_llama", ["PpnPrunedLlamaForCausalLM"])
            assert "ppn resize --uniform" in hf["ppn_note"]
        assert_same_model(ppn.load_model(out), small)


def test_transformers_refuses_a_non_uniform_export_by_its_model_type(tmp_path, checkpoint):
    """Rather than build the dense shapes and re-initialise what does not fit."""
    import transformers

    path, _, plan = checkpoint
    out = ppn.save_model(ppn.load_pruned(path, plan, 0.5), tmp_path / "pruned")
    with pytest.raises(ValueError, match="model type `ppn_pruned_llama`"):
        transformers.AutoModelForCausalLM.from_pretrained(out)


def test_uniform_export_loads_in_transformers_with_equal_logits(tmp_path):
    import torch
    import transformers

    model = tiny_model(seed=5, **CONFIG)
    ppn.save_model(model, tmp_path / "ckpt")
    small = ppn.load_pruned(tmp_path / "ckpt", random_plan(model.config, seed=1), 0.7, uniform=True)
    assert small.config.num_heads * small.config.head_dim != small.config.hidden_size  # head_dim must be explicit
    out = ppn.save_model(small, tmp_path / "small")
    hf = json.loads((out / "config.json").read_text())
    assert "ppn_layers" not in hf and hf["head_dim"] == 8
    assert (hf["num_attention_heads"], hf["num_key_value_heads"], hf["intermediate_size"]) == (
        small.config.num_heads, small.config.num_kv_heads, small.config.intermediate_size)
    reference = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reference).__name__ == "LlamaForCausalLM"
    np.testing.assert_allclose(np.asarray(small(IDS)), torch_logits(reference, IDS), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    model = tiny_model(seed=7)
    return ppn.save_model(model, tmp_path_factory.mktemp("small") / "ckpt"), random_plan(model.config)


@pytest.mark.parametrize("size, error, match", [
    (0, ValueError, "size must be a fraction"), (-0.5, ValueError, "size must be a fraction"),
    (1.5, ValueError, "must be whole"), (10**9, ValueError, "exceeds the model's"),
])
def test_bad_sizes_are_refused(small_checkpoint, size, error, match):
    path, plan = small_checkpoint
    with pytest.raises(error, match=match):
        ppn.load_pruned(path, plan, size)


def test_bad_plans_and_checkpoints_are_refused(small_checkpoint, tmp_path):
    path, plan = small_checkpoint
    with pytest.raises(ValueError, match="fitted on another architecture"):
        ppn.load_pruned(path, random_plan(tiny_config(hidden_size=64)), 0.5)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        ppn.load_pruned(tmp_path / "nope", plan, 0.5)
    with pytest.raises(ValueError, match="below the smallest uniform model"):
        ppn.load_pruned(path, plan, 0.2, uniform=True)
    with pytest.raises(TypeError, match="needs a size"):
        ppn.load_pruned(path, plan)
    with pytest.raises(TypeError, match="does not apply to a keep-set"):
        ppn.load_pruned(path, plan.keep(0.5), uniform=True)


def test_a_gguf_is_converted_once_then_sliced(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from test_gguf_reader import write_tiny_gguf

    monkeypatch.setenv("PPN_CACHE", str(tmp_path / "cache"))
    file = tmp_path / "tiny.gguf"
    write_tiny_gguf(file)
    dense = ppn.load_model(file)
    plan = random_plan(dense.config)
    assert_same_model(ppn.load_pruned(file, plan, 0.5), ppn.prune(dense, plan, 0.5))
    converted = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(converted) == 1 and converted[0].name.startswith("tiny-")
    mtime = (converted[0] / SINGLE_FILE).stat().st_mtime_ns
    ppn.load_pruned(file, plan, 0.7)
    assert (converted[0] / SINGLE_FILE).stat().st_mtime_ns == mtime


# ------------------------------------------------------------------ command line and experiment
def test_resize_uniform_writes_a_hugging_face_checkpoint(tmp_path, tiny_checkpoint):  # noqa: F811
    import torch
    import transformers

    path, model = tiny_checkpoint
    plan = random_plan(model.config)
    plan.meta["checkpoint"] = str(path)  # --from defaults to it
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "small"
    assert cli.main(["resize", "--plan", str(tmp_path / "plan.json"), "--size", "0.6", "--uniform",
                     "--out", str(out)]) == 0
    small = ppn.load_model(out)
    assert_same_model(small, ppn.prune(model, plan, 0.6, uniform=True))
    assert "ppn_layers" not in json.loads((out / "config.json").read_text())
    assert (out / "tokenizer.json").exists()
    reference = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = IDS % model.config.vocab_size
    np.testing.assert_allclose(np.asarray(small(ids)), torch_logits(reference, ids), atol=1e-5, rtol=0)


def test_load_memory_smoke(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "experiments" / "load_memory.py"), "--smoke", "--out-dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads((tmp_path / "load_memory_smoke.json").read_text())["records"]
    assert [r["load"] for r in rows] == ["load_model", "load_pruned"]
    assert rows[1]["params"] < rows[0]["params"] and all(r["added_peak_mib"] > 0 for r in rows)
    assert rows[0]["added_vs_dense"] == 1.0 and np.isfinite(rows[1]["added_over_model"])
    assert (tmp_path / "load_memory_smoke.md").exists()
    assert (tmp_path / "load_memory_smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ the real model
@pytest.mark.slow
def test_load_pruned_equals_prune_on_smollm2():
    path = ppn.checkpoint.resolve_source("smollm2-135m")
    dense = ppn.load_model(path)
    plan = random_plan(dense.config, group_width=64)
    pruned = ppn.prune(dense, plan, 0.4)
    del dense
    assert_same_model(ppn.load_pruned(path, plan, 0.4), pruned)


def test_a_mis_shaped_tensor_is_refused_even_where_the_cut_removes_it(small_checkpoint, tmp_path):
    """As strict as load_model: layer 0's attention is cut away, its wrong-shaped q_proj still named."""
    from safetensors.numpy import load_file, save_file

    path, plan = small_checkpoint
    bad = ppn.save_model(ppn.load_model(path), tmp_path / "bad")
    tensors = load_file(bad / SINGLE_FILE)
    tensors["model.layers.0.self_attn.q_proj.weight"] = np.zeros((5, 7), np.float32)
    save_file(tensors, str(bad / SINGLE_FILE), metadata={"format": "pt"})
    units, layers = plan.units, plan.units.config.num_layers
    keep = KeepSet(units, np.arange(layers) > 0, np.ones(layers, bool), np.ones(units.shapes()["head"], bool),
                   np.ones(units.shapes()["mlp_group"], bool))
    ppn.load_pruned(path, keep)  # the same cut of the intact checkpoint loads
    with pytest.raises(ValueError, match=r"q_proj.weight' in .* has shape \(5, 7\), expected"):
        ppn.load_pruned(bad, keep)
