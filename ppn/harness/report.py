"""Results files: every reported number is a record in `results/<experiment>.json`,
with a markdown table beside it, stamped with the machine and the git commit."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ppn.runs import atomic_write

TOTAL_COLUMNS = ["method", "sizes", "total_seconds", "one_time_seconds", "per_size_seconds"]


def machine() -> dict[str, Any]:
    """A description of the machine a measurement ran on."""
    import jax
    import psutil

    devices = jax.devices()
    return {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "jax_backend": jax.default_backend(),
        "devices": f"{len(devices)} x {devices[0].device_kind}",
        "python": platform.python_version(),
        "jax": jax.__version__,
    }


def git_commit() -> str | None:
    """The commit of the working tree (suffixed "-dirty" with uncommitted changes), if any.

    A copy without its git folder (a tree sent to another machine) reports `$PPN_COMMIT`
    when set, as the sender's commit."""
    try:
        here = Path(__file__).parent
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("PPN_COMMIT")


def markdown_table(records: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of `columns` of `records` (floats to 4 significant digits)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in records]
    return "\n".join(lines) + "\n"


def write_results(name: str, records: Sequence[dict[str, Any]], columns: Sequence[str],
                  out_dir: str | os.PathLike = "results", title: str | None = None,
                  config: dict[str, Any] | None = None) -> Path:
    """Writes `<out_dir>/<name>.json` (records + machine + commit + the command
    line + the experiment's full `config`) and `<name>.md`.

    Returns:
        The path of the JSON file.
    """
    out = Path(out_dir)
    stamp = {"machine": machine(), "git_commit": git_commit(), "command": " ".join(sys.argv),
             "config": config}
    records = [dict(r) for r in records]
    atomic_write(out / f"{name}.json", json.dumps({"experiment": name, **stamp, "records": records},
                                                       indent=2, default=str))
    header = f"# {title or name}\n\nMachine: {stamp['machine']['cpu_count']} CPU cores, " \
             f"{stamp['machine']['devices']} ({stamp['machine']['jax_backend']}); commit {stamp['git_commit']}.\n\n"
    atomic_write(out / f"{name}.md", header + markdown_table(records, columns))
    return out / f"{name}.json"


def wall_time_per_method(rows: list[dict]) -> list[dict]:
    """Total seconds each method spends to produce all its sizes: ppn fits once and
    resizes per size; structured baselines score once (one calibration pass) and
    cut per size; unstructured baselines run a whole calibrated pruning per size;
    fine-tuned rows count their fine-tuning."""
    totals = []
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        mine = [r for r in rows if r["method"] == method]
        per_size = float(sum(r.get("prune_seconds") or 0.0 for r in mine))
        once = max(r.get("fit_seconds", 0.0) + r.get("calibration_seconds", 0.0) for r in mine) + float(
            sum(r.get("finetune_seconds", 0.0) for r in mine))
        totals.append({"method": method, "sizes": len(mine), "total_seconds": once + per_size,
                       "one_time_seconds": once, "per_size_seconds": per_size})
    return totals
