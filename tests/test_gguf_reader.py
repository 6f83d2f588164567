"""GGUF reading: weights and config against known sources.

Each test writes a tiny llama GGUF the way llama.cpp's converter does (q/k rows
permuted, shapes reversed, one tensor quantised to Q8_0) from random weights in
Hugging Face layout, and checks that ppn reads back exactly those weights. The
writer (`write_tiny_gguf`) serves the tokenizer's and the zoo's tests as well.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from ppn import gguf_reader  # noqa: E402
from ppn.gguf_reader import GGUFCheckpoint, read_gguf, unpermute_rows  # noqa: E402

TINY = dict(vocab_size=None, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256)

# Llama 3 rope scaling for the tiny model (head_dim 8): frequencies spread over all three regimes.
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192)
LLAMA3_THETA = 500000.0

WORDS = ["the", "Ġthe", "Ġto", "Ġbe", "Ġor", "Ġnot", "in", "Ġin", "Ġand", "er", "Ġthat", "Ġis", "Ġquestion",
         "Ġmind", "Ġsuffer", "ing", "Ġslings", "Ġarrows", "Ġfortune", "ĊĊ", "To", "Ġof"]


# ------------------------------------------------------------ writing tiny GGUFs
def byte_alphabet() -> list[str]:
    """The 256 byte-level characters in byte order (a second, independent spelling of GPT-2's table)."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    out, n = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + n))
            n += 1
    return out


def tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    """A byte-level BPE vocabulary: 256 bytes, merges building WORDS, three control and one user-defined token.

    Returns:
        (tokens, merges "a b", token types).
    """
    tokens = byte_alphabet()
    merges: list[str] = []
    for word in WORDS:
        # left-to-right merges: w0+w1, (w0w1)+w2, ...
        cur = word[0]
        for ch in word[1:]:
            if cur + ch not in tokens:
                merges.append(f"{cur} {ch}")
                tokens.append(cur + ch)
            cur += ch
    types = [1] * len(tokens)
    for special in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]:
        tokens.append(special)
        types.append(3)
    tokens.append("<think>")
    types.append(4)
    return tokens, merges, types


def llama3_divisors(head_dim, theta, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings,
                    **_):
    """llama.cpp's `rope_freqs` tensor for Llama 3 scaling, computed independently of ppn."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < original_max_position_embeddings / high_freq_factor:
            out.append(1.0)
        elif wavelen > original_max_position_embeddings / low_freq_factor:
            out.append(factor)
        else:
            smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k row order (HF halves -> interleaved pairs)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def source_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random HF-layout float32 weights (std 0.2 so logits are far from uniform)."""
    rng = np.random.default_rng(seed)
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]

    def r(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    w = {"model.embed_tokens.weight": r(v, d), "model.norm.weight": 1 + r(d)}
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = r(v, d)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w |= {p + "self_attn.q_proj.weight": r(q, d), p + "self_attn.k_proj.weight": r(kv, d),
              p + "self_attn.v_proj.weight": r(kv, d), p + "self_attn.o_proj.weight": r(d, q),
              p + "mlp.gate_proj.weight": r(f, d), p + "mlp.up_proj.weight": r(f, d),
              p + "mlp.down_proj.weight": r(d, f), p + "input_layernorm.weight": 1 + r(d),
              p + "post_attention_layernorm.weight": 1 + r(d)}
    return w


GGUF_NAMES = {"self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
              "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
              "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
              "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
              "post_attention_layernorm.weight": "ffn_norm.weight"}


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{GGUF_NAMES[rest]}"


def write_tiny_gguf(path: Path, *, tied: bool = True, rope_scaling: dict | None = None, quantize: bool = True,
                    arch: str = "llama", pre: str = "default", add_bos: bool = False, seed: int = 0,
                    drop: str | None = None):
    """Writes a tiny llama GGUF in llama.cpp's layout.

    The token embedding is stored as Q8_0 when `quantize`; the source weights
    returned already hold its dequantised values, so they are exactly what the
    file holds. `drop` names a GGUF tensor to leave out.

    Returns:
        (HF config dict, HF-layout source weights, the original embedding before quantisation).
    """
    tokens, merges, types = tiny_vocab()
    config = dict(TINY, vocab_size=len(tokens), tie_word_embeddings=tied, bos_token_id=len(tokens) - 3,
                  eos_token_id=len(tokens) - 2)
    if rope_scaling:
        config["rope_theta"] = LLAMA3_THETA
        config["max_position_embeddings"] = 2 * rope_scaling["original_max_position_embeddings"]
    weights = source_weights(config, seed)
    embed = weights["model.embed_tokens.weight"]
    q8 = gguf.quants.quantize(embed, gguf.GGMLQuantizationType.Q8_0) if quantize else None
    if quantize:
        weights["model.embed_tokens.weight"] = gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_dimension_count(config["head_dim"])
    w.add_vocab_size(len(tokens))
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(config["bos_token_id"])
    w.add_eos_token_id(config["eos_token_id"])
    w.add_unk_token_id(len(tokens) - 4)
    w.add_add_bos_token(add_bos)
    for hf, value in weights.items():
        name = gguf_name(hf)
        if name == drop:
            continue
        if hf.endswith("q_proj.weight"):
            value = permute_like_llama_cpp(value, config["num_attention_heads"])
        elif hf.endswith("k_proj.weight"):
            value = permute_like_llama_cpp(value, config["num_key_value_heads"])
        if hf == "model.embed_tokens.weight" and quantize:
            w.add_tensor(name, q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, value)
    if rope_scaling:
        w.add_tensor("rope_freqs.weight", llama3_divisors(config["head_dim"], config["rope_theta"], **rope_scaling))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    config["rope_scaling"] = rope_scaling
    return config, weights, embed


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.gguf"
    config, weights, embed = write_tiny_gguf(path)
    return path, config, weights, embed


def truncated_copy(path: Path, folder: Path, keep: float) -> Path:
    """The first `keep` fraction of the bytes of GGUF file `path`, as folder/truncated.gguf."""
    data = path.read_bytes()
    out = folder / "truncated.gguf"
    out.write_bytes(data[: int(len(data) * keep)])
    return out


def write_gpt2_gguf(path: Path) -> None:
    """A one-block GGUF of architecture "gpt2", which ppn does not read."""
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ------------------------------------------------------------ weights and config
def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(1)
    for n_head, head_dim in [(4, 8), (3, 64), (1, 2)]:
        w = rng.standard_normal((n_head * head_dim, 5)).astype(np.float32)
        permuted = permute_like_llama_cpp(w, n_head)
        assert not np.array_equal(permuted, w) or head_dim == 2
        np.testing.assert_array_equal(unpermute_rows(permuted, n_head), w)


def test_read_gguf_returns_source_weights_and_config(tiny):
    path, config, weights, embed = tiny
    ckpt = read_gguf(path)
    assert isinstance(ckpt, GGUFCheckpoint)
    assert set(ckpt.tensors) == set(weights)  # tied: no lm_head
    for name, expected in weights.items():
        got = ckpt.tensors[name]
        assert got.dtype == np.float32 and got.shape == expected.shape, name
        np.testing.assert_array_equal(got, expected, err_msg=name)  # F32 exact, Q8_0 exactly its dequantised values
    # Q8_0: within quantisation error of the original embedding (half a step of a 32-block's
    # max / 127, plus rounding of the float16 scale: under one step)
    got = ckpt.tensors["model.embed_tokens.weight"]
    step = np.abs(embed).reshape(-1, 32).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(got - embed).reshape(-1, 32) <= step)
    assert not np.array_equal(got, embed)

    c = ckpt.config
    for key in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size", "bos_token_id",
                "eos_token_id"]:
        assert c[key] == config[key], key
    assert c["rms_norm_eps"] == 1e-5 and c["rope_theta"] == 10000.0  # float32 metadata shown as written
    assert c["model_type"] == "llama" and c["architectures"] == ["LlamaForCausalLM"]
    assert c["tie_word_embeddings"] is True and c["rope_scaling"] is None and c["attention_bias"] is False
    assert c["torch_dtype"] == "float32"
    json.dumps(c)  # plain JSON values only


def test_read_gguf_untied_with_llama3_rope(tmp_path):
    path = tmp_path / "untied.gguf"
    config, weights, _ = write_tiny_gguf(path, tied=False, rope_scaling=LLAMA3, quantize=False)
    ckpt = read_gguf(path)
    assert set(ckpt.tensors) == set(weights) and "lm_head.weight" in ckpt.tensors
    for name, expected in weights.items():
        np.testing.assert_array_equal(ckpt.tensors[name], expected, err_msg=name)
    assert ckpt.config["tie_word_embeddings"] is False
    assert ckpt.config["rope_theta"] == LLAMA3_THETA
    rs = ckpt.config["rope_scaling"]
    assert rs["rope_type"] == "llama3" and rs["original_max_position_embeddings"] == 8192
    for key in ["factor", "low_freq_factor", "high_freq_factor"]:
        assert rs[key] == pytest.approx(LLAMA3[key], rel=1e-5), key


def test_llama3_fit_recovers_non_default_factors():
    d = llama3_divisors(128, 500000.0, factor=32.0, low_freq_factor=2.0, high_freq_factor=6.0,
                        original_max_position_embeddings=8192)
    rs = gguf_reader._llama3_from_divisors(d, 128, 500000.0, 8192.0, Path("x.gguf"))
    assert rs["factor"] == pytest.approx(32.0) and rs["low_freq_factor"] == pytest.approx(2.0, rel=1e-4)
    assert rs["high_freq_factor"] == pytest.approx(6.0, rel=1e-4)
    with pytest.raises(ValueError, match="rope_freqs.*x.gguf"):
        gguf_reader._llama3_from_divisors(np.linspace(1, 3, 64)[::-1], 128, 500000.0, 8192.0, Path("x.gguf"))


# ------------------------------------------------------------ bad input
def test_not_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_text("this is just text, not a model\n")
    with pytest.raises(ValueError, match=f"not a valid GGUF file: {path}"):
        read_gguf(path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=f"not a valid GGUF file: {empty}"):
        read_gguf(empty)


@pytest.mark.parametrize("keep", [0.5, 0.02, 0.999])
def test_truncated_gguf(tiny, tmp_path, keep):
    path = truncated_copy(tiny[0], tmp_path, keep)
    with pytest.raises(ValueError, match=f"not a valid GGUF file: {path}"):
        read_gguf(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match=str(path)):
        read_gguf(path)


def test_wrong_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_gpt2_gguf(path)
    with pytest.raises(ValueError, match=f"architecture 'gpt2' in {path}"):
        read_gguf(path)


def test_unexpected_and_missing_tensors(tmp_path, monkeypatch):
    path = tmp_path / "missing.gguf"
    write_tiny_gguf(path, quantize=False, drop="blk.1.attn_v.weight")
    with pytest.raises(ValueError, match=f"{path} lacks 1 tensor.*model.layers.1.self_attn.v_proj.weight"):
        read_gguf(path)
    path = tmp_path / "odd.gguf"
    write_tiny_gguf(path, quantize=False)
    monkeypatch.setattr(gguf_reader, "_BLOCK_TENSORS",
                        {k: v for k, v in gguf_reader._BLOCK_TENSORS.items() if k != "ffn_up.weight"})
    with pytest.raises(ValueError, match=f"unexpected tensor 'blk.0.ffn_up.weight' in {path}"):
        read_gguf(path)
