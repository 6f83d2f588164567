"""Resident memory of a fit: how much a push puppet fit of the real model needs
beyond the loaded model, while it starts and while it steps.

A thread samples the process's resident memory (psutil) every 0.1 s while
`ppn.fit` runs in a run folder (so its orbax checkpoints are included). The fit's
metrics give each step's wall time; the last sum(step times) seconds of the fit
are its stepping phase, everything before is the start (Taylor importances,
numpyro's initialisation, the step's compilation). Reported per phase: the peak
and the median resident memory, in GiB, and the resident memory after loading
the model and the data (the baseline).

    python experiments/fit_memory.py                  # SmolLM2-135M, 50 steps of FitConfig()
    python experiments/fit_memory.py --smoke          # tiny model, seconds

Writes results/fit_memory.json and .md (fit_memory_smoke.* with --smoke). Run it
alone: other processes do not change its numbers, but it needs the memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import threading
import time

import numpy as np
import psutil

import ppn
from ppn import data
from ppn.report import write_results

COLUMNS = ["phase", "seconds", "peak_gib", "median_gib", "steps", "batch_size", "seqlen", "malloc_arena_max"]


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "smollm2-135m"
    fit: ppn.FitConfig = ppn.FitConfig(steps=50)
    interval: float = 0.1
    out_dir: str = "results"
    smoke: bool = False


class _Sampler(threading.Thread):
    """(time, resident bytes) of this process every `interval` seconds until stopped."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval, self.samples, self.stopped = interval, [], threading.Event()
        self.process = psutil.Process()

    def run(self):
        while not self.stopped.is_set():
            self.samples.append((time.perf_counter(), self.process.memory_info().rss))
            self.stopped.wait(self.interval)

    def between(self, start: float, end: float) -> np.ndarray:
        """Resident bytes of the samples taken in [start, end] (at least the nearest one)."""
        t, rss = np.array(self.samples).T
        inside = (t >= start) & (t <= end)
        return rss[inside] if inside.any() else rss[[np.argmin(np.abs(t - end))]]


def main(cfg: Config) -> list[dict]:
    if cfg.smoke:
        from ppn.testing import tiny_model

        model, tokens = tiny_model(), np.random.default_rng(0).integers(0, 97, 10_000)
    else:
        model = ppn.load_model(cfg.model)
        tokens = data.tokenize(data.shakespeare("train"), ppn.load_tokenizer(cfg.model))
    sampler = _Sampler(cfg.interval)
    sampler.start()
    time.sleep(2 * cfg.interval)
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        result = ppn.fit(model, tokens, cfg.fit, run_dir=run_dir)
    end = time.perf_counter()
    sampler.stopped.set()
    sampler.join()
    stepping = end - sum(row["seconds"] for row in result.metrics)
    gib = 2.0 ** 30
    common = dict(steps=cfg.fit.steps, batch_size=cfg.fit.batch_size, seqlen=cfg.fit.seqlen,
                  malloc_arena_max=os.environ.get("MALLOC_ARENA_MAX", "default"))
    rows = []
    for phase, start, stop in [("model and data loaded", 0.0, begin), ("fit start (init, compile)", begin, stepping),
                               ("fit steps", stepping, end)]:
        rss = sampler.between(start, stop)
        rows.append({"phase": phase, "seconds": stop - start if start else None, "peak_gib": float(rss.max()) / gib,
                     "median_gib": float(np.median(rss)) / gib, **common})
    name = "fit_memory_smoke" if cfg.smoke else "fit_memory"
    write_results(name, rows, COLUMNS, out_dir=cfg.out_dir,
                  title=f"Resident memory of a {cfg.fit.steps}-step fit of {'a tiny model' if cfg.smoke else cfg.model}"
                        f" (sampled every {cfg.interval} s)")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out-dir", default="results")
    a = parser.parse_args()
    fit = (ppn.FitConfig(steps=4, batch_size=2, seqlen=32, group_width=16, checkpoint_every=2) if a.smoke
           else ppn.FitConfig(steps=a.steps))
    for row in main(Config(fit=fit, out_dir=a.out_dir, smoke=a.smoke)):
        print(row)
