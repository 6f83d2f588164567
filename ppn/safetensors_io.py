"""Reading tensors, or some of their rows or columns, from a checkpoint's safetensors files.

A Hugging Face checkpoint directory holds its weights in one model.safetensors,
or in shards listed by a model.safetensors.index.json. `SafetensorsReader`
finds each tensor's file, checks its shape from the file's header, and reads
all of it or only chosen indices along one axis, touching only the pages that
hold them: `ppn.load_model` reads whole tensors, `ppn.load_pruned` only the kept
slices, so its peak memory follows the pruned size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CHUNK_BYTES = 4 << 20  # of a tensor's rows (counted at 4 bytes a value) mapped at a time


def _safetensor_files(directory: Path) -> dict[str, Path]:
    """Maps every tensor name to its safetensors file (single or sharded checkpoint)."""
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"corrupt safetensors index {index}: {e}") from e
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / SINGLE_FILE
    if single.exists():
        return {name: single for name in _header(single)}
    others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    hint = f" (found {', '.join(others)}: ppn reads safetensors only; re-save with safe_serialization=True)" if others else ""
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}{hint}")


def _header(file: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of one safetensors file, read from its header only."""
    from safetensors import safe_open

    if not file.exists():
        raise FileNotFoundError(f"checkpoint shard {file} listed in {INDEX_FILE} does not exist")
    try:
        with safe_open(file, framework="numpy") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error type for bad headers
        raise ValueError(f"cannot read safetensors file {file}: {e} (truncated or corrupt?)") from e


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array on a 64-byte boundary, which JAX on CPU adopts without a copy."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(size + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + size].view(dtype).reshape(shape)


def _runs(indices: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive indices: (start, stop, position of start in `indices`)."""
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    firsts = np.concatenate([[0], breaks]).astype(int)
    lasts = np.concatenate([breaks - 1, [indices.size - 1]]).astype(int)
    return [(int(indices[a]), int(indices[b]) + 1, int(a)) for a, b in zip(firsts, lasts)] if indices.size else []


class SafetensorsReader:
    """Reads named tensors, or some of their rows or columns, from a checkpoint's
    safetensors files, as numpy arrays of the file's dtype.

    Files are memory-mapped, but a mapping is held only while one chunk of at
    most `CHUNK_BYTES` of the file is read and then dropped: pages a process has
    touched in a mapping count in its resident memory, so holding the mapping
    would add a second copy of everything read to the peak.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.files = _safetensor_files(directory)
        self._headers: dict[Path, dict[str, tuple[int, ...]]] = {}

    def shape(self, name: str) -> tuple[int, ...]:
        file = self.files[name]
        if file not in self._headers:
            self._headers[file] = _header(file)
        return self._headers[file][name]

    def check_shape(self, name: str, expected_shape: tuple[int, ...]) -> None:
        """Raises ValueError unless tensor `name` has `expected_shape` (its header alone is read)."""
        if self.shape(name) != tuple(expected_shape):
            raise ValueError(f"tensor {name!r} in {self.files[name]} has shape {self.shape(name)}, "
                             f"expected {tuple(expected_shape)}")

    def read(self, name: str, expected_shape: tuple[int, ...], axis: int = 0,
             indices: np.ndarray | None = None) -> np.ndarray:
        """Tensor `name`, or only `indices` along `axis` (0 or 1), after checking its full shape.

        Each run of consecutive indices is read as one slice, chunk by chunk of
        the file's rows: of the file, only the kept rows (axis 0) or the rows
        holding the kept columns (axis 1) are touched, at most `CHUNK_BYTES` of
        them at a time, and only the result is allocated.

        Returns:
            An array of `expected_shape` with axis `axis` cut to `len(indices)`.
        """
        from safetensors import safe_open

        file = self.files.get(name)
        if file is None:
            raise KeyError(f"checkpoint {self.directory} is missing tensor {name!r}")
        self.check_shape(name, expected_shape)
        shape = self.shape(name)
        runs = [(0, shape[axis], 0)] if indices is None else _runs(np.asarray(indices))
        # (source, destination) index pairs: kept rows, or all rows and the kept columns
        rows = runs if axis == 0 else [(0, shape[0], 0)]
        cols = [((), ())] if axis == 0 else [((slice(a, b),), (slice(at, at + b - a),)) for a, b, at in runs]
        out_shape = shape[:axis] + (sum(b - a for a, b, _ in runs),) + shape[axis + 1:]
        rows_per_chunk = max(1, CHUNK_BYTES // max(1, 4 * int(np.prod(shape[1:]))))
        out = np.empty(out_shape, np.float32) if 0 in out_shape else None
        try:
            for c0 in range(0, shape[0], rows_per_chunk):
                c1 = min(shape[0], c0 + rows_per_chunk)
                reads = [(slice(max(a, c0), min(b, c1)), slice(at + max(a, c0) - a, at + min(b, c1) - a))
                         for a, b, at in rows if a < c1 and b > c0]
                if not reads:
                    continue
                with safe_open(file, framework="numpy") as f:  # mapped for this chunk only
                    for src_rows, dst_rows in reads:
                        for src_cols, dst_cols in cols:
                            piece = self._slice(f, name, (src_rows,) + src_cols)
                            if out is None:
                                out = _aligned_empty(out_shape, piece.dtype)
                            out[(dst_rows,) + dst_cols] = piece
        except Exception as e:
            raise ValueError(f"cannot read tensor {name!r} from {file}: {e} (truncated or corrupt?)") from e
        return out

    @staticmethod
    def _slice(f, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """`index` of tensor `name` of the open file `f`: the only place tensor data is read."""
        return f.get_slice(name)[index]
