"""Memory and time of loading a pruned model straight from the checkpoint
(`ppn.load_pruned`, which reads only the kept slices) against loading the dense
model (`ppn.load_model`).

Every measurement runs in a fresh Python process. After the imports, the JAX
runtime's start and the plan's ranking (posterior draws, independent of the
weights), the process's peak resident memory is reset to its current resident
memory (Linux: /proc/self/clear_refs, mode 5), which is the baseline; the load
runs; the new peak (VmHWM) minus the baseline is the memory the load added.
Mapped pages of the checkpoint file count, as they count in resident memory.
Each load is measured `repeats` times and the median reported, beside the
loaded model's own bytes and the ratios the issue asks for: added memory over
the model's bytes, and added memory over what the dense load adds.

    python experiments/load_memory.py                   # runs/smollm2-135m/plan.json and its checkpoint
    python experiments/load_memory.py --smoke           # tiny model in a temporary folder, seconds

Writes results/speed/load_memory.json, .md and .png (load_memory_smoke.* with --smoke).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import ppn
from ppn.harness.report import write_results

# Aim of the issue at the smallest size: added memory <= 1.2x the pruned model's bytes
# and < 55% of what a dense load adds.
TARGET_OVER_MODEL, TARGET_VS_DENSE = 1.2, 0.55
COLUMNS = ["load", "size", "uniform", "params", "model_mib", "added_peak_mib", "added_resident_mib",
           "added_over_model", "added_vs_dense", "seconds", "repeats"]


@dataclasses.dataclass(frozen=True)
class Config:
    plan: str = "runs/smollm2-135m/plan.json"
    checkpoint: str | None = None  # default: the checkpoint the plan names
    sizes: tuple[float, ...] = (0.5, 0.3)
    uniform: bool = False
    repeats: int = 3
    out_dir: str = "results/speed"
    smoke: bool = False


def _memory() -> dict[str, int]:
    """This process's resident memory and its peak since the last reset, in bytes."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {k: int(status[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


def measure(job: dict) -> dict:
    """One load in this process: `load_model` when job["size"] is None, else `load_pruned`.

    Returns:
        {"params", "model_bytes", "added_peak_bytes", "added_resident_bytes", "seconds"}.
    """
    import gc

    import jax
    import jax.numpy as jnp
    from flax import nnx

    jnp.zeros(1).block_until_ready()
    if job["size"] is not None:
        plan = ppn.Plan.load(job["plan"])
        plan.keep(job["size"], uniform=job["uniform"])  # the ranking's draws, cached in the plan
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # peak resident memory := current
    except OSError as e:
        raise RuntimeError(f"resetting the peak resident memory needs Linux's /proc/self/clear_refs: {e}") from e
    base = _memory()["VmRSS"]
    start = time.perf_counter()
    if job["size"] is None:
        model = ppn.load_model(job["checkpoint"])
    else:
        model = ppn.load_pruned(job["checkpoint"], plan, job["size"], uniform=job["uniform"])
    jax.block_until_ready(nnx.state(model))
    seconds = time.perf_counter() - start
    memory = _memory()
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    return {"params": sum(int(x.size) for x in params), "model_bytes": sum(int(x.nbytes) for x in params),
            "added_peak_bytes": memory["VmHWM"] - base, "added_resident_bytes": memory["VmRSS"] - base,
            "seconds": seconds}


def _in_child(job: dict) -> dict:
    run = subprocess.run([sys.executable, __file__, "--measure", json.dumps(job)], capture_output=True, text=True,
                         env=os.environ | {"JAX_PLATFORMS": "cpu"}, timeout=1800)
    if run.returncode:
        raise RuntimeError(f"measurement {job} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _smoke_checkpoint(folder: Path) -> tuple[str, str]:
    """A tiny random model and a random plan for it, saved in `folder`."""
    from ppn.hf_format import build_model
    from ppn.testing import random_plan, tiny_config

    rng = np.random.default_rng(0)  # numpy weights: no initialiser to compile
    model = build_model(tiny_config(num_layers=4), lambda _, spec: rng.normal(0, 0.2, spec.hf_shape).astype(np.float32))
    ppn.save_model(model, folder / "model")
    plan = random_plan(model.config)
    plan = dataclasses.replace(plan, meta={"checkpoint": str(folder / "model")})
    plan.save(folder / "plan.json")
    return str(folder / "plan.json"), str(folder / "model")


def main(cfg: Config) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.smoke:
            plan_file, checkpoint = _smoke_checkpoint(Path(tmp))
        else:
            plan_file = cfg.plan
            checkpoint = cfg.checkpoint or json.loads(Path(plan_file).read_text())["meta"].get("checkpoint")
            if checkpoint is None:
                raise ValueError(f"{plan_file} names no checkpoint; pass --checkpoint")
        rows = []
        for size in (None, *cfg.sizes):
            job = {"plan": plan_file, "checkpoint": checkpoint, "size": size, "uniform": cfg.uniform}
            runs = [_in_child(job) for _ in range(cfg.repeats)]
            median = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
            rows.append({"load": "load_model" if size is None else "load_pruned", "size": 1.0 if size is None else size,
                         "uniform": cfg.uniform and size is not None, "params": runs[0]["params"],
                         "model_mib": runs[0]["model_bytes"] / 2**20,
                         "added_peak_mib": median["added_peak_bytes"] / 2**20,
                         "added_resident_mib": median["added_resident_bytes"] / 2**20,
                         "added_over_model": median["added_peak_bytes"] / runs[0]["model_bytes"],
                         "seconds": median["seconds"], "repeats": cfg.repeats, "checkpoint": checkpoint})
    for row in rows:
        row["added_vs_dense"] = row["added_peak_mib"] / rows[0]["added_peak_mib"]
    name = "load_memory_smoke" if cfg.smoke else "load_memory"
    path = write_results(name, rows, COLUMNS, out_dir=cfg.out_dir,
                         title="Loading a pruned model from the checkpoint: memory added and time")
    plot(rows, path.with_suffix(".png"))
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """Bars per load: peak memory added and the loaded model's own bytes (MiB); wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["dense\nload_model" if r["load"] == "load_model" else f"size {r['size']:g}\nload_pruned"
              for r in rows]
    x = np.arange(len(rows))
    fig, (mem, sec) = plt.subplots(1, 2, figsize=(10, 4))
    mem.bar(x - 0.2, [r["added_peak_mib"] for r in rows], 0.4, label="peak memory added by the load")
    mem.bar(x + 0.2, [r["model_mib"] for r in rows], 0.4, label="the loaded model's own bytes")
    mem.set_ylabel("MiB")
    mem.legend()
    sec.bar(x, [r["seconds"] for r in rows], 0.5, color="gray")
    sec.set_ylabel("seconds")
    for ax in (mem, sec):
        ax.set_xticks(x, labels)
    fig.suptitle(f"Loading from {rows[0]['checkpoint']} (median of {rows[0]['repeats']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", default=Config.plan)
    parser.add_argument("--checkpoint", help="default: the checkpoint the plan names")
    parser.add_argument("--sizes", default="0.5,0.3", help="comma-separated sizes for load_pruned")
    parser.add_argument("--uniform", action="store_true", help="load_pruned with uniform=True")
    parser.add_argument("--repeats", type=int, default=Config.repeats, help="processes per load (median)")
    parser.add_argument("--out-dir", default="results/speed")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement, in this process
    a = parser.parse_args()
    if a.measure:
        print(json.dumps(measure(json.loads(a.measure))))
        sys.exit(0)
    sizes = (0.3,) if a.smoke else tuple(float(s) for s in a.sizes.split(","))
    cfg = Config(plan=a.plan, checkpoint=a.checkpoint, sizes=sizes, uniform=a.uniform,
                 repeats=1 if a.smoke else a.repeats, out_dir=a.out_dir, smoke=a.smoke)
    rows = main(cfg)
    smallest = min(rows, key=lambda r: r["size"])
    print(f"size {smallest['size']:g}: added memory {smallest['added_over_model']:.2f}x the pruned model "
          f"(aim <= {TARGET_OVER_MODEL}), {smallest['added_vs_dense']:.0%} of the dense load's (aim < "
          f"{TARGET_VS_DENSE:.0%})")
