"""The dense model's reference numbers: validation perplexity, and prefill and decode
throughput of the ppn (JAX) model against the Hugging Face PyTorch model, in one process.

    python experiments/dense_baseline.py            # SmolLM2-135M, full validation split
    python experiments/dense_baseline.py --smoke    # tiny random model, seconds

Writes results/dense/dense_baseline.json and .md. PyTorch is imported here only as the
reference implementation; the library itself never imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

import numpy as np

import ppn
from ppn import data, speed
from ppn.evaluate import perplexity
from ppn.harness.report import write_results


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "smollm2-135m"
    split: str = "validation"
    max_windows: int | None = None  # None = full split
    seqlen: int = 512
    prefill_batch: int = 4
    prompt_len: int = 128
    new_tokens: int = 128
    torch_perplexity: bool = True
    out_dir: str = "results/dense"
    smoke: bool = False


def torch_throughput(path, cfg: Config) -> dict:
    """Prefill and cached greedy decode throughput of the transformers PyTorch model."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    ids = torch.as_tensor(rng.integers(0, vocab, (cfg.prefill_batch, cfg.seqlen)))
    prompt = torch.as_tensor(rng.integers(0, vocab, (1, cfg.prompt_len)))

    def prefill():
        with torch.no_grad():
            model(ids, use_cache=False)

    def decode():
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens,
                           do_sample=False, pad_token_id=0)

    return {"prefill": speed.time_call(prefill, cfg.prefill_batch * cfg.seqlen, 3),
            "decode": speed.time_call(decode, cfg.new_tokens, 2), "model": model}


def torch_perplexity(model, tokens: np.ndarray, cfg: Config) -> float:
    import torch

    windows = data.eval_windows(tokens, cfg.seqlen, cfg.max_windows)
    total = 0.0
    with torch.no_grad():
        for w in windows:
            logits = model(torch.as_tensor(w[None].astype(np.int64))).logits[0, :-1].double()
            total += torch.nn.functional.cross_entropy(logits, torch.as_tensor(w[1:].astype(np.int64)),
                                                       reduction="sum").item()
    return float(np.exp(total / (len(windows) * (cfg.seqlen - 1))))


def main(cfg: Config) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.smoke:
            from ppn.testing import tiny_model

            model = tiny_model()
            path = ppn.save_model(model, f"{tmp}/tiny")
            tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, 4 * cfg.seqlen)
        else:
            path = ppn.checkpoint.resolve_source(cfg.model)
            model = ppn.load_model(path)
            tokens = data.tokenize(data.shakespeare(cfg.split), ppn.load_tokenizer(path))

        start = time.perf_counter()
        ppl = perplexity(model, tokens, seqlen=cfg.seqlen, max_windows=cfg.max_windows)
        ppl_seconds = time.perf_counter() - start
        ours = {"prefill": speed.prefill_throughput(model, cfg.prefill_batch, cfg.seqlen),
                "decode": speed.decode_throughput(model, cfg.prompt_len, cfg.new_tokens),
                "decode_no_cache": speed.decode_without_cache_throughput(model, cfg.prompt_len, cfg.new_tokens)}
        theirs = torch_throughput(path, cfg)
        ref_ppl = torch_perplexity(theirs["model"], tokens, cfg) if cfg.torch_perplexity else None

    base = {"model": "tiny" if cfg.smoke else cfg.model, "params_total": model.config.num_params(),
            "params_prunable": model.config.num_prunable_params()}
    mode = "full" if cfg.max_windows is None else f"{ppl.num_windows} windows"
    records = [
        base | {"measure": f"perplexity {cfg.split} ({mode})", "implementation": "ppn (JAX)",
                "value": ppl.perplexity, "tokens": ppl.num_tokens, "seconds": ppl_seconds},
        base | {"measure": f"perplexity {cfg.split} ({mode})", "implementation": "transformers (PyTorch)",
                "value": ref_ppl},
    ]
    for name, ours_t, theirs_t in [("prefill tokens/s (4x512)", ours["prefill"], theirs["prefill"]),
                                   ("decode tokens/s (1x128+128, KV cache)", ours["decode"], theirs["decode"])]:
        records.append(base | {"measure": name, "implementation": "ppn (JAX)", "value": ours_t.tokens_per_second,
                               "ratio_to_pytorch": ours_t.tokens_per_second / theirs_t.tokens_per_second})
        records.append(base | {"measure": name, "implementation": "transformers (PyTorch)",
                               "value": theirs_t.tokens_per_second})
    no_cache = ours["decode_no_cache"].tokens_per_second
    records.append(base | {"measure": "decode tokens/s without KV cache (recompute prefix)",
                           "implementation": "ppn (JAX)", "value": no_cache,
                           "ratio_cache_to_no_cache": ours["decode"].tokens_per_second / no_cache})
    name = "dense_baseline_smoke" if cfg.smoke else "dense_baseline"
    write_results(name, records, ["model", "measure", "implementation", "value", "ratio_to_pytorch",
                                  "ratio_cache_to_no_cache", "tokens", "seconds"],
                  out_dir=cfg.out_dir, title="Dense model: perplexity and throughput")
    for r in records:
        print({k: r[k] for k in r if k not in base})
    return records


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny random model, a few seconds")
    parser.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    parser.add_argument("--no-torch-perplexity", action="store_true", help="skip the PyTorch perplexity")
    parser.add_argument("--out-dir", default="results/dense")
    a = parser.parse_args()
    smoke = dict(seqlen=64, prefill_batch=2, prompt_len=16, new_tokens=16) if a.smoke else {}
    main(Config(max_windows=a.max_windows, torch_perplexity=not a.no_torch_perplexity, out_dir=a.out_dir,
                smoke=a.smoke, **smoke))
