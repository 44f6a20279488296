"""The streamed Orbax writer: a param tree whose stacked arrays are never whole in memory.

The param tree stacks decoder and vision layers on a leading axis (`nn.scan`); one stacked MLP weight of a
34B model is 60 x 7168 x 20480 bf16 = 17.6 GB, and a plain Orbax save needs it whole in memory (twice:
Orbax's NumpyHandler copies host arrays before writing). Instead, each param is a `StreamedArray` leaf:
shape, dtype and a list of pieces (one per layer slot, or one for the whole array) produced only when
written. A small Orbax `TypeHandler` (the supported extension point for new leaf types) asks Orbax for the
array's TensorStore spec (`type_handlers.get_json_tspec_write`), with the stacked axis chunked one layer per
chunk and, within a layer, chunks of whole rows of at most `CHUNK_BYTES` (`row_block_chunks`: a loader on one
device maps such chunk files into memory side by side instead of reading them), then writes the pieces one after
another, chunk by chunk, casting each chunk on the way; a few chunk writes stay in flight. Orbax writes the
tree metadata itself, with the standard `np.ndarray` type, so the result is an ordinary Orbax checkpoint of
the stacked arrays: any Orbax restore reads it, straight onto a device mesh with per-leaf shardings, with no
stacking step and no per-layer Python work at load time. Peak memory while writing: the largest source
tensor (memory-mapped, not copied) plus a fixed ~0.3 GB (chunks in flight, TensorStore and allocator
overhead).

Storage: one Zarr directory per param (`params/<a.b.c>/`, chunk files inside), not Orbax's default OCDBT
database, so that every file on disk belongs to exactly one param and a checksum mismatch names the tensor
(`llava_jax.integrity`).

Semi-internal Orbax APIs used here (stable across Orbax 0.11-0.12, not documented as public):
`type_handlers.get_json_tspec_write`, `ParamInfo.await_path_creation` / `is_ocdbt_checkpoint` /
`ts_context`, and `future.CommitFutureAwaitingContractedSignals`. `tests/test_writer.py` pins what we rely
on: the on-disk layout (one Zarr array per param, one layer per chunk), and that a plain Orbax restore reads
the result.

Rejected: per-layer leaves stacked at load time, written with `orbax.checkpoint.experimental.v1.partial`
(save/finalize). Each partial save re-reads the previous state: 20 saves took 0.04 s each, 200 saves 47 s
(0.23 s each), 800 did not finish in 5 minutes; a 34B model has ~900 per-layer tensors. Saving groups of
layers cuts the calls but still needs a stacking pass (model + one stacked param in memory) at every load.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llava_jax.file_mapping import PAGE

CHUNK_BYTES = 16 << 20  # on-disk chunk size target: bounds the writer's buffers, lets loads read in parallel


@dataclass(frozen=True)
class Piece:
    """Part of a `StreamedArray`: the slot on the stacked axis (None: the whole array), and a function that
    returns the values in param layout (it may be lazy, e.g. a transposed view of a memory map)."""

    layer: int | None
    read: Callable[[], np.ndarray]
    nbytes: int = 0  # bytes read from the source, for progress reports


@dataclass(eq=False)
class StreamedArray:
    """A param leaf written piece by piece by `save_params`, never whole in memory."""

    shape: tuple[int, ...]
    dtype: np.dtype
    pieces: tuple[Piece, ...] = field(default=())

    @property
    def stacked(self) -> bool:
        return any(p.layer is not None for p in self.pieces)


def row_block_chunks(shape: tuple[int, ...], itemsize: int, chunk_bytes: int, stacked: bool) -> tuple[int, ...]:
    """The chunk shape of a param: one layer per chunk when `stacked`, and within it blocks of whole rows (full
    trailing axes) of at most `chunk_bytes`, a whole number of pages where that fits the budget. Chunk files
    side by side are then the param's bytes in C order, which a load maps into memory instead of reading
    (`llava_jax.zarr_read.map_array`)."""
    lead, rest = ((1,), shape[1:]) if stacked else ((), shape)
    if not rest:
        return lead
    row_bytes = max(1, math.prod(rest[1:]) * itemsize)
    rows = max(1, chunk_bytes // row_bytes)
    page_rows = PAGE // math.gcd(row_bytes, PAGE)  # rows whose bytes are a whole number of pages
    if rows < rest[0] and page_rows <= rows:
        rows -= rows % page_rows
    return (*lead, min(rows, rest[0]), *rest[1:])


class WriteCancelled(RuntimeError):
    """`save_params` was cancelled (the `cancel` event was set) before it finished."""


class _WriteWindow:
    """Chunk writes in flight, oldest first; at most `limit` bytes of them (plus the one being added), so
    that reading and casting the next chunk overlaps writing the previous ones. Progress is reported when a
    piece's last chunk is committed."""

    def __init__(self, limit: int):
        self.limit, self.bytes, self.pending = limit, 0, []

    async def add(self, write, nbytes: int, done=None) -> None:
        self.pending.append((write, nbytes, done))
        self.bytes += nbytes
        while self.bytes > self.limit:
            await self._pop()

    async def drain(self) -> None:
        while self.pending:
            await self._pop()

    async def abandon(self) -> None:
        """Wait for the writes in flight without reporting them (after a failure: nothing may still be
        writing when the caller removes the directory)."""
        for write, _, _ in self.pending:
            try:
                await write
            except Exception:  # the first error is the one being raised
                pass
        self.pending.clear()

    async def _pop(self) -> None:
        write, nbytes, done = self.pending.pop(0)
        await write
        self.bytes -= nbytes
        if done is not None:
            done()


def _streamed_handler(progress, cancel: threading.Event, idle: threading.Event, chunk_bytes: int):
    """An Orbax TypeHandler for `StreamedArray` leaves, stored as standard `np.ndarray` leaves."""
    import orbax.checkpoint as ocp
    import tensorstore as ts
    from orbax.checkpoint import future as ocp_future

    async def write_leaf(value: StreamedArray, info, window: _WriteWindow) -> None:
        await info.await_path_creation()
        arg = ocp.type_handlers.SaveArgs(chunk_byte_size=chunk_bytes, shard_axes=(0,) if value.stacked else ())
        spec = ocp.type_handlers.get_json_tspec_write(
            info, use_ocdbt=info.is_ocdbt_checkpoint, global_shape=value.shape, local_shape=value.shape,
            dtype=value.dtype, process_index=0 if info.is_ocdbt_checkpoint else None, arg=arg,
        )
        spec["metadata"]["chunks"] = list(row_block_chunks(value.shape, np.dtype(value.dtype).itemsize, chunk_bytes,
                                                           value.stacked))
        store = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
        chunk = tuple(store.chunk_layout.write_chunk.shape)
        for piece in value.pieces:
            if piece.layer is None:
                dest, piece_chunk = store, chunk
            else:
                assert chunk[0] == 1, chunk
                dest, piece_chunk = store[piece.layer], chunk[1:]
            data = piece.read()
            regions = [tuple(slice(s, min(s + c, n)) for s, c, n in zip(starts, piece_chunk, data.shape, strict=True))
                       for starts in itertools.product(*(range(0, n, c) for n, c in zip(data.shape, piece_chunk,
                                                                                         strict=True)))]
            for i, region in enumerate(regions):  # chunk by chunk: never a cast copy of the whole piece
                if cancel.is_set():
                    raise WriteCancelled("cancelled")
                block = data[region]
                if block.dtype != value.dtype:
                    block = block.astype(value.dtype)  # keeps the view's memory order: no transposing copy
                # TensorStore copies strided (e.g. transposed) views into the chunk ~4x faster than numpy.
                write = dest[region].write(block, can_reference_source_data_indefinitely=True)
                done = (lambda p=piece: progress(p)) if progress is not None and i == len(regions) - 1 else None
                await window.add(write, block.nbytes, done)
            del data

    class StreamedArrayHandler(ocp.type_handlers.NumpyHandler):
        async def serialize(self, values, infos, args=None):
            async def write_all():
                idle.clear()
                window = _WriteWindow(4 * chunk_bytes)
                try:
                    for value, info in zip(values, infos, strict=True):  # one leaf at a time: bounded memory
                        await write_leaf(value, info, window)
                    await window.drain()
                except BaseException:
                    await window.abandon()
                    raise
                finally:
                    idle.set()

            return [ocp_future.CommitFutureAwaitingContractedSignals(write_all(), name="llava_jax_streamed")]

    return StreamedArrayHandler()


def save_params(directory: str, tree: dict, *, progress: Callable[[Piece], Any] | None = None,
                cancel: threading.Event | None = None, chunk_bytes: int = CHUNK_BYTES) -> None:
    """Write a param tree whose leaves are `StreamedArray`s (or numpy arrays) as an Orbax checkpoint.

    `progress(piece)` is called after each piece is written (from Orbax's writer thread). Setting `cancel`
    makes the writer stop at the next chunk with `WriteCancelled`.
    """
    import jax
    import orbax.checkpoint as ocp

    cancel = cancel or threading.Event()
    idle = threading.Event()
    idle.set()
    registry = ocp.type_handlers.create_type_handler_registry(
        (StreamedArray, _streamed_handler(progress, cancel, idle, chunk_bytes)),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (jax.Array, ocp.type_handlers.ArrayHandler()),
    )
    # use_ocdbt=False: one Zarr directory per param, so that each file belongs to one tensor (see above).
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False, use_ocdbt=False)
    try:
        with ocp.Checkpointer(handler) as checkpointer:
            checkpointer.save(os.path.abspath(directory), args=ocp.args.PyTreeSave(tree))
    except BaseException:  # e.g. KeyboardInterrupt: stop the writer thread before the caller cleans up
        cancel.set()
        idle.wait(timeout=60)
        raise
