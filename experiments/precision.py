"""bfloat16 against float32: validation perplexity, per-token KL, and what a fit's
weight step can still move in bfloat16.

    python experiments/precision.py            # SmolLM2-135M, quick validation perplexity in both dtypes
    python experiments/precision.py --smoke    # tiny random model, seconds

The model is loaded twice from the same checkpoint (`load_model(..., dtype=)`):
weights and activations in that dtype, norms, softmax and logits in float32
either way. Rows: one per dtype, with the quick (64-window) validation
perplexity, its wall time and the weights' bytes; the bfloat16 row adds the
perplexity ratio, the mean per-token KL(float32 || bfloat16) of the next-token
distributions on the first windows (maxtext's parity measure: elementwise
bfloat16 logits are expected to differ), and the fraction of block weights
that one step of size `lr` (the fit's default lr_weights; Adam's first steps
are about lr per weight) leaves unchanged when rounded to bfloat16: why a
bfloat16 fit keeps float32 master weights (`ppn.fit`).

Writes results/speed/precision.json and .md (precision_smoke.* with --smoke).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ppn
from ppn import data
from ppn.evaluate import perplexity
from ppn.fit import FitConfig
from ppn.harness.report import write_results

DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "smollm2-135m"
    max_windows: int | None = 64  # "quick"
    seqlen: int = 512
    kl_windows: int = 8
    lr: float = FitConfig.lr_weights
    out_dir: str = "results/speed"
    smoke: bool = False


@functools.partial(jax.jit, static_argnums=(0, 2))
def _token_kl(graphdef_p, state_p, graphdef_q, state_q, ids):
    """Mean over the (B, T) positions of KL(p || q) between two models' next-token distributions."""
    logp = jax.nn.log_softmax(nnx.merge(graphdef_p, state_p)(ids).astype(jnp.float32), -1)
    logq = jax.nn.log_softmax(nnx.merge(graphdef_q, state_q)(ids).astype(jnp.float32), -1)
    return (jnp.exp(logp) * (logp - logq)).sum(-1).mean()


def frozen_fraction(model: ppn.Llama, lr: float) -> float:
    """Fraction of the block weights w for which bf16(bf16(w) + lr) == bf16(w): a
    step of size lr is rounded away (float32 weights in, any magnitude)."""
    frozen = total = 0
    for w in jax.tree.leaves(nnx.state(model.blocks, nnx.Param)):
        w16 = jnp.asarray(w, jnp.float32).astype(jnp.bfloat16)
        frozen += int(((w16.astype(jnp.float32) + lr).astype(jnp.bfloat16) == w16).sum())
        total += w.size
    return frozen / total


def main(cfg: Config) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.smoke:
            from ppn.testing import tiny_model

            path = ppn.save_model(tiny_model(), Path(tmp) / "tiny")
            tokens = np.random.default_rng(0).integers(0, 97, 4 * cfg.seqlen)
        else:
            path = ppn.checkpoint.resolve_source(cfg.model)
            tokens = data.tokenize(data.shakespeare("validation"), ppn.load_tokenizer(path))
        models = {d: ppn.load_model(path, dtype=d) for d in DTYPES}

        records = []
        for dtype, model in models.items():
            start = time.perf_counter()
            result = perplexity(model, tokens, seqlen=cfg.seqlen, max_windows=cfg.max_windows)
            records.append({"model": "tiny" if cfg.smoke else cfg.model, "dtype": dtype,
                            "perplexity": result.perplexity, "nll": result.nll, "windows": result.num_windows,
                            "seconds": time.perf_counter() - start,
                            "weight_bytes": sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))})
        windows = data.eval_windows(tokens, cfg.seqlen, cfg.kl_windows)
        (g32, s32), (g16, s16) = (nnx.split(models[d]) for d in DTYPES)
        kl = float(np.mean([_token_kl(g32, s32, g16, s16, jnp.asarray(w[None])) for w in windows]))
        records[1] |= {"perplexity_ratio": records[1]["perplexity"] / records[0]["perplexity"],
                       "kl_per_token": kl, "frozen_fraction_at_lr": frozen_fraction(models["float32"], cfg.lr),
                       "lr": cfg.lr}
    windows = records[0]["windows"]
    mode = {64: "quick"}.get(windows, "full" if cfg.max_windows is None else f"{windows} windows")
    write_results("precision_smoke" if cfg.smoke else "precision", records,
                  ["model", "dtype", "perplexity", "perplexity_ratio", "kl_per_token", "frozen_fraction_at_lr",
                   "windows", "seconds", "weight_bytes"],
                  out_dir=cfg.out_dir, title=f"bfloat16 against float32: validation perplexity ({mode})")
    for r in records:
        print(r)
    return records


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny random model, seconds")
    parser.add_argument("--max-windows", type=int, default=64, help="validation windows (default 64: quick)")
    parser.add_argument("--out-dir", default="results/speed")
    a = parser.parse_args()
    main(Config(max_windows=a.max_windows, out_dir=a.out_dir, smoke=a.smoke,
                **(dict(seqlen=64, kl_windows=2) if a.smoke else {})))
