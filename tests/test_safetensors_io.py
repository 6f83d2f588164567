"""Reading safetensors files: whole tensors and row or column subsets, chunk by chunk."""

import numpy as np

import ppn.safetensors_io
from ppn.safetensors_io import SINGLE_FILE, SafetensorsReader


def test_reader_maps_big_tensors_chunk_by_chunk(tmp_path, monkeypatch):
    """Runs that cross chunk boundaries, along both axes, come back whole and in order."""
    from safetensors.numpy import save_file

    monkeypatch.setattr(ppn.safetensors_io, "CHUNK_BYTES", 4 * 3 * 7)  # 3 rows of 7 float32 a chunk
    x = np.arange(20 * 7, dtype=np.float32).reshape(20, 7)
    save_file({"x": x}, str(tmp_path / SINGLE_FILE))
    reader = SafetensorsReader(tmp_path)
    rows, cols = np.array([0, 1, 2, 3, 4, 9, 11, 12, 13, 19]), np.array([0, 2, 3, 4, 6])
    np.testing.assert_array_equal(reader.read("x", (20, 7)), x)
    np.testing.assert_array_equal(reader.read("x", (20, 7), 0, rows), x[rows])
    np.testing.assert_array_equal(reader.read("x", (20, 7), 1, cols), x[:, cols])
