"""The tokenizer a GGUF describes, against transformers' own GGUF reading, and the
conversion to a checkpoint directory whose logits match the source's.

The files are tiny llama GGUFs written as llama.cpp's converter does (`write_tiny_gguf`).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("gguf")

from test_gguf_reader import tiny  # noqa: E402, F401  (a fixture: a tiny GGUF file)
from test_gguf_reader import (LLAMA3, permute_like_llama_cpp, truncated_copy, write_gpt2_gguf,  # noqa: E402
                              write_tiny_gguf)

from ppn.gguf_tokenizer import convert_gguf, tokenizer_from_gguf  # noqa: E402


# ------------------------------------------------------------ conversion and logits
def torch_model(config: dict, weights: dict[str, np.ndarray]):
    import torch
    import transformers

    hf = transformers.LlamaConfig(**{k: v for k, v in config.items() if k not in ("rope_scaling",)},
                                  rope_scaling=config["rope_scaling"], attention_bias=False)
    model = transformers.LlamaForCausalLM(hf).eval()
    state = {k: torch.from_numpy(v.copy()) for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


@pytest.mark.parametrize("tied,rope,add_bos", [(True, None, False), (False, LLAMA3, True)],
                         ids=["tied", "untied-llama3-bos"])
def test_converted_logits_match_source(tmp_path, tied, rope, add_bos):
    import torch
    import transformers

    path = tmp_path / "m.gguf"
    config, weights, _ = write_tiny_gguf(path, tied=tied, rope_scaling=rope, add_bos=add_bos)
    out = convert_gguf(path, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) >= ["config.json", "model.safetensors", "tokenizer.json"]
    converted = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    reference = torch_model(config, weights)
    ids = torch.as_tensor(np.random.default_rng(0).integers(0, config["vocab_size"], (2, 40)))
    with torch.no_grad():
        a, b = converted(ids).logits.numpy(), reference(ids).logits.numpy()
    assert b.std() > 1.0  # far from uniform, so a wrong permutation would show
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    # The same file read without un-permuting gives different logits: the test can see the permutation.
    with torch.no_grad():
        permuted = dict(weights)
        for k in permuted:
            if k.endswith("q_proj.weight"):
                permuted[k] = permute_like_llama_cpp(permuted[k], config["num_attention_heads"])
        assert np.abs(torch_model(config, permuted)(ids).logits.numpy() - b).max() > 1e-2
    tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in SAMPLES:
        assert tok(text)["input_ids"] == tokenizer_from_gguf(path)(text)["input_ids"], text
    assert (tok("to")["input_ids"][0] == tok.bos_token_id) is add_bos


def test_convert_gguf_is_atomic(tiny, tmp_path, monkeypatch):
    path = tiny[0]
    out = tmp_path / "out" / "model"
    import safetensors.numpy

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(path, out)
    assert not out.exists() and list(out.parent.iterdir()) == []
    monkeypatch.undo()
    convert_gguf(path, out)
    with pytest.raises(FileExistsError, match=str(out)):
        convert_gguf(path, out)


# ------------------------------------------------------------ tokenizer
SAMPLES = ["To be, or not to be, that is the question:\n\nWhether 'tis nobler in the mind to suffer",
           "<|im_start|>user\nthe slings and arrows<|im_end|>\n<think> ok",
           "  leading spaces, digits 1234567 and ünïcödé 日本 🎉\t\r\n",
           "<|endoftext|>Ġthe"]


@pytest.mark.parametrize("pre,add_bos", [("default", False), ("llama-bpe", True)])
def test_tokenizer_matches_transformers_gguf_path(tmp_path, pre, add_bos):
    from transformers import AutoTokenizer

    path = tmp_path / "tok.gguf"
    write_tiny_gguf(path, pre=pre, add_bos=add_bos)
    ours = tokenizer_from_gguf(path)
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in SAMPLES:
        a, b = ours(text)["input_ids"], ref(text)["input_ids"]
        assert a == b, text
        assert ours.decode(a) == ref.decode(b)
        assert ours.decode(a, skip_special_tokens=True) == ref.decode(b, skip_special_tokens=True)
    assert (ours("the")["input_ids"][0] == ours.bos_token_id) is add_bos
    assert (ours.bos_token, ours.eos_token, ours.unk_token) == (ref.bos_token, ref.eos_token, ref.unk_token)
    assert len(ours) == len(ref)


def test_tokenizer_does_not_import_torch(tiny):
    import subprocess

    code = ("import sys; from ppn.gguf_reader import read_gguf; from ppn.gguf_tokenizer import tokenizer_from_gguf; "
            f"t = tokenizer_from_gguf({str(tiny[0])!r}); read_gguf({str(tiny[0])!r}); "
            "assert t('to be')['input_ids']; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------ bad input
def test_not_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_text("this is just text, not a model\n")
    with pytest.raises(ValueError, match=f"not a valid GGUF file: {path}"):
        tokenizer_from_gguf(path)


@pytest.mark.parametrize("keep", [0.5, 0.02, 0.999])
def test_truncated_gguf(tiny, tmp_path, keep):
    path = truncated_copy(tiny[0], tmp_path, keep)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=str(path)):
        convert_gguf(path, out)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_missing_file(tmp_path):
    path = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match=str(path)):
        tokenizer_from_gguf(path)
    with pytest.raises(FileNotFoundError, match=str(path)):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_wrong_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_gpt2_gguf(path)
    with pytest.raises(ValueError, match=f"architecture 'gpt2' in {path}"):
        tokenizer_from_gguf(path)
    with pytest.raises(ValueError, match="gpt2"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
