"""Shared fixtures: tiny Hugging Face reference models (PyTorch, tests only)."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Many tests (and the experiment scripts they start as subprocesses, and the
# notebook's kernel) compile the same tiny-model programs: JAX's persistent
# compilation cache, shared by the xdist workers, compiles each once per machine.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "ppn-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_fit():
    """One `smoke_fit_config()` fit of `tiny_model()` on `tiny_tokens()`, shared by every test of a worker."""
    from ppn.fit import fit
    from ppn.testing import smoke_fit_config, tiny_model, tiny_tokens

    return fit(tiny_model(), tiny_tokens(), smoke_fit_config(), progress=False)


@pytest.fixture(scope="session")
def tiny_plan(tiny_fit):
    """The plan of `tiny_fit`."""
    from ppn.plan import Plan

    return Plan.from_fit(tiny_fit)



def hf_reference(tmp_path, model_type="llama", seed=0, **overrides):
    """Saves a tiny random Hugging Face model of `model_type` and returns (dir, torch model).

    Weights are scaled up from HF's default init (std 0.02) so that logits are
    far from uniform and a wrong permutation or convention shows.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    kwargs.update(overrides)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[model_type]
    config = cls[0](**kwargs)
    model = cls[1](config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    path = tmp_path / f"hf-{model_type}-{seed}"
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def torch_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()
