"""Resident memory and step cost of a fit: how much a push puppet fit of the real
model needs beyond the loaded model, while it starts and while it steps, and how
its step time compares with one forward pass over the same tokens.

A thread samples the process's resident memory (psutil) every 0.1 s while
`ppn.fit` runs in a run folder (so its orbax checkpoints are included). The fit's
metrics give each step's wall time; the last sum(step times) seconds of the fit
are its stepping phase, everything before is the start (Taylor importances,
numpyro's initialisation, the step's compilation). Reported per phase: the peak
and the median resident memory, in GiB, and the resident memory after loading
the model and the data (the baseline). The stepping phase also reports the
median step time, that time as a multiple of one jitted forward pass over the
same batch_size x seqlen tokens, the share of CPU time spent in the kernel and
the minor page faults per second: large per-step buffers that the allocator
maps and unmaps at every step show up in the last two.

The allocator is the process's: run the script under different ones and compare,

    python experiments/fit_memory.py --name fit_memory_glibc
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=4294967296 \
        python experiments/fit_memory.py --name fit_memory_nomap
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
        python experiments/fit_memory.py --name fit_memory_tcmalloc
    python experiments/fit_memory.py --smoke          # tiny model, seconds

(MALLOC_MMAP_MAX_=0, like a MALLOC_MMAP_THRESHOLD_ above the largest buffer, keeps the
step's buffers of hundreds of MB in the heap instead of mapping fresh pages every step.)
It measures the recommended preset (`FitConfig.recommended()`, what `ppn fit` runs);
`--variant NAME` measures a variant of the quality study instead (`default` is
`FitConfig()`), so each technique's cost per step is measured alone:

    python experiments/fit_memory.py --variant teacher --steps 20 --name step_cost_teacher

Writes results/budget/<name>.json and .md (default fit_memory, fit_memory_smoke with
--smoke), recording the allocator settings. Run it alone: its times are
meaningless beside another busy process.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import tempfile
import threading
import time

import numpy as np
import psutil

import ppn
from ppn import data
from ppn.harness.report import write_results
from quality_ablation import VARIANTS  # experiments/ is the script's folder

COLUMNS = ["phase", "seconds", "peak_gib", "median_gib", "median_step_seconds", "step_per_forward",
           "system_cpu_share", "minor_faults_per_second", "allocator"]
ALLOCATOR_ENV = ("LD_PRELOAD", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
                 "MALLOC_TRIM_THRESHOLD_", "TCMALLOC_RELEASE_RATE")


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "smollm2-135m"
    fit: ppn.FitConfig = ppn.FitConfig(steps=50)
    interval: float = 0.1
    out_dir: str = "results/budget"
    smoke: bool = False
    name: str | None = None


class _Sampler(threading.Thread):
    """(time, resident bytes) of this process every `interval` seconds until stopped."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval, self.samples, self.stopped = interval, [], threading.Event()
        self.process = psutil.Process()

    def run(self):
        while not self.stopped.is_set():
            cpu = self.process.cpu_times()
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            self.samples.append((time.perf_counter(), self.process.memory_info().rss, cpu.user, cpu.system, faults))
            self.stopped.wait(self.interval)

    def between(self, start: float, end: float) -> np.ndarray:
        """Resident bytes of the samples taken in [start, end] (at least the nearest one)."""
        t, rss = np.array(self.samples).T[:2]
        inside = (t >= start) & (t <= end)
        return rss[inside] if inside.any() else rss[[np.argmin(np.abs(t - end))]]

    def cpu_between(self, start: float, end: float) -> tuple[float, float]:
        """(kernel share of the CPU time, minor page faults per second) between the
        samples nearest to `start` and `end`."""
        samples = np.array(self.samples)
        a, b = (samples[np.argmin(np.abs(samples[:, 0] - x))] for x in (start, end))
        user, system = b[2] - a[2], b[3] - a[3]
        return float(system / max(user + system, 1e-9)), float((b[4] - a[4]) / max(b[0] - a[0], 1e-9))


def allocator() -> str:
    """The allocator settings of this process, as the environment sets them."""
    set_ = {k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ}
    return ", ".join(f"{k}={os.path.basename(v)}" for k, v in set_.items()) or "glibc defaults"


def forward_seconds(model, tokens: np.ndarray, fit: ppn.FitConfig, repeats: int = 3) -> float:
    """Median time of one jitted forward pass over batch_size x seqlen tokens (after compiling)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    ids = np.asarray(tokens[: fit.batch_size * fit.seqlen]).reshape(fit.batch_size, fit.seqlen)
    forward(state, ids).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward(state, ids).block_until_ready()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(cfg: Config) -> list[dict]:
    if cfg.smoke:
        from ppn.testing import tiny_model

        model, tokens = tiny_model(), np.random.default_rng(0).integers(0, 97, 10_000)
    else:
        model = ppn.load_model(cfg.model)
        tokens = data.tokenize(data.shakespeare("train"), ppn.load_tokenizer(cfg.model))
    forward = forward_seconds(model, tokens, cfg.fit)
    sampler = _Sampler(cfg.interval)
    sampler.start()
    time.sleep(2 * cfg.interval)
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        result = ppn.fit(model, tokens, cfg.fit, run_dir=run_dir, progress=False)
    end = time.perf_counter()
    sampler.stopped.set()
    sampler.join()
    stepping = end - sum(row["seconds"] for row in result.metrics)
    step_seconds = float(np.median([row["seconds"] for row in result.metrics[1:]]))
    gib = 2.0 ** 30
    rows = []
    for phase, start, stop in [("model and data loaded", 0.0, begin), ("fit start (init, compile)", begin, stepping),
                               ("fit steps", stepping, end)]:
        rss = sampler.between(start, stop)
        rows.append({"phase": phase, "seconds": stop - start if start else None, "peak_gib": float(rss.max()) / gib,
                     "median_gib": float(np.median(rss)) / gib, "allocator": allocator()})
    cpu, faults = sampler.cpu_between(stepping, end)
    rows[-1] |= {"median_step_seconds": step_seconds, "forward_seconds": forward,
                 "step_per_forward": step_seconds / forward, "system_cpu_share": cpu,
                 "minor_faults_per_second": faults}
    name = cfg.name or ("fit_memory_smoke" if cfg.smoke else "fit_memory")
    write_results(name, rows, COLUMNS, out_dir=cfg.out_dir,
                  title=f"Resident memory and step cost of a {cfg.fit.steps}-step fit of "
                        f"{'a tiny model' if cfg.smoke else cfg.model} (sampled every {cfg.interval} s)",
                  config=dataclasses.asdict(cfg) | {"allocator_env": {k: os.environ.get(k) for k in ALLOCATOR_ENV}})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out-dir", default="results/budget")
    parser.add_argument("--name", help="results file name (default fit_memory, or fit_memory_smoke)")
    parser.add_argument("--variant", default="combined_lr3e-4", choices=[k for k, v in VARIANTS.items()
                                                                          if "train_text" not in v],
                        help="the quality study's variant to measure (default: the recommended preset, "
                             "what `ppn fit` runs; `default` is FitConfig())")
    a = parser.parse_args()
    overrides = VARIANTS[a.variant] | (dict(steps=4, batch_size=3, seqlen=32, group_width=16, checkpoint_every=2)
                                       if a.smoke else dict(steps=a.steps))
    fit = ppn.FitConfig(**overrides)
    for row in main(Config(fit=fit, out_dir=a.out_dir, smoke=a.smoke, name=a.name)):
        print(row)
