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
"""

from __future__ import annotations

import argparse
import subprocess
import sys
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


def main(name: str, list_only: bool = False) -> None:
    study = load_study(name)
    for run in study["run"]:
        done = (ROOT / run["results"]).exists()
        print(f"{'done' if done else 'todo'}  {command(study, run)}  -> {run['results']}")
        if not done and not list_only:
            subprocess.run([sys.executable, study["script"], *run["args"]], cwd=ROOT, check=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="a name in experiments/studies/ or a .toml path")
    parser.add_argument("--list", action="store_true", help="show each run's state, run nothing")
    a = parser.parse_args()
    main(a.study, a.list)
