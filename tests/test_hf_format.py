"""The Hugging Face format of a model: ppn's pruned model types in config.json."""

import pytest

from ppn.hf_format import config_from_hf, hf_config
from ppn.testing import random_plan, tiny_config


def test_pruned_model_types_round_trip_and_need_their_layers():
    config = tiny_config(num_layers=3)
    keep = random_plan(config).keep(0.5)
    for model_type in ("llama", "mistral", "qwen2"):
        fields = dict(qkv_bias=True) if model_type == "qwen2" else {}
        pruned = keep.config().replace(model_type=model_type, **fields)
        hf = hf_config(pruned)
        assert hf["model_type"] == f"ppn_pruned_{model_type}" and hf["architectures"][0].startswith("PpnPruned")
        assert config_from_hf(hf) == pruned
        assert hf_config(pruned.replace(layers=None))["model_type"] == model_type
    with pytest.raises(ValueError, match="ppn_layers"):
        config_from_hf({k: v for k, v in hf.items() if k != "ppn_layers"})
