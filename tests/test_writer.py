"""The streamed Orbax writer (`convert.writer`) relies on semi-internal Orbax APIs; these tests pin what we rely
on: one Zarr array directory per param, stacked params chunked one layer per chunk within the chunk budget,
and a result that a plain Orbax restore (no llava-jax code) reads back exactly."""

import json
import os

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp

from convert.writer import Piece, StreamedArray, save_params


def test_layout_and_plain_orbax_restore(tmp_path):
    rng = np.random.default_rng(0)
    layers = [rng.standard_normal((64, 48), np.float32) for _ in range(3)]
    whole = rng.standard_normal((40, 70), np.float32)
    tree = {
        "stack": {"weight": StreamedArray((3, 48, 64), np.dtype(ml_dtypes.bfloat16), tuple(
            Piece(i, lambda a=a: a.T) for i, a in enumerate(layers)))},  # transposed views, cast on the way
        "dense": StreamedArray((40, 70), np.dtype(np.float32), (Piece(None, lambda: whole),)),
    }
    chunk_bytes = 4096
    save_params(str(tmp_path / "params"), tree, chunk_bytes=chunk_bytes)
    entries = set(os.listdir(tmp_path / "params"))
    assert {"stack.weight", "dense"} <= entries and not any(e.startswith("ocdbt") or e == "d" for e in entries)
    zarray = json.loads((tmp_path / "params" / "stack.weight" / ".zarray").read_text())
    assert zarray["shape"] == [3, 48, 64] and zarray["chunks"][0] == 1  # one layer per chunk
    assert np.prod(zarray["chunks"]) * 2 <= chunk_bytes  # bf16 chunks within the budget
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(str(tmp_path / "params"))
    expected = np.stack([a.T for a in layers]).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(restored["stack"]["weight"]), expected)
    np.testing.assert_array_equal(np.asarray(restored["dense"]), whole)
