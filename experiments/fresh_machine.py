"""A fresh machine as a new user meets it: the README's two commands, in a new
virtual environment made from a clean clone, with an empty ppn cache.

    python experiments/fresh_machine.py               # both (about 1.5 hours on 2 cores)
    python experiments/fresh_machine.py --only main   # the main job only

Clones this repository's HEAD into a temporary folder, makes a venv there
(`python -m venv`), and runs each command of the README's "two commands" section in
bash inside it, with `PPN_CACHE` an empty folder (so the model is fetched and
converted, the texts tokenised and every program compiled, as on a new machine).
Per command: the text, the exit status, the wall seconds, and the peak resident
memory of its largest process. The main command's `pip install` goes first, so the
test command's install finds the package already there and adds only its extra.
Writes results/budget/fresh_machine.json (+ .md). Run it alone: its timings are the
README's.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ppn.harness.report import write_results

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Install, and the two commands"


def readme_commands(readme: str) -> dict[str, str]:
    """The two commands of the README's install section, {"main": ..., "tests": ...}:
    its first two ```bash blocks, one line each."""
    if SECTION not in readme:
        raise ValueError(f"the README has no section {SECTION!r}")
    section = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]
    if len(blocks) != 2 or any("\n" in b for b in blocks):
        raise ValueError(f"the README's {SECTION!r} needs exactly two one-line bash blocks, found {blocks}")
    return {"main": blocks[0], "tests": blocks[1]}


def timed(command: str, cwd: Path, env: dict[str, str]) -> dict:
    """Runs `command` in bash; its exit status, wall seconds, peak RSS (GiB) and the tails of its
    stdout and stderr, kept apart (pip's warnings on stderr must not push out pytest's summary)."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(['bash', '-c', sys.argv[1]]); "
             "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", probe, command], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak = [line for line in run.stdout.splitlines() if line.startswith("PEAK_KIB")]
    stdout = "\n".join(line for line in run.stdout.splitlines() if not line.startswith("PEAK_KIB"))
    return {"command": command, "returncode": run.returncode, "seconds": seconds,
            "peak_rss_gib": int(peak[-1].split()[1]) / 2**20 if peak else None,
            "stdout_tail": stdout[-3000:], "stderr_tail": run.stderr[-2000:]}


def main(only: str | None = None, out_dir: str = "results/budget") -> list[dict]:
    commands = readme_commands((ROOT / "README.md").read_text())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="ppn-fresh-") as tmp:
        tmp = Path(tmp)
        clone, venv, cache = tmp / "ppn", tmp / "venv", tmp / "cache"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        subprocess.run(["git", "checkout", "-q", commit], cwd=clone, check=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PPN_", "VIRTUAL_ENV"))}
        env |= {"PATH": f"{venv / 'bin'}:{env.get('PATH', '')}", "VIRTUAL_ENV": str(venv), "PPN_CACHE": str(cache),
                "TQDM_DISABLE": "1"}
        rows = []
        for name, command in commands.items():
            if only in (None, name):
                rows.append({"name": name, **timed(command, clone, env)})
                print({k: v for k, v in rows[-1].items() if not k.endswith("_tail")}, flush=True)
    write_results("fresh_machine", rows, ["name", "command", "returncode", "seconds", "peak_rss_gib"],
                  out_dir=out_dir, config={"commit": commit, "only": only, "python": sys.version.split()[0]},
                  title="The README's two commands in a new venv from a clean clone, empty ppn cache")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("main", "tests"))
    parser.add_argument("--out-dir", default="results/budget")
    a = parser.parse_args()
    main(a.only, a.out_dir)
