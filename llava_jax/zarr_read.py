"""Reading a converted checkpoint's params straight into host arrays of the target dtype, for one device.

`convert/writer.py` stores each param as an uncompressed, C-order Zarr v2 array (`params/<a.b.c>/`, a `.zarray`
and one file per chunk, one layer per chunk of a stacked param). Each chunk file is read whole into a
per-thread buffer (`direct_read.run_jobs`: parallel threads, no intermediate arrays), cast into its region of
the param, and, when the checkpoint is verified, hashed from the same bytes: the checksum costs no second read.

Only that plain layout is read here (`open_array` returns None for anything else: compression, filters,
Fortran order, another dtype); `checkpoint.restore_params` then uses Orbax, as it does for a mesh (where each
host reads only its shards).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .direct_read import ReadJob, read_into
from .errors import CheckpointError
from .integrity import hash_bytes

# Zarr v2 dtype strings that TensorStore writes for the dtypes a conversion stores.
ZARR_DTYPES = {"<f4": np.dtype(np.float32), "<f2": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
               "<f8": np.dtype(np.float64)}


@dataclass(frozen=True)
class ZarrArray:
    """One param's Zarr array: its directory, shape, chunk shape and stored dtype."""

    directory: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: np.dtype

    @property
    def chunk_bytes(self) -> int:
        return math.prod(self.chunks) * self.dtype.itemsize


def open_array(directory: str) -> ZarrArray | None:
    """The metadata of the uncompressed, C-order Zarr v2 array in `directory`; None for any other kind."""
    try:
        with open(os.path.join(directory, ".zarray")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    plain = (isinstance(meta, dict) and meta.get("zarr_format") == 2 and meta.get("compressor") is None
             and not meta.get("filters") and meta.get("order") == "C"
             and meta.get("dimension_separator", ".") == "." and meta.get("dtype") in ZARR_DTYPES
             and isinstance(meta.get("shape"), list) and isinstance(meta.get("chunks"), list)
             and len(meta["shape"]) == len(meta["chunks"]) and all(c > 0 for c in meta["chunks"]))
    if not plain:
        return None
    return ZarrArray(directory, tuple(meta["shape"]), tuple(meta["chunks"]), ZARR_DTYPES[meta["dtype"]])


def chunk_jobs(array: ZarrArray, dest: np.ndarray, digests: dict | None = None,
               on_mismatch: Callable[[str, str | None], None] | None = None) -> list[ReadJob]:
    """The jobs that read every chunk file of `array` into `dest` (same shape, any dtype).

    digests: `integrity.part_digests` of the checkpoint: a chunk file that is one part is hashed from the bytes
    read, and `on_mismatch(path, owner)` is called when they hash otherwise (nothing is copied then).
    """
    counts = [math.ceil(n / c) for n, c in zip(array.shape, array.chunks, strict=True)]
    jobs = []
    for index in itertools.product(*(range(n) for n in counts)):
        path = os.path.join(array.directory, ".".join(map(str, index)) or "0")
        region = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, array.chunks, array.shape,
                                                                             strict=True))
        expected = (digests or {}).get((path, 0, array.chunk_bytes))
        jobs.append(ReadJob(array.chunk_bytes, array.chunk_bytes,
                            _chunk_reader(array, path, dest[region] if region else dest, expected, on_mismatch)))
    return jobs


def _chunk_reader(array: ZarrArray, path: str, dest: np.ndarray, expected, on_mismatch):
    def run(buffer: np.ndarray) -> None:
        nbytes = array.chunk_bytes
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if size != nbytes:
                    raise CheckpointError(f"{path} has {size} bytes, a chunk of {array.chunks} {array.dtype} has "
                                          f"{nbytes}: the file is corrupted or truncated")
                read_into(f.fileno(), memoryview(buffer)[:nbytes], 0, path)
        except FileNotFoundError as e:
            raise CheckpointError(f"{path} is missing (a chunk of {array.directory})") from e
        if expected is not None and hash_bytes(memoryview(buffer)[:nbytes]) != expected[0]:
            on_mismatch(path, expected[1])
            return
        chunk = buffer[:nbytes].view(array.dtype).reshape(array.chunks)
        np.copyto(dest, chunk[tuple(slice(0, n) for n in dest.shape)], casting="unsafe")

    return run
