"""Runs a study from its versioned config, `experiments/studies/<study>.toml`.

A study file names one script and its runs, each with the script's arguments and
the results file it writes:

    study = "quality"
    script = "experiments/quality_ablation.py"
    [[run]]
    args = ["combined_lr3e-4", "--seed", "1"]
    results = "results/quality/combined_lr3e-4_steps150_seed1.json"

Runs whose results file exists are skipped, so a study resumes where it stopped
(each script resumes its own run folder too). Every results JSON records the
command that made it; tests/test_experiments.py checks that it is the study's.

    python experiments/run_study.py quality            # every missing run, in order
    python experiments/run_study.py quality --list     # what is done and what is not
    python experiments/run_study.py quality fair_rows --parallel 2   # two at a time (one GPU: experiments/gpu_run.sh)

With `--parallel N` the missing runs of every named study start N at a time, each
writing its output to runs/logs/<results file's stem>.log; the command fails
naming every run that failed, after the others finish.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ROOT / "experiments" / "studies"


def load_study(name_or_path: str | Path) -> dict:
    """A study file as a dict (study, script, about, run: [{args, results}]).

    Raises:
        FileNotFoundError: no such study (the message lists the known ones).
        ValueError: the file lacks a field or a run is malformed (named).
    """
    path = Path(name_or_path)
    if not path.suffix:
        path = STUDIES / f"{name_or_path}.toml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in STUDIES.glob("*.toml")))
        raise FileNotFoundError(f"no study file {path}; known studies: {known}")
    study = tomllib.loads(path.read_text())
    missing = [k for k in ("study", "script", "about", "run") if k not in study]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    for i, run in enumerate(study["run"]):
        if not (isinstance(run.get("args"), list) and all(isinstance(a, str) for a in run["args"])
                and isinstance(run.get("results"), str)):
            raise ValueError(f"{path}: run {i} needs args (a list of strings) and results (a path)")
    return study


def command(study: dict, run: dict) -> str:
    """The command line a run's results file records: the script and its arguments."""
    return " ".join([study["script"], *run["args"]])


def log_path(run: dict) -> Path:
    """Where a run started by `--parallel` writes its output."""
    return ROOT / "runs" / "logs" / f"{Path(run['results']).stem}.log"


def main(names: list[str], list_only: bool = False, parallel: int = 1) -> None:
    todo = []
    for name in names:
        study = load_study(name)
        for run in study["run"]:
            done = (ROOT / run["results"]).exists()
            print(f"{'done' if done else 'todo'}  {command(study, run)}  -> {run['results']}")
            if not done:
                todo.append(([sys.executable, study["script"], *run["args"]], run))
    if list_only:
        return
    if parallel <= 1:
        for argv, _ in todo:
            subprocess.run(argv, cwd=ROOT, check=True)
        return
    waiting, running, failed = list(todo), [], []
    while waiting or running:
        while waiting and len(running) < parallel:
            argv, run = waiting.pop(0)
            log_path(run).parent.mkdir(parents=True, exist_ok=True)
            with open(log_path(run), "w") as log:
                running.append((subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), argv, run))
        time.sleep(1)
        for item in [r for r in running if r[0].poll() is not None]:
            running.remove(item)
            proc, argv, run = item
            print(f"{'done' if proc.returncode == 0 else f'FAILED ({proc.returncode})'}  {' '.join(argv[1:])}"
                  f"  (log {log_path(run).relative_to(ROOT)})", flush=True)
            if proc.returncode:
                failed.append(" ".join(argv[1:]))
    if failed:
        sys.exit("failed runs: " + "; ".join(failed))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", nargs="+", help="names in experiments/studies/ or .toml paths")
    parser.add_argument("--list", action="store_true", help="show each run's state, run nothing")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (default 1: in order, stop at a failure)")
    a = parser.parse_args()
    main(a.study, a.list, a.parallel)
