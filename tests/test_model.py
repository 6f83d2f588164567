"""The Flax NNX model against Hugging Face PyTorch, the KV cache, generation."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from conftest import hf_reference, torch_logits

import ppn
from ppn.checkpoint import load_model, save_model
from ppn.generate import generate
from ppn.models.config import LayerShape, LlamaConfig, RopeScaling
from ppn.models.llama import KVCache, Llama
from ppn.testing import tiny_config, tiny_model

IDS = np.random.RandomState(0).randint(0, 97, (2, 40))

VARIANTS = {
    "gqa-untied": ("llama", {}),
    "mha": ("llama", dict(num_key_value_heads=4)),
    "mqa-tied": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "llama3-rope": ("llama", dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0, original_max_position_embeddings=32))),
    "linear-rope": ("llama", dict(rope_scaling=dict(rope_type="linear", factor=2.0))),
    "attention-bias": ("llama", dict(attention_bias=True)),
    "mlp-bias": ("llama", dict(mlp_bias=True)),
    "all-biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "qwen2-bias": ("qwen2", {}),
    "mistral-window": ("mistral", dict(sliding_window=5)),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(tmp_path, variant):
    model_type, overrides = VARIANTS[variant]
    path, reference = hf_reference(tmp_path, model_type, **overrides)
    model = load_model(path)
    np.testing.assert_allclose(np.asarray(model(IDS)), torch_logits(reference, IDS), atol=1e-5, rtol=0)


def test_sliding_window_changes_the_output(tmp_path):
    """The Mistral window is honoured, not silently ignored (parity above would hold either way)."""
    path, _ = hf_reference(tmp_path, "mistral", sliding_window=5)
    windowed = load_model(path)
    full = Llama(windowed.config.replace(sliding_window=None), rngs=nnx.Rngs(0))
    nnx.update(full, nnx.state(windowed))
    assert np.abs(np.asarray(windowed(IDS)) - np.asarray(full(IDS))).max() > 1e-3


@pytest.mark.parametrize("variant", ["gqa-untied", "mqa-tied", "qwen2-bias", "all-biases"])
def test_save_model_round_trips_through_transformers(tmp_path, variant):
    model_type, overrides = VARIANTS[variant]
    path, _ = hf_reference(tmp_path, model_type, **overrides)
    model = load_model(path)
    out = save_model(model, tmp_path / "saved")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    np.testing.assert_allclose(torch_logits(reloaded, IDS), np.asarray(model(IDS)), atol=1e-5, rtol=0)
    again = load_model(out)
    np.testing.assert_array_equal(np.asarray(again(IDS)), np.asarray(model(IDS)))


def test_sharded_checkpoint_loads(tmp_path):
    path, reference = hf_reference(tmp_path, "llama")
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model = load_model(tmp_path / "sharded")
    np.testing.assert_allclose(np.asarray(model(IDS)), torch_logits(reference, IDS), atol=1e-5, rtol=0)


def test_bfloat16_is_close_to_float32(tmp_path):
    path, _ = hf_reference(tmp_path, "llama")
    f32 = np.asarray(load_model(path)(IDS))
    bf16_model = load_model(path, dtype="bfloat16")
    assert bf16_model.embed[...].dtype == jnp.bfloat16
    bf16 = np.asarray(bf16_model(IDS))
    assert bf16.dtype == np.float32  # logits are accumulated in float32
    assert np.abs(bf16 - f32).max() < 0.1 * np.abs(f32).max()


PRUNED = tiny_config(layers=(
    LayerShape(q_to_kv=(0, 1, 1), num_kv_heads=2, intermediate_size=20),  # unequal groups
    LayerShape(q_to_kv=(), num_kv_heads=0, intermediate_size=48),  # attention removed
), num_layers=2)
PRUNED_NO_MLP = tiny_config(num_layers=2, layers=(
    LayerShape(q_to_kv=(0,), num_kv_heads=1, intermediate_size=0),
    LayerShape(q_to_kv=(0, 0, 1, 1), num_kv_heads=2, intermediate_size=48)))


@pytest.mark.parametrize("config", [tiny_config(), tiny_config(num_kv_heads=1), PRUNED, PRUNED_NO_MLP],
                         ids=["gqa", "mqa", "pruned", "pruned-no-mlp"])
def test_cached_decoding_equals_full_forward(config):
    model = Llama(config, rngs=nnx.Rngs(1))
    full = np.asarray(model(IDS))
    cache = KVCache.init(config, 2, 64)
    pieces = []
    for start, stop in [(0, 17), (17, 18), (18, 19), (19, 40)]:
        logits, cache = model.forward_with_cache(jnp.asarray(IDS[:, start:stop]), cache)
        pieces.append(np.asarray(logits))
    assert int(cache.length) == 40
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5, rtol=0)


def test_greedy_generation_equals_step_by_step_argmax():
    model = tiny_model(seed=3)
    prompt = IDS[:, :5]
    out = generate(model, prompt, max_new_tokens=12)
    assert out.shape == (2, 17)
    # the reference recomputes the whole sequence without a cache at every step; it is
    # padded to its final length (one compiled shape: the causal mask keeps position
    # t - 1 blind to the padding)
    forward = nnx.jit(lambda m, x: m(x))
    seq = np.zeros((2, 17), np.int32)
    seq[:, :5] = prompt
    for t in range(5, 17):
        seq[:, t] = np.asarray(forward(model, seq))[:, t - 1].argmax(-1)
    np.testing.assert_array_equal(out, seq)


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = tiny_model(seed=3)
    prompt = IDS[0, :5]
    a = generate(model, prompt, 10, temperature=1.0, seed=1)
    b = generate(model, prompt, 10, temperature=1.0, seed=1)
    c = generate(model, prompt, 10, temperature=1.0, seed=2)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (15,) and not np.array_equal(a, c)
    np.testing.assert_array_equal(generate(model, prompt, 10, temperature=1.3, top_k=1, seed=5),
                                  generate(model, prompt, 10))
    np.testing.assert_array_equal(generate(model, prompt, 10, temperature=0.7, top_p=1e-6, seed=5),
                                  generate(model, prompt, 10))


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=3, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=3, top_p=0.0, temperature=1.0), "top_p"),
    (dict(max_new_tokens=3, top_k=0, temperature=1.0), "top_k"),
])
def test_generate_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny_model(), IDS[0, :4], **kwargs)


def test_generate_rejects_out_of_vocabulary_prompt():
    with pytest.raises(ValueError, match="token ids"):
        generate(tiny_model(), [1, 2, 500], 2)


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("config", [
    tiny_config(rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64), tie_word_embeddings=True),
    tiny_config(qkv_bias=True, o_bias=True, mlp_bias=True)], ids=["rope-tied", "biases"])
def test_config_round_trips_through_hf_dict(config):
    assert LlamaConfig.from_hf(config.to_hf()) == config
    assert LlamaConfig.from_hf(PRUNED.to_hf()) == PRUNED
    hf = transformers.LlamaConfig(**{k: v for k, v in config.to_hf().items() if k != "architectures"})
    assert LlamaConfig.from_hf(hf) == config


@pytest.mark.parametrize("fields, match", [
    (dict(o_bias=True), "one attention_bias for q, k, v and o"),
    (dict(qkv_bias=True), "one attention_bias for q, k, v and o"),
    (dict(model_type="qwen2", qkv_bias=True, mlp_bias=True), "qwen2 config.json has no o or MLP biases"),
    (dict(model_type="mistral", o_bias=True), "mistral config.json has no o or MLP biases"),
])
def test_to_hf_refuses_biases_the_model_type_cannot_hold(fields, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**fields).to_hf()


def test_parameter_counts_match_the_module():
    for config in [tiny_config(), tiny_config(tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True),
                   PRUNED, PRUNED_NO_MLP, PRUNED.replace(o_bias=True, mlp_bias=True),
                   PRUNED_NO_MLP.replace(mlp_bias=True)]:
        assert ppn.count_params(Llama(config, rngs=nnx.Rngs(0))) == config.num_params()


@pytest.mark.parametrize("fields, match", [
    (dict(model_type="gpt2"), "unsupported model_type 'gpt2'"),
    (dict(num_heads=4, num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(head_dim=7), "head_dim must be even"),
    (dict(hidden_size=0), "hidden_size must be a positive integer"),
])
def test_config_rejects_bad_fields(fields, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**fields)


def test_from_hf_refuses_other_architectures():
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        LlamaConfig.from_hf({"model_type": "gpt2", "num_attention_heads": 2})
    hf = tiny_config().to_hf() | {"hidden_act": "gelu"}
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        LlamaConfig.from_hf(hf)


def test_layer_shape_checks_its_groups():
    with pytest.raises(ValueError, match="every KV head"):
        LayerShape(q_to_kv=(0, 0), num_kv_heads=2, intermediate_size=4)
    with pytest.raises(ValueError, match="if and only if"):
        LayerShape(q_to_kv=(), num_kv_heads=1, intermediate_size=4)


# ------------------------------------------------------------ bad checkpoints
def test_missing_path():
    with pytest.raises(FileNotFoundError, match="no checkpoint at 'no/such/dir'"):
        load_model("no/such/dir")


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(tmp_path)


def test_unsupported_model_type(tmp_path):
    path, _ = hf_reference(tmp_path, "llama")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match=r"config.json: unsupported model_type 'gpt_neox'"):
        load_model(path)


def _rewrite_weights(path, change):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor(tmp_path):
    path, _ = hf_reference(tmp_path, "llama")
    _rewrite_weights(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing 1 tensor.*model.layers.1.mlp.up_proj.weight"):
        load_model(path)


def test_unexpected_tensor(tmp_path):
    path, _ = hf_reference(tmp_path, "llama")
    _rewrite_weights(path, lambda t: t.update({"model.layers.7.extra": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensor.*model.layers.7.extra"):
        load_model(path)


def test_wrong_shape(tmp_path):
    path, _ = hf_reference(tmp_path, "llama")
    _rewrite_weights(path, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((8, 32), np.float32)}))
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj.weight' in .*model.safetensors "
                                         r"has shape \(8, 32\), expected \(16, 32\)"):
        load_model(path)


def test_truncated_safetensors(tmp_path):
    path, _ = hf_reference(tmp_path, "llama")
    file = path / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model.safetensors.*(truncated or corrupt)"):
        load_model(path)


def test_pytorch_bin_only_checkpoint_is_refused_with_a_hint(tmp_path):
    path, reference = hf_reference(tmp_path, "llama")
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(FileNotFoundError, match="reads safetensors only"):
        load_model(path)


def test_save_model_is_atomic_and_refuses_to_overwrite(tmp_path):
    model = tiny_model()
    out = save_model(model, tmp_path / "out")
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        save_model(tiny_model(seed=1), out)
    assert (out / "model.safetensors").read_bytes() == before

    class Broken:
        def save_pretrained(self, _):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_model(model, tmp_path / "other", tokenizer=Broken())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    save_model(tiny_model(seed=1), out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() != before
