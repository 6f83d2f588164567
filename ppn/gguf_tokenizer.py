"""The tokenizer a llama.cpp GGUF file describes, and the file converted to a Hugging Face checkpoint directory.

A GGUF file carries its tokenizer as metadata: the byte-level BPE vocabulary,
merges and token types, the special token ids, the add-BOS/EOS flags and the
chat template. `tokenizer_from_gguf` rebuilds the Hugging Face fast tokenizer
from them without torch; `convert_gguf` writes it beside the weights and config
of `ppn.gguf_reader.read_gguf`:

    tok = tokenizer_from_gguf("model.Q4_1.gguf")
    convert_gguf("model.Q4_1.gguf", "out")   # config.json, model.safetensors, tokenizer files
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ppn.gguf_reader import check_architecture, open_gguf, read_gguf, read_metadata, required

# GGUF token types (llama.cpp's `llama_token_type`).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: a printable character standing for each byte.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls,
    space, ...) take the characters from U+0100 on, in byte order. Byte-level
    BPE vocabularies spell every token in this alphabet.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(keep)
    table, extra = {}, 0
    for b in range(256):
        if b in kept:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# Pre-tokenizer splits for GGUF `tokenizer.ggml.pre` values used by LLaMA-family
# vocabularies whose split differs from GPT-2's (Llama 3's; the "smollm" and
# "gpt-2" vocabularies use GPT-2's, which is ByteLevel's built-in one).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT}


def tokenizer_from_gguf(path: str | os.PathLike):
    """The Hugging Face fast tokenizer a GGUF file describes, built without torch.

    `AutoTokenizer.from_pretrained(dir, gguf_file=...)` gives the same token ids
    but imports torch; this builds the byte-level BPE directly with the
    `tokenizers` library from the metadata: tokens, merges, token types (control
    tokens become special tokens, user-defined ones added tokens), BOS/EOS/UNK/PAD
    ids, the add-BOS/EOS flags and the chat template.

    Args:
        path: the `.gguf` file.

    Returns:
        A `transformers.PreTrainedTokenizerFast`.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: not a GGUF file, or a tokenizer model other than byte-level
            BPE ("gpt2"); the message names the file.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path, reader = open_gguf(path)
    meta = read_metadata(reader)
    del reader
    check_architecture(meta, path)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"unsupported tokenizer model {kind!r} in {path}: only byte-level BPE ('gpt2') is supported")
    tokens = list(required(meta, "tokenizer.ggml.tokens", path))
    types = list(meta.get("tokenizer.ggml.token_type") or [0] * len(tokens))
    merges = []
    for m in required(meta, "tokenizer.ggml.merges", path):
        pair = m.split(" ")
        if len(pair) != 2:
            raise ValueError(f"malformed merge {m!r} in {path}")
        merges.append(tuple(pair))

    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    # A token not already spelled in the byte alphabet (rare: a raw space, say) is respelled from its UTF-8 bytes.
    spelled = [t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False))
    split = _SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(
            add_prefix_space=bool(meta.get("tokenizer.ggml.add_space_prefix", False)))
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    # Control tokens (e.g. <|im_start|>) must stay whole: special tokens. One not spelled in the
    # byte alphabet would be a mislabelled entry and is left alone, as transformers does.
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, k in zip(tokens, types) if k == _TOKEN_CONTROL and set(t) <= letters])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, k in zip(tokens, types) if k == _TOKEN_USER_DEFINED and t in vocab])

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    kwargs = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
              "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id"),
              "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
              "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False))}
    if "tokenizer.chat_template" in meta:
        kwargs["chat_template"] = meta["tokenizer.chat_template"]
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


# ------------------------------------------------------------------ conversion
def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = False) -> Path:
    """Converts a llama GGUF file into a Hugging Face checkpoint directory, atomically.

    Writes `config.json`, `model.safetensors` (float32) and the tokenizer files
    into a temporary directory next to `out_dir` and renames it into place, so
    `out_dir` either appears complete or not at all.

    Args:
        path: the `.gguf` file.
        out_dir: the directory to create; it must not exist yet.
        progress: show a tqdm bar while dequantising.

    Returns:
        `out_dir`, loadable by `transformers.LlamaForCausalLM.from_pretrained` and
        `AutoTokenizer.from_pretrained`, and by `ppn.load_model`.

    Raises:
        FileExistsError: `out_dir` already exists.
        FileNotFoundError, ValueError: as `read_gguf` and `tokenizer_from_gguf`.
    """
    from safetensors.numpy import save_file

    out = Path(out_dir).expanduser()
    if out.exists():
        raise FileExistsError(f"cannot convert {path} into {out}: it already exists")
    ckpt = read_gguf(path, progress=progress)
    tokenizer = tokenizer_from_gguf(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(ckpt.config, indent=2) + "\n")
        save_file(ckpt.tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
