"""ppn: Push Puppet Networks, Bayesian structured pruning of LLaMA-family models in JAX.

The data flow, one module per step:
    checkpoint (load_model, save_model) -> models (Llama, LlamaConfig)
    -> data (Shakespeare splits, batches) -> evaluate (perplexity)
    -> generate (KV-cache decoding)
"""

from ppn.checkpoint import count_params, load_model, load_tokenizer, save_model
from ppn.generate import generate
from ppn.models.config import LayerShape, LlamaConfig, RopeScaling
from ppn.models.llama import KVCache, Llama

__all__ = [
    "KVCache", "LayerShape", "Llama", "LlamaConfig", "RopeScaling", "count_params", "generate",
    "load_model", "load_tokenizer", "save_model",
]
