"""Reading safetensors tensors straight into preallocated (stacked) param arrays of the target dtype.

Each source tensor is read from its file in panels of rows (`os.preadv` into a small per-thread buffer, not a
memory map: the file's pages never count in this process's memory, and there are no page faults) and each
panel is cast into its place in the param array (`half_cast.cast_into`; params keep torch's layouts, so a panel
is a run of the param's rows). Tensors are spread over threads: reads and casts release the GIL.

Memory: the param arrays (the model, in its target dtype) plus one panel buffer per thread. Nothing else:
no per-tensor copy, no per-layer array, no second copy of a stacked param.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .half_cast import cast_into
from .integrity import new_hasher
from .safetensors_io import TensorRef

PANEL_BYTES = 8 << 20  # bytes read at once (whole rows; at least one row)
MAX_THREADS = 8


def read_into(fd: int, view: memoryview, offset: int, path: str) -> None:
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            from .errors import CheckpointError

            raise CheckpointError(f"{path}: the file ended at byte {offset} inside a tensor (truncated while loading?)")
        view, offset = view[n:], offset + n


def fill(dest: np.ndarray | None, ref: TensorRef, buffer: np.ndarray, hasher=None) -> None:
    """Read tensor `ref` into `dest` (its slot of the param, in param layout and dtype: the tensor's elements in
    order), panel by panel through `buffer` (uint8, at least one panel: `panel_bytes(ref)`); every byte read
    also goes to `hasher`. dest None: only hash."""
    rows = ref.shape[0] if ref.shape else 1
    row_bytes = max(1, math.prod(ref.shape[1:]) * ref.dtype.itemsize) if ref.shape else ref.nbytes
    step = panel_rows(ref)
    flat = None if dest is None else dest.reshape(rows, -1)
    with open(ref.file, "rb", buffering=0) as f:
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            nbytes = (r1 - r0) * row_bytes
            read_into(f.fileno(), memoryview(buffer)[:nbytes], ref.start + r0 * row_bytes, ref.file)
            if hasher is not None:
                hasher.update(memoryview(buffer)[:nbytes])
            if flat is not None:
                cast_into(flat[r0:r1], buffer[:nbytes].view(ref.dtype).reshape(r1 - r0, -1))


def panel_rows(ref: TensorRef) -> int:
    """Rows of `ref` read at once."""
    if not ref.shape:
        return 1
    return max(1, PANEL_BYTES // max(1, math.prod(ref.shape[1:]) * ref.dtype.itemsize))


def panel_bytes(ref: TensorRef) -> int:
    if not ref.shape:
        return ref.nbytes
    return min(ref.shape[0], panel_rows(ref)) * math.prod(ref.shape[1:]) * ref.dtype.itemsize


@dataclass(frozen=True)
class ReadJob:
    """One read into param arrays: `run(buffer)` reads through `buffer` (uint8, at least `buffer_bytes`)."""

    nbytes: int  # bytes read from disk: the largest jobs go first, and progress counts them
    buffer_bytes: int
    run: Callable[[np.ndarray], None]


def tensor_job(dest: np.ndarray | None, ref: TensorRef, expected=None,
               on_mismatch: Callable[[str, str | None], None] | None = None) -> ReadJob:
    """The job that `fill`s safetensors tensor `ref` into `dest` (None: only hashes it). expected: the tensor's
    (digest, owner) in the checkpoint's manifest: its bytes are hashed as they are read, and
    `on_mismatch(file, owner)` is called when they hash otherwise."""

    def run(buffer: np.ndarray) -> None:
        hasher = None if expected is None else new_hasher()
        fill(dest, ref, buffer, hasher)
        if hasher is not None and hasher.hexdigest() != expected[0]:
            on_mismatch(ref.file, expected[1])

    return ReadJob(ref.nbytes, panel_bytes(ref), run)


PROGRESS_MIN_BYTES = 256 << 20  # smaller loads take under a second: no bar


def _progress_bar(total: int) -> Callable[[int], None] | None:
    """A tqdm bar over the bytes read (on stderr; only for loads big enough to wait for), fed from every thread."""
    if total < PROGRESS_MIN_BYTES:
        return None
    from tqdm.auto import tqdm

    bar, lock = tqdm(total=total, unit="B", unit_scale=True, desc="Loading weights", leave=False), threading.Lock()

    def advance(nbytes: int) -> None:
        with lock:
            bar.update(nbytes)
            if bar.n >= bar.total:
                bar.close()

    return advance


def run_jobs(jobs: list[ReadJob], threads: int | None = None, progress: Callable[[int], None] | None = None) -> None:
    """Run every job, largest first, on `threads` threads (default: one per CPU, at most `MAX_THREADS`), each
    thread with one buffer; `progress(nbytes)` after each job (default: a progress bar for big loads). The first error is raised once all have ended."""
    threads = threads or min(MAX_THREADS, os.cpu_count() or 1)
    jobs = sorted(jobs, key=lambda job: -job.nbytes)  # big ones first: the threads finish together
    if progress is None:
        progress = _progress_bar(sum(job.nbytes for job in jobs))
    size = max((job.buffer_bytes for job in jobs), default=0)
    local = threading.local()

    def run(job: ReadJob) -> None:
        if getattr(local, "buffer", None) is None:
            local.buffer = np.empty(size, np.uint8)
        job.run(local.buffer)
        if progress is not None:
            progress(job.nbytes)

    if threads <= 1:
        for job in jobs:
            run(job)
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(run, job) for job in jobs]:
            future.result()


def adopt_host_arrays(tree: dict) -> dict:
    """Host arrays -> device arrays (the default device) in place, one leaf at a time, each host array dropped as
    soon as it is placed: on CPU `device_put` adopts a 64-byte aligned numpy buffer without copying, elsewhere at
    most one param exists twice. (`tree_map(jnp.asarray, ...)` would hold two copies of every weight.)"""
    import jax

    for key, value in tree.items():
        tree[key] = adopt_host_arrays(value) if isinstance(value, dict) else jax.device_put(value)
    return tree
