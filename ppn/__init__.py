"""ppn: Push Puppet Networks, Bayesian structured pruning of LLaMA-family models in JAX.

The data flow, one module per step:

    checkpoint   load_model, save_model, load_tokenizer   (HF directories and Hub ids, GGUF, the zoo;
                 from_pretrained, save_pretrained: the same under transformers' names)
    models       Llama, LlamaConfig                        (Flax NNX decoder, per-block shapes)
    gates        Units, KeepSet                            (prunable units and their exact costs)
    bayes        push_puppet_model                         (hierarchical prior, hard-concrete gates)
    fit          fit, FitConfig                            (SVI with the network weights)
    plan         Plan                                      (posterior summary: size -> structure)
    prune        prune, load_pruned                        (the smaller dense model, in memory or from disk)
    evaluate     perplexity;  generate: generate;  speed: throughput
    speculative  speculative_generate, draft_from_plan, choose_draft  (a pruned draft speeds up its target)
"""

from ppn.checkpoint import count_params, from_pretrained, load_model, load_tokenizer, save_model, save_pretrained
from ppn.evaluate import perplexity
from ppn.fit import FitConfig, FitResult, fit
from ppn.units import KeepSet, Units
from ppn.generate import generate
from ppn.models.config import LayerShape, LlamaConfig, RopeScaling
from ppn.models.llama import KVCache, Llama
from ppn.plan import Plan
from ppn.prune import load_pruned, prune
from ppn.speculative import SpeculativeResult, choose_draft, draft_from_plan, speculative_generate

__all__ = [
    "FitConfig", "FitResult", "KVCache", "KeepSet", "LayerShape", "Llama", "LlamaConfig", "Plan", "RopeScaling",
    "SpeculativeResult", "Units", "choose_draft", "count_params", "draft_from_plan", "fit", "from_pretrained",
    "generate", "load_model", "load_pruned", "load_tokenizer", "perplexity", "prune", "save_model", "save_pretrained",
    "speculative_generate",
]
