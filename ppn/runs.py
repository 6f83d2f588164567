"""Run folders: what a training run (`ppn.fit`, `ppn.harness.finetune`) keeps on disk, and reading it back.

A run folder holds

    config.json     the run's FitConfig and the model's config (a resume must match them)
    metrics.jsonl   one JSON object per step ("step", "loss", "nll_per_token", ...)
    checkpoints/    orbax checkpoints of the training state (the latest two)
    DONE            written when the run is finished: later runs into the folder are refused

Every file is replaced atomically, so a killed process leaves the old version or
the new one, never half of either; the files are written by process 0 only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from ppn.sharding import is_main_process

if TYPE_CHECKING:
    from ppn.fit import FitConfig
    from ppn.models.llama import Llama

METRICS = "metrics.jsonl"


def atomic_write(path: str | os.PathLike, payload: str | bytes | np.ndarray) -> Path:
    """Writes text, bytes or an array (as `.npy`) to a temporary file beside `path`, then
    renames it over `path`: a reader never sees a partial file, and concurrent writers
    of the same content are harmless."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w" if isinstance(payload, str) else "wb") as f:
            f.write(payload) if isinstance(payload, (str, bytes)) else np.save(f, payload)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The objects of a JSON-lines file, [] when there is none. A last line cut by a
    kill in the middle of `append_jsonl` is dropped: its record is computed again."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    return rows


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Appends `row` as one JSON line and syncs it to disk before returning."""
    with open(path, "a") as f:
        f.write(json.dumps(row, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of a run folder's metrics.jsonl, one dict per logged step; [] when
    it has none yet (a fresh folder, or a run killed before its first checkpoint)."""
    return read_jsonl(Path(run_dir) / METRICS)


def step_seconds(metrics: list[dict]) -> float:
    """Seconds a fit spent in its SVI updates: the sum of the metrics rows'
    "seconds", every step of the run, the parts before a resume included
    (diagnostics, checkpoints and start-up are not counted)."""
    return float(sum(row.get("seconds", 0.0) for row in metrics))


def elbo_trend(metrics: list[dict]) -> dict | None:
    """Whether the held-out ELBO of a fit's diagnostics (rows with "heldout_elbo")
    still moves: the least-squares slope per step over the last third of them (at
    least 3) and its standard error; "flat" when the slope is within two standard
    errors of zero. None with fewer than 3 diagnostics in that third's window.

    Returns:
        {"slope", "se", "flat", "last" (the last held-out ELBO), "points"}.
    """
    rows = [m for m in metrics if "heldout_elbo" in m]
    tail = rows[-max(3, len(rows) // 3):]
    if len(tail) < 3:
        return None
    x = np.asarray([m["step"] for m in tail], np.float64)
    y = np.asarray([m["heldout_elbo"] for m in tail], np.float64)
    xc = x - x.mean()
    slope = float((xc * (y - y.mean())).sum() / (xc ** 2).sum())
    resid = y - y.mean() - slope * xc
    se = float(np.sqrt((resid ** 2).sum() / (len(x) - 2) / (xc ** 2).sum()))
    return {"slope": slope, "se": se, "flat": abs(slope) <= 2 * se, "last": float(y[-1]), "points": len(tail)}


def metrics_row(step: int, loss: float, ok: bool, rho: np.ndarray, temperature: float, metrics: dict) -> dict:
    """One line of a fit's metrics.jsonl from the step's loss, finiteness, sizes
    (float () or (B,)), temperature and the NumPyro model's "ppn$metrics". With a
    size per sequence, "rho", "expected_size" and "offset" are means over the
    batch, "sizes" lists the sizes and "size_error" is the largest error in
    absolute value."""
    rho = np.atleast_1d(np.asarray(rho, np.float64))
    expected = np.atleast_1d(np.asarray(metrics["expected_size"], np.float64))
    error = expected - rho
    row = {"step": step, "loss": loss, "finite": ok, "rho": float(rho.mean()), "temperature": temperature,
           "nll_per_token": float(metrics["nll"]), "expected_size": float(expected.mean()),
           "size_error": float(error[np.argmax(np.abs(error))]), "offset": float(np.mean(metrics["offset"])),
           "teacher_kl": float(metrics["teacher_kl"])}
    return row | ({"sizes": [round(float(r), 6) for r in rho]} if rho.size > 1 else {})


def mark_done(run_dir: str | os.PathLike) -> None:
    """Marks a run folder finished: later runs into it are refused (written by process 0)."""
    if is_main_process():
        atomic_write(Path(run_dir) / "DONE", time.strftime("%Y-%m-%dT%H:%M:%S\n"))


class RunFolder:
    """A training run's folder: config, metrics log, orbax checkpoints.

    Shared by `ppn.fit` and `ppn.harness.finetune`: an unfinished run with the same
    config and model resumes from its latest checkpoint, a finished one (DONE) is
    refused. With `run_dir` None nothing is kept and nothing resumes.
    """

    def __init__(self, run_dir: Path | None, cfg: FitConfig, model: Llama):
        self.dir = run_dir
        self.manager = None
        self.saved_at = time.monotonic()  # the start counts as the last checkpoint for `due`
        if run_dir is None:
            return
        if (run_dir / "DONE").exists():
            raise FileExistsError(f"{run_dir} holds a finished run; choose another run folder or delete it")
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {"fit": dataclasses.asdict(cfg), "model": model.config.to_hf()}
        if model.dtype != jnp.float32:  # recorded only then, so float32 runs of earlier versions still resume
            record["dtype"] = str(model.dtype)
        config_file = run_dir / "config.json"
        if config_file.exists():
            _check_same_run(run_dir, json.loads(config_file.read_text()), json.loads(json.dumps(record)))
        elif is_main_process():
            atomic_write(config_file, json.dumps(record, indent=2))
        if is_main_process():  # a kill mid-write leaves atomic_write's temporary files
            for stale in run_dir.glob(".*.json*"):
                stale.unlink(missing_ok=True)
            # and orbax's unfinished checkpoints; removed here, before the manager starts, as
            # orbax's own clean-up of them (cleanup_tmp_directories) may finish later
            for stale in run_dir.glob("checkpoints/*.orbax-checkpoint-tmp*"):
                shutil.rmtree(stale, ignore_errors=True)
        import orbax.checkpoint as ocp

        # cleanup_tmp_directories: a checkpoint whose writing was killed is removed, never read.
        self.manager = ocp.CheckpointManager(
            (run_dir / "checkpoints").absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True, cleanup_tmp_directories=True))

    def restore(self, state):
        """(step, state, nonfinite) from the latest checkpoint, or (0, state, 0).

        The restored arrays take the shapes, dtypes and shardings of `state`'s
        (each process reads only its own shards)."""
        if self.manager is None or self.manager.latest_step() is None:
            return 0, state, 0
        import orbax.checkpoint as ocp

        step = self.manager.latest_step()
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        target = {"state": abstract, "nonfinite": np.zeros((), np.int64)}
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
        return step, restored["state"], int(restored["nonfinite"])

    def due(self, step: int, cfg: FitConfig) -> bool:
        """Whether to checkpoint once `step` steps are done: always at the last step, else every
        `cfg.checkpoint_every` steps unless the last checkpoint is under `cfg.checkpoint_min_seconds` old
        (on a GPU 25 steps take seconds, and writing a checkpoint as long)."""
        return step == cfg.steps or (step % cfg.checkpoint_every == 0
                                     and time.monotonic() - self.saved_at >= cfg.checkpoint_min_seconds)

    def save(self, step: int, state, nonfinite: int):
        """Checkpoints `state` (any pytree of arrays) and the count of skipped steps as of `step` steps done."""
        if self.manager is None:
            return
        import orbax.checkpoint as ocp

        self.manager.save(step, args=ocp.args.StandardSave({"state": state, "nonfinite": np.asarray(nonfinite)}))
        self.manager.wait_until_finished()
        self.saved_at = time.monotonic()

    def metrics(self, upto: int) -> list[dict]:
        """Logged metrics of steps < upto (a resumed run drops lines past its checkpoint)."""
        if self.dir is None:
            return []
        return [r for r in read_metrics(self.dir) if r["step"] < upto]

    def write_metrics(self, rows: list[dict]):
        """Replaces metrics.jsonl with `rows`."""
        if self.dir is not None and is_main_process():
            atomic_write(self.dir / METRICS, "".join(json.dumps(r) + "\n" for r in rows))


def _check_same_run(run_dir: Path, previous: dict, current: dict) -> None:
    """Raises ValueError, naming the fields that differ, unless an unfinished run's
    recorded config.json equals the one a resume would write. A field the record lacks
    (a knob added by a later ppn) matches when it is at its default, one it has that a later
    ppn removed (`ppn.fit.RETIRED`) when it was off."""
    from ppn.fit import FitConfig, without_retired

    defaults = {f.name: f.default for f in dataclasses.fields(FitConfig)}
    recorded = without_retired(previous.get("fit", {}))
    old = {k: json.loads(json.dumps(defaults[k])) for k in set(current["fit"]) - set(recorded)
           if defaults.get(k, dataclasses.MISSING) is not dataclasses.MISSING} | recorded
    if {**previous, "fit": old} == current:
        return
    new = current["fit"]
    fields = sorted(k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>"))
    differ = ", ".join(f"{k} ({old.get(k, '<absent>')!r} there, {new.get(k, '<absent>')!r} now)"
                       for k in fields) or "the model"
    raise ValueError(f"{run_dir} holds an unfinished run with another configuration ({differ}); "
                     "resume it with the same FitConfig and model, or use another folder")
