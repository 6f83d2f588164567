"""ppn: Push Puppet Networks, Bayesian structured pruning of LLaMA-family models in JAX.

The data flow, one module per step:

    checkpoint   load_model, save_model, load_tokenizer   (HF directories and Hub ids, GGUF, the zoo;
                 from_pretrained, save_pretrained: the same under transformers' names)
                 formats: hf_format (tensor layout, config.json), safetensors_io, gguf_reader, gguf_tokenizer
    models       Llama, LlamaConfig                        (Flax NNX decoder, per-block shapes)
    units        Units, KeepSet, Costs                     (prunable units; their costs in params, FLOPs, bytes)
    gates        hard_gates, soft_gates                    (hard-concrete gates, per-block BlockGates)
    bayes        push_puppet_model                         (push function, hierarchical prior)
    fit          fit, FitConfig                            (SVI with the network weights: the run loop)
                 svi: init_fit, fit_step (one jitted step); start: the guide's starting values, the teacher;
                 runs: RunFolder, read_metrics (config.json, metrics.jsonl, checkpoints)
    posterior    Posterior, inference_data                 (the guide's posterior: draws, summaries, ArviZ)
    plan         Plan                                      (posterior + provenance in a file: size -> structure)
    decisions    quality_band, smallest_size               (quality per size over sampled structures; a size for a bar)
    prune        prune, load_pruned                        (the smaller dense model, in memory or from disk)
    evaluate     perplexity;  generate: generate;  speed: throughput, latency tables (profile_costs)
    drafts       draft_from_plan, choose_draft             (a pruned draft of the target; its size and k)
    speculative  speculative_generate                      (the draft proposes, the target verifies)
"""

from ppn.checkpoint import count_params, from_pretrained, load_model, load_tokenizer, save_model, save_pretrained
from ppn.decisions import QualityBand, quality_band, smallest_size
from ppn.drafts import choose_draft, draft_from_plan
from ppn.evaluate import perplexity
from ppn.fit import FitConfig, FitResult, fit
from ppn.generate import generate
from ppn.models.config import LayerShape, LlamaConfig, RopeScaling
from ppn.models.llama import KVCache, Llama
from ppn.plan import Plan
from ppn.posterior import Posterior, inference_data
from ppn.prune import load_pruned, prune
from ppn.speculative import SpeculativeResult, speculative_generate
from ppn.units import Costs, KeepSet, Units

__all__ = [
    "Costs", "FitConfig", "FitResult", "KVCache", "KeepSet", "LayerShape", "Llama", "LlamaConfig", "Plan",
    "Posterior", "QualityBand", "RopeScaling", "SpeculativeResult", "Units", "choose_draft", "count_params",
    "draft_from_plan", "fit", "from_pretrained", "generate", "inference_data", "load_model", "load_pruned",
    "load_tokenizer", "perplexity", "prune", "quality_band", "save_model", "save_pretrained", "smallest_size",
    "speculative_generate",
]
