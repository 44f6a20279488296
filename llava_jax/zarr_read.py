"""Reading a converted checkpoint's params straight into host arrays of the target dtype, for one device.

`convert/writer.py` stores each param as an uncompressed, C-order Zarr v2 array (`params/<a.b.c>/`, a `.zarray`
and one file per chunk, one layer per chunk of a stacked param). Each chunk file is read whole into a
per-thread buffer (`direct_read.run_jobs`: parallel threads, no intermediate arrays), cast into its region of
the param, and, when the checkpoint is verified, hashed from the same bytes: the checksum costs no second read.

Where the param is stored in the target dtype and its chunks are whole row blocks of whole pages (what the
converter writes since row-block chunking), its chunk files are not read but memory-mapped side by side
(`map_array`, `file_mapping`): the param's array is the page cache's pages, adopted by the CPU device without a
copy; the jobs then only fault the pages in and hash them.

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


def chunk_regions(array: ZarrArray) -> list[tuple[str, tuple[slice, ...]]]:
    """Every chunk file of `array` and the region of the array it holds, in C order of the chunk grid."""
    counts = [math.ceil(n / c) for n, c in zip(array.shape, array.chunks, strict=True)]
    return [(os.path.join(array.directory, ".".join(map(str, index)) or "0"),
             tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, array.chunks, array.shape, strict=True)))
            for index in itertools.product(*(range(n) for n in counts))]


def chunk_jobs(array: ZarrArray, dest: np.ndarray, digests: dict | None = None,
               on_mismatch: Callable[[str, str | None], None] | None = None) -> list[ReadJob]:
    """The jobs that read every chunk file of `array` into `dest` (same shape, any dtype).

    digests: `integrity.part_digests` of the checkpoint: a chunk file that is one part is hashed from the bytes
    read, and `on_mismatch(path, owner)` is called when they hash otherwise (nothing is copied then).
    """
    jobs = []
    for path, region in chunk_regions(array):
        expected = (digests or {}).get((path, 0, array.chunk_bytes))
        jobs.append(ReadJob(array.chunk_bytes, array.chunk_bytes,
                            _chunk_reader(array, path, dest[region] if region else dest, expected, on_mismatch)))
    return jobs


def _check_size(array: ZarrArray, path: str, size: int) -> None:
    if size != array.chunk_bytes:
        raise CheckpointError(f"{path} has {size} bytes, a chunk of {array.chunks} {array.dtype} has "
                              f"{array.chunk_bytes}: the file is corrupted or truncated")


def _missing(array: ZarrArray, path: str) -> CheckpointError:
    return CheckpointError(f"{path} is missing (a chunk of {array.directory})")


def _chunk_reader(array: ZarrArray, path: str, dest: np.ndarray, expected, on_mismatch):
    def run(buffer: np.ndarray) -> None:
        nbytes = array.chunk_bytes
        try:
            with open(path, "rb", buffering=0) as f:
                _check_size(array, path, os.fstat(f.fileno()).st_size)
                read_into(f.fileno(), memoryview(buffer)[:nbytes], 0, path)
        except FileNotFoundError as e:
            raise _missing(array, path) from e
        if expected is not None and hash_bytes(memoryview(buffer)[:nbytes]) != expected[0]:
            on_mismatch(path, expected[1])
            return
        chunk = buffer[:nbytes].view(array.dtype).reshape(array.chunks)
        np.copyto(dest, chunk[tuple(slice(0, n) for n in dest.shape)], casting="unsafe")

    return run


def mapped_chunks(array: ZarrArray) -> list[tuple[str, int]] | None:
    """[(chunk file, bytes of the array it holds), ...] in order, when the chunk files side by side are the array's
    bytes and can be memory-mapped so (`file_mapping.map_files`): chunks split one axis only (size 1 on the
    axes before it, whole on the axes after), and every chunk but the last holds whole pages. None otherwise."""
    from .file_mapping import PAGE

    if not array.shape or 0 in array.shape:
        return None
    split = next((j for j, c in enumerate(array.chunks) if c > 1), len(array.shape) - 1)
    if array.chunks[split + 1:] != array.shape[split + 1:]:
        return None
    parts = [(path, math.prod(s.stop - s.start for s in region) * array.dtype.itemsize)
             for path, region in chunk_regions(array)]
    return parts if all(n % PAGE == 0 for _, n in parts[:-1]) else None


def map_array(array: ZarrArray, parts: list[tuple[str, int]]) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]] | None:
    """`array` (its stored dtype and shape) as a copy-on-write memory mapping of its chunk files `parts`
    (`mapped_chunks(array)`), and each chunk's (file, uint8 view of its bytes in the mapping); None where the
    platform cannot map. Every chunk file's size is checked first (a short file would fault when read);
    CheckpointError names it."""
    from .file_mapping import map_files

    for path, _ in parts:
        try:
            _check_size(array, path, os.path.getsize(path))
        except FileNotFoundError as e:
            raise _missing(array, path) from e
    flat = map_files(parts)
    if flat is None:
        return None
    starts = list(itertools.accumulate((n for _, n in parts), initial=0))[:-1]
    chunks = [(path, flat[s : s + n]) for (path, n), s in zip(parts, starts, strict=True)]
    return flat.view(array.dtype).reshape(array.shape), chunks


def mapped_chunk_job(view: np.ndarray, path: str, expected, on_mismatch) -> ReadJob:
    """The job for one mapped chunk (`view`: its bytes in the mapping, uint8): with `expected` (digest, owner), hash
    its bytes (`on_mismatch(path, owner)` when they hash otherwise), else touch its pages: either way its pages are
    mapped in before the load returns."""
    from .file_mapping import touch_pages

    def run(_buffer: np.ndarray) -> None:
        if expected is None:
            touch_pages(view)
        elif hash_bytes(memoryview(view)) != expected[0]:
            on_mismatch(path, expected[1])

    return ReadJob(view.nbytes, 0, run)
