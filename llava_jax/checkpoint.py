"""Checkpoint directories: what makes up a source checkpoint, and llava-jax's converted (Orbax) format.

Source checkpoints are safetensors in the llava-hf or the original LLaVA layout (`open_source`); original
LLaVA-1.5 checkpoints hold no vision tower and name a separate CLIP checkpoint.

A converted directory, written by `llava-jax-convert` (`convert/`), needs nothing else to load:

    llava_jax_config.json   the normalized `LlavaConfig`; its presence marks a converted directory
    params/                 an Orbax PyTree checkpoint of the param tree, exactly the tree `Llava.init` makes
    conversion.json         provenance: source, layouts, dtypes, which tensors were used and skipped
    config.json, tokenizer*, chat_template*, preprocessor_config.json, ...   copied from the source

Stacked layers without the stacked array in memory. The param tree stacks decoder and vision layers on a
leading axis (`nn.scan`); one stacked MLP weight of a 34B model is 60 x 7168 x 20480 bf16 = 17.6 GB, and a
plain Orbax save needs it whole in memory (twice: Orbax's NumpyHandler copies host arrays before writing).
Instead, each param is a `StreamedArray` leaf: shape, dtype and a list of pieces (one per layer slot, or one
for the whole array) produced only when written. A small Orbax `TypeHandler` (the supported extension point
for new leaf types) asks Orbax for the array's TensorStore spec (`type_handlers.get_json_tspec_write`),
with the stacked axis chunked one layer per chunk (`SaveArgs.shard_axes=(0,)`) and chunks of at most
`CHUNK_BYTES`, then writes the pieces one after another, chunk by chunk, casting each chunk on the way; a
few chunk writes stay in flight. Orbax writes the tree metadata itself, with the standard `np.ndarray`
type, so the result is an ordinary Orbax checkpoint of the stacked arrays: any Orbax restore reads it,
straight onto a device mesh with per-leaf shardings, with no stacking step and no per-layer Python work
at load time. Peak memory while writing: the largest source tensor (memory-mapped, not copied) plus a fixed
~0.3 GB (chunks in flight, TensorStore and allocator overhead).

Rejected: per-layer leaves stacked at load time, written with `orbax.checkpoint.experimental.v1.partial`
(save/finalize). Each partial save re-reads the previous state: 20 saves took 0.04 s each, 200 saves 47 s
(0.23 s each), 800 did not finish in 5 minutes; a 34B model has ~900 per-layer tensors. Saving groups of
layers cuts the calls but still needs a stacking pass (model + one stacked param in memory) at every load.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import math
import os
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import ConfigError, LlavaConfig, config_from_dict, is_original_layout
from .safetensors_io import CheckpointError, checkpoint_files, iter_tensors
from .weights import LAYOUT_SIGNATURES, canonical_name, map_name

CONFIG_FILE = "llava_jax_config.json"
PARAMS_DIR = "params"
INFO_FILE = "conversion.json"
# Files copied verbatim from a source checkpoint (tokenizer, processor, generation defaults, its config).
SUPPORT_FILES = (
    "config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template*", "preprocessor_config.json", "processor_config.json",
    "generation_config.json",
)
CHUNK_BYTES = 16 << 20  # on-disk chunk size target: bounds the writer's buffers, lets loads read in parallel
RESTORE_CONCURRENT_GB = 1  # restore read-ahead: host memory beyond the params themselves


# ---------------------------------------------------------------- source checkpoints (safetensors)


@dataclass(frozen=True)
class SourceCheckpoint:
    """A safetensors checkpoint: its config and the directories whose tensors make up the model."""

    path: str
    config: LlavaConfig
    sources: tuple[tuple[str, str], ...]  # (directory, weights layout), e.g. ((ckpt, "original"), (clip, "clip"))


def is_converted(path: str) -> bool:
    """True for a directory written by the converter (it holds `llava_jax_config.json`)."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def detect_layout(names, config: LlavaConfig, layout: str = "auto") -> str:
    """The weights layout ("hf" or "original") of a checkpoint's tensor names, checked against its config."""
    if layout != "auto":
        if layout not in LAYOUT_SIGNATURES:
            raise CheckpointError(f"layout {layout!r} is not supported (supported: auto, {', '.join(LAYOUT_SIGNATURES)})")
        return layout
    found = sorted({lay for lay, pattern in LAYOUT_SIGNATURES.items() for n in names if re.match(pattern, n)})
    if not found or found == [config.layout]:
        return config.layout
    if len(found) > 1:
        raise CheckpointError("tensor names of both the hf and the original layout: cannot tell the layout "
                              "(pass --layout)")
    raise CheckpointError(
        f"the config is a {config.layout}-layout config but the "
        f"tensor names are {found[0]}-layout names (pass --layout {found[0]} to read them anyway)"
    )


def _has_safetensors(path: str) -> bool:
    return os.path.isdir(path) and any(f.endswith(".safetensors") for f in os.listdir(path))


def open_source(path: str, layout: str = "auto", vision_tower: str | None = None) -> SourceCheckpoint:
    """Config and tensor sources of a llava-hf or original LLaVA safetensors checkpoint directory.

    vision_tower: a CLIP safetensors checkpoint directory, for original LLaVA-1.5 checkpoints (which hold no
    vision tower); without it, the config's `mm_vision_tower` is used when it is a local directory.
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a checkpoint directory")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"no config.json in {path}")
    with open(config_path) as f:
        raw = json.load(f)
    name = os.path.basename(os.path.normpath(path))
    if vision_tower is not None:
        if not is_original_layout(raw):
            raise CheckpointError("--vision-tower is for original LLaVA checkpoints (mm_vision_tower in config.json); "
                                  f"{path} is a llava-hf checkpoint, which holds its vision tower")
        if not os.path.isfile(os.path.join(vision_tower, "config.json")):
            raise CheckpointError(f"vision tower {vision_tower} is not a CLIP checkpoint directory (no config.json)")
        raw = {**raw, "mm_vision_tower": os.path.abspath(vision_tower)}
    config = config_from_dict(raw, name=name, base_dir=path)
    checkpoint_files(path)  # refuses pickles and reports missing shards before anything else
    names = [ref.name for ref in iter_tensors(path)]
    layout = detect_layout(names, config, layout)
    for n in names:
        map_name(n, layout, config)  # an unknown name is an error before anything else
    sources = [(path, layout)]
    has_vision = any((canonical_name(n, layout) or "").startswith("vision.") for n in names)
    if vision_tower is not None:
        if has_vision:
            raise CheckpointError(f"{path} already holds a vision tower; drop --vision-tower")
        sources.append((vision_tower, "clip"))
    elif not has_vision:
        tower = (raw.get("mm_vision_tower") or raw.get("vision_tower")) if is_original_layout(raw) else None
        local = [d for d in (tower, os.path.join(path, tower)) if d and _has_safetensors(d)] if tower else []
        if not local:
            raise CheckpointError(
                f"{path} holds no vision tower tensors (original LLaVA-1.5 checkpoints refer to a separate CLIP "
                f"checkpoint, here mm_vision_tower={tower!r}): pass the CLIP safetensors checkpoint directory "
                "with --vision-tower DIR (llava-jax-convert), or set mm_vision_tower in config.json to that directory"
            )
        sources.append((local[0], "clip"))
    return SourceCheckpoint(path, config, tuple(sources))


def copy_support_files(src: str, dest: str, only=SUPPORT_FILES) -> list[str]:
    """Copy the tokenizer, processor and config files present in `src` to `dest`; returns their names."""
    copied = []
    for fname in sorted(os.listdir(src)):
        if any(fnmatch.fnmatchcase(fname, pattern) for pattern in only) and os.path.isfile(
                os.path.join(src, fname)):
            shutil.copy2(os.path.join(src, fname), os.path.join(dest, fname))
            copied.append(fname)
    return copied


def write_config(dest: str, config: LlavaConfig) -> None:
    with open(os.path.join(dest, CONFIG_FILE), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------- streaming Orbax save


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
        store = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
        chunk = tuple(store.chunk_layout.write_chunk.shape)
        for piece in value.pieces:
            if piece.layer is None:
                dest, piece_chunk = store, chunk
            else:
                assert chunk[0] == 1, chunk
                dest, piece_chunk = store[piece.layer], chunk[1:]
            data = piece.read()
            regions = [tuple(slice(s, s + c) for s, c in zip(starts, piece_chunk, strict=True))
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
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)
    try:
        with ocp.Checkpointer(handler) as checkpointer:
            checkpointer.save(os.path.abspath(directory), args=ocp.args.PyTreeSave(tree))
    except BaseException:  # e.g. KeyboardInterrupt: stop the writer thread before the caller cleans up
        cancel.set()
        idle.wait(timeout=60)
        raise


# ---------------------------------------------------------------- restore


def flatten(tree) -> dict[str, Any]:
    """{"a/b/c": leaf} of a nested param dict."""
    import jax

    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def stored_params(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{param path: (shape, dtype)} of a converted directory's params, from Orbax's metadata (no data read)."""
    import orbax.checkpoint as ocp

    params_dir = os.path.abspath(os.path.join(path, PARAMS_DIR))
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{path} has {CONFIG_FILE} but no {PARAMS_DIR}/: an incomplete converted checkpoint "
                              "(convert it again)")
    with ocp.PyTreeCheckpointer() as checkpointer:
        meta = checkpointer.metadata(params_dir).item_metadata
    if meta is None:
        raise CheckpointError(f"{params_dir} is not a readable Orbax checkpoint")
    tree = getattr(meta, "tree", meta)
    return {k: (tuple(m.shape), np.dtype(m.dtype)) for k, m in flatten(tree).items()}


def restore_params(path: str, abstract, shardings=None, concurrent_gb: int = RESTORE_CONCURRENT_GB) -> dict:
    """Restore a converted directory's param tree onto devices in one Orbax call.

    abstract: the model's param tree of `jax.ShapeDtypeStruct`s (`abstract_params(config, dtype)`); params
    are cast to its dtypes as they are read. shardings: None (the default device) or a tree like `abstract`
    of `jax.sharding.Sharding`s, e.g. `NamedSharding`s of a mesh: each host then reads only its shards.
    concurrent_gb: host bytes read ahead of the device copies (at least the largest param): bounds the
    host memory beyond the params themselves.
    """
    import jax
    import orbax.checkpoint as ocp

    stored = stored_params(path)
    want = {k: tuple(a.shape) for k, a in flatten(abstract).items()}
    have = {k: shape for k, (shape, _) in stored.items()}
    if have != want:
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {extra[:5]}" if extra else "",
                 "shapes differ: " + ", ".join(f"{k} {have[k]} != {want[k]}" for k in wrong[:5]) if wrong else ""]
        raise CheckpointError(f"{path}: the stored params do not fit its config ({'; '.join(p for p in parts if p)})")
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, abstract)
    args = jax.tree_util.tree_map(
        lambda a, s: ocp.ArrayRestoreArgs(sharding=s, dtype=a.dtype, global_shape=tuple(a.shape)), abstract, shardings)
    # Orbax refuses a single read larger than its in-flight limit: make room for the largest param.
    largest = max(math.prod(a.shape) * max(np.dtype(a.dtype).itemsize, stored[k][1].itemsize)
                  for k, a in flatten(abstract).items())
    handler = ocp.PyTreeCheckpointHandler(restore_concurrent_gb=max(concurrent_gb, largest // 10**9 + 1))
    with ocp.Checkpointer(handler) as checkpointer:
        return checkpointer.restore(os.path.abspath(os.path.join(path, PARAMS_DIR)),
                                    args=ocp.args.PyTreeRestore(restore_args=args))


__all__ = [
    "CHUNK_BYTES", "CONFIG_FILE", "INFO_FILE", "PARAMS_DIR", "SUPPORT_FILES", "Piece", "SourceCheckpoint",
    "StreamedArray", "WriteCancelled", "copy_support_files", "detect_layout", "is_converted", "open_source",
    "flatten", "restore_params", "save_params", "stored_params", "write_config",
]
