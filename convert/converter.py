"""Streaming conversion: a llava-hf or original LLaVA safetensors checkpoint -> a llava-jax Orbax directory.

1. Plan: read the config and every safetensors header, map each tensor name to its parameter through the
   weight table (`llava_jax.weights`), check shapes against the model's `init` tree, and check that every
   parameter and layer slot is covered and no tensor is left over (except the known-unused ones). Nothing
   is written and no data is read before the whole checkpoint checks out.
2. Write: each parameter is a `StreamedArray` whose pieces are the source tensors, memory-mapped, transposed
   as views, cast chunk by chunk while Orbax writes them (`convert.writer.save_params`). Peak memory
   is about the largest tensor plus a chunk, never the model or a stacked parameter.
3. Finish: normalized config, tokenizer/processor files and `conversion.json`; verify the written tree
   (every param, shapes equal to `init`'s, dtypes); write `checksums.json` (every file, each chunk file
   named by its param: `llava_jax.integrity`); rename the temporary directory to OUT.

Before writing, leftovers of earlier interrupted conversions to the same OUT are removed (`atomic.clean_stale`).
"""

from __future__ import annotations

import errno
import fnmatch
import json
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from llava_jax.checkpoint import (
    CONFIG_FILE,
    INFO_FILE,
    PARAMS_DIR,
    SUPPORT_FILES,
    SourceCheckpoint,
    flatten,
    is_conversion_entry,
    open_source,
    stored_params,
)
from llava_jax.config import LlavaConfig
from llava_jax.dtypes import resolve_dtype
from llava_jax.errors import CheckpointError, first_line
from llava_jax.integrity import MANIFEST_FILE, write_manifest
from llava_jax.model import abstract_params
from llava_jax.safetensors_io import TensorRef, iter_tensors
from llava_jax.weights import ParamAssembly, Placement, transform

from .atomic import Stale, atomic_directory, check_destination, clean_stale
from .writer import Piece, StreamedArray, save_params


@dataclass
class Conversion:
    """A checked conversion: the source, the param tree of `StreamedArray`s to write, and what it reads."""

    source: SourceCheckpoint
    tree: dict
    tensors: int  # source tensors written
    source_bytes: int  # their bytes on disk
    largest_tensor: int  # bytes of the largest one
    skipped: list[str]  # known-unused source tensors
    source_dtypes: dict[str, int]

    @property
    def param_count(self) -> int:
        return len(flatten(self.tree))

    @property
    def param_bytes(self) -> int:
        return sum(math.prod(a.shape) * a.dtype.itemsize for a in flatten(self.tree).values())


@dataclass
class Report:
    out: str
    conversion: Conversion
    seconds: float
    copied: list[str] = field(default_factory=list)
    stale: Stale = field(default_factory=Stale)  # leftovers of interrupted conversions found next to OUT


class DiskFullError(OSError):
    """The output's file system ran out of space (or hit a file size limit) during the conversion."""


def _reader(ref: TensorRef, placement: Placement) -> Callable[[], np.ndarray]:
    return lambda: transform(ref.memmap(), placement.target)


def prepare_conversion(src: str, dtype: str | None = None, layout: str = "auto",
                       vision_tower: str | None = None) -> Conversion:
    """Check a source checkpoint completely (headers only) and return what `convert` will write.

    dtype: "float32", "bfloat16", "float16", or None to keep each parameter's dtype on disk.
    """
    source = open_source(src, layout, vision_tower)
    abstract = abstract_params(source.config, "float32")
    checker = ParamAssembly(source.config, abstract)
    refs: dict[tuple[str, ...], list[tuple[Placement, TensorRef]]] = {}
    for directory, lay in source.sources:
        for ref in iter_tensors(directory):
            placement = checker.add(ref.name, lay, ref.shape)
            if placement is not None:
                refs.setdefault(placement.target.path, []).append((placement, ref))
    checker.finish()
    out_dtype = resolve_dtype(dtype) if dtype is not None else None
    tree: dict = {}
    for path, spec in checker.specs.items():
        items = sorted(refs[path], key=lambda pr: -1 if pr[0].target.layer is None else pr[0].target.layer)
        dt = out_dtype or np.result_type(*(ref.dtype for _, ref in items))
        pieces = tuple(Piece(p.target.layer, _reader(ref, p), ref.nbytes) for p, ref in items)
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = StreamedArray(tuple(spec.shape), np.dtype(dt), pieces)
    used = [ref for items in refs.values() for _, ref in items]
    return Conversion(
        source=source, tree=tree, tensors=len(used), source_bytes=sum(r.nbytes for r in used),
        largest_tensor=max(r.nbytes for r in used), skipped=list(checker.unused),
        source_dtypes=dict(Counter(str(r.dtype) for r in used)),
    )


def verify(directory: str, conversion: Conversion) -> None:
    """The written params are exactly the planned tree: every param, the `init` shapes, the chosen dtypes."""
    stored = stored_params(directory)
    expected = {k: (a.shape, a.dtype) for k, a in flatten(conversion.tree).items()}
    if stored != expected:
        missing = sorted(set(expected) - set(stored))
        wrong = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
        extra = sorted(set(stored) - set(expected))
        raise CheckpointError(f"verification failed: missing {missing[:5]}, wrong shape or dtype {wrong[:5]}, "
                              f"unexpected {extra[:5]}")


def convert(src: str, out: str, dtype: str | None = None, layout: str = "auto", vision_tower: str | None = None,
            force: bool = False, progress: Callable[[int, int], None] | None = None,
            conversion: Conversion | None = None) -> Report:
    """Convert the checkpoint directory `src` to a llava-jax checkpoint directory `out` (see module doc).

    progress(bytes, tensors): called after each source tensor is written, with the counts just done.
    Raises CheckpointError / ConfigError for bad input and DestinationError when `out` exists without
    `force`; on any failure (or KeyboardInterrupt) `out` is left as it was and nothing partial remains.
    """
    start = time.monotonic()
    protected = [src] + ([vision_tower] if vision_tower else [])
    check_destination(out, force, foreign_entries, protected)  # fail before planning, not after
    conversion = conversion or prepare_conversion(src, dtype, layout, vision_tower)
    stale = clean_stale(out, foreign_entries)
    with atomic_directory(out, force, foreign_entries, protected) as tmp:
        try:
            save_params(os.path.join(tmp, PARAMS_DIR), conversion.tree,
                        progress=(lambda piece: progress(piece.nbytes, 1)) if progress else None)
            verify(tmp, conversion)
            copied = copy_support_files(conversion.source.path, tmp)
            for directory, lay in conversion.source.sources:
                # original LLaVA-1.5 takes its image processor from the CLIP tower's directory
                if lay == "clip" and "preprocessor_config.json" not in copied:
                    copied += copy_support_files(directory, tmp, only=("preprocessor_config.json",))
            write_config(tmp, conversion.source.config)
            _write_info(tmp, conversion, dtype)
            write_manifest(tmp, param_file_parts)
        except Exception as e:
            if _is_disk_full(e):
                raise DiskFullError(f"no space left for {os.path.abspath(out)} (the conversion "
                                    f"needs about {conversion.param_bytes / 1e9:.2f} GB in "
                                    f"{os.path.dirname(os.path.abspath(out))}): {first_line(e)}") from e
            raise
    return Report(os.path.abspath(out), conversion, time.monotonic() - start, copied, stale)


def foreign_entries(path: str) -> list[str]:
    """The entries of directory `path` that a conversion does not write: --force replaces only a directory
    with none (an empty one, or an earlier conversion with nothing added)."""
    return [name for name in os.listdir(path) if not is_conversion_entry(name)]


def param_file_parts(rel: str, size: int) -> list[tuple[int, int, str | None]]:
    """Checksum parts of a converted directory's file: a file under `params/NAME/` (one Zarr array per param,
    named `a.b.c`) is one part owned by the param `a/b/c`; any other file is its own part."""
    parts = rel.split("/")
    owner = parts[1].replace(".", "/") if len(parts) > 2 and parts[0] == PARAMS_DIR else None
    return [(0, size, owner)]


def copy_support_files(src: str, dest: str, only=SUPPORT_FILES) -> list[str]:
    """Copy the tokenizer, processor and config files present in `src` to `dest`; returns their names.

    Contents only: the copies get the mode new files get (the umask), not the source's."""
    copied = []
    for fname in sorted(os.listdir(src)):
        if any(fnmatch.fnmatchcase(fname, pattern) for pattern in only) and os.path.isfile(
                os.path.join(src, fname)):
            shutil.copyfile(os.path.join(src, fname), os.path.join(dest, fname))
            copied.append(fname)
    return copied


def write_config(dest: str, config: LlavaConfig) -> None:
    """The normalized config, `llava_jax_config.json`: its presence marks a converted directory."""
    with open(os.path.join(dest, CONFIG_FILE), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
        f.write("\n")


# TensorStore reports a full disk as a status string, not as an OSError with an errno.
_DISK_FULL = ("RESOURCE_EXHAUSTED", "No space left on device", "File too large", "Disk quota exceeded")


def _is_disk_full(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return True
        if any(marker in str(error) for marker in _DISK_FULL):
            return True
        error = error.__cause__ or error.__context__
    return False


def _write_info(directory: str, conversion: Conversion, dtype: str | None) -> None:
    from llava_jax import __name__ as package

    info = {
        "converter": f"{package} convert",
        "source": os.path.abspath(conversion.source.path),
        "sources": [{"directory": os.path.abspath(d), "layout": lay} for d, lay in conversion.source.sources],
        "dtype": dtype or "as stored",
        "source_dtypes": conversion.source_dtypes,
        "tensors": conversion.tensors,
        "source_bytes": conversion.source_bytes,
        "params": conversion.param_count,
        "param_bytes": conversion.param_bytes,
        "skipped_unused_tensors": conversion.skipped,
        "checksums": MANIFEST_FILE,  # load refuses this directory without it
    }
    with open(os.path.join(directory, INFO_FILE), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
