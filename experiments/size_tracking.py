"""How closely fits kept the expected size on the size each step asked for:
the push offset (exact by construction) against Lagrange multipliers, or any
runs side by side, from their metrics.jsonl alone.

    python experiments/size_tracking.py runs/lr1e-4 runs/ablation-lagrange
    python experiments/size_tracking.py --smoke      # a tiny fit in a temporary folder, seconds

Per run: the mean and largest |E[size] - rho| over all steps and over the last
third, and the mean signed error on steps that asked for rho < 0.4. Writes
results/speed/size_tracking.json, .md and .png (expected size against the asked size,
one panel per run).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ppn.harness.report import write_results  # noqa: E402
from ppn.runs import read_metrics  # noqa: E402

COLUMNS = ["run", "constraint", "steps", "mean_abs_error", "max_abs_error", "mean_abs_error_last_third",
           "mean_error_below_0.4"]


def _metrics(run_dir: Path) -> list[dict]:
    rows = read_metrics(run_dir)
    if not rows:
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: not a run folder of ppn fit")
    return rows


def summary(run_dir: str | Path) -> dict:
    """The size-tracking summary of one run folder."""
    run_dir = Path(run_dir)
    rows = _metrics(run_dir)
    rho = np.array([r["rho"] for r in rows])
    error = np.array([r["expected_size"] for r in rows]) - rho
    constraint = json.loads((run_dir / "config.json").read_text())["fit"].get("constraint", "offset")
    low = rho < 0.4
    return {"run": run_dir.name, "constraint": constraint, "steps": len(rows),
            "mean_abs_error": float(np.abs(error).mean()), "max_abs_error": float(np.abs(error).max()),
            "mean_abs_error_last_third": float(np.abs(error[-max(1, len(rows) // 3):]).mean()),
            "mean_error_below_0.4": float(error[low].mean()) if low.any() else None}


def plot(run_dirs: list[Path], path: Path) -> None:
    fig, axes = plt.subplots(1, len(run_dirs), figsize=(4 * len(run_dirs), 3.6), squeeze=False)
    for ax, run_dir in zip(axes[0], run_dirs):
        rows = _metrics(run_dir)
        rho = [r["rho"] for r in rows]
        ax.scatter(rho, [r["expected_size"] for r in rows], c=np.arange(len(rows)), s=8, cmap="viridis")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set(title=run_dir.name, xlabel="asked size ρ", ylabel="expected kept size", xlim=(0, 1.02), ylim=(0, 1.02))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(run_dirs: list[str], out_dir: str = "results/speed", name: str = "size_tracking") -> list[dict]:
    dirs = [Path(d) for d in run_dirs]
    rows = [summary(d) for d in dirs]
    write_results(name, rows, COLUMNS, out_dir=out_dir,
                  title="Expected kept size against the size asked for, per step (from metrics.jsonl)")
    plot(dirs, Path(out_dir) / f"{name}.png")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="*", help="run folders of ppn fit")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out-dir", default="results/speed")
    a = parser.parse_args()
    if a.smoke:
        import ppn
        from ppn.testing import tiny_model

        tmp = Path(tempfile.mkdtemp())
        tokens = np.random.default_rng(0).integers(0, 97, 10_000)
        for constraint in ("offset", "lagrange"):
            cfg = ppn.FitConfig(steps=6, batch_size=2, seqlen=32, group_width=16, constraint=constraint)
            ppn.fit(tiny_model(), tokens, cfg, run_dir=tmp / constraint, progress=False)
        a.run_dirs = [str(tmp / "offset"), str(tmp / "lagrange")]
    elif not a.run_dirs:
        parser.error("give one or more run folders (or --smoke)")
    for row in main(a.run_dirs, a.out_dir, "size_tracking_smoke" if a.smoke else "size_tracking"):
        print(row)
