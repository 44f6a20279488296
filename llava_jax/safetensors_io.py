"""Reading safetensors checkpoints tensor by tensor, without torch and without loading whole files.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte offsets), then
raw little-endian data. Tensors are read lazily through a memory map, so memory use is one tensor at a time.
A `.bin`/`.pt` pickle is never opened: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .dtypes import SAFETENSORS_DTYPES
from .errors import CheckpointError
from .jsonfile import read_json

INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives; `read()` maps and copies just that tensor."""

    name: str
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def read(self) -> np.ndarray:
        with open(self.file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = np.frombuffer(mm, dtype=np.uint8, count=self.nbytes, offset=self.start)
            out = buf.view(self.dtype).reshape(self.shape).copy()
            del buf  # release the export before the map closes
        return out

    def memmap(self) -> np.ndarray:
        """A read-only view of the tensor on a memory map: no copy; pages load as they are touched and are
        unmapped when the view is garbage collected. For streaming a tensor into another file."""
        return np.memmap(self.file, dtype=self.dtype, mode="r", offset=self.start, shape=self.shape)


def read_header(path: str) -> list[TensorRef]:
    """Parse one safetensors file's header and check that every tensor lies inside the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    refs = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = _header_entry(path, name, info)
        if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape}")
        if 8 + n + end > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte {8 + n + end}, "
                f"the file has {size}"
            )
        refs.append(TensorRef(name, path, dtype, shape, 8 + n + begin, 8 + n + end))
    return refs


def file_parts(path: str) -> list[tuple[int, int, str | None]]:
    """The byte ranges of a safetensors file for its checksum manifest (`integrity`): the header, owned by no
    tensor, then each tensor's data, owned by its name; the rest of the file (padding, if any) at the end."""
    refs = sorted(read_header(path), key=lambda r: r.start)
    data_start = refs[0].start if refs else os.path.getsize(path)
    parts: list[tuple[int, int, str | None]] = [(0, data_start, None)]
    position = data_start
    for ref in refs:
        if ref.start > position:
            parts.append((position, ref.start, None))
        parts.append((ref.start, ref.end, ref.name))
        position = max(position, ref.end)
    if position < os.path.getsize(path):
        parts.append((position, os.path.getsize(path), None))
    return parts


def _header_entry(path: str, name: str, info) -> tuple[np.dtype, tuple[int, ...], tuple[int, int]]:
    """(dtype, shape, data offsets) of one header entry, checked field by field."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a valid safetensors header: tensor {name!r} {what}")

    if not isinstance(info, dict):
        raise bad("is not described by a JSON object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise bad(f"has no {key!r} field")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {code!r} "
                              f"(supported: {', '.join(SAFETENSORS_DTYPES)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"has shape {shape!r}, not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        raise bad(f"has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end")
    return SAFETENSORS_DTYPES[code], tuple(shape), (offsets[0], offsets[1])


def read_index(path: str) -> dict[str, str]:
    """The `weight_map` (tensor name -> shard file name) of a checkpoint directory's shard index.

    Shard names must be plain relative paths inside the directory: an absolute path or one that climbs out
    with `..` is refused, so that an index can never make llava-jax read a file outside the checkpoint.
    (Shards may be symlinks, as in the Hugging Face cache, whose files link into its `blobs/` directory.)
    """
    index = os.path.join(path, INDEX_FILE)
    raw = read_json(index, CheckpointError, "shard index")
    weight_map = raw.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: not a valid shard index: 'weight_map' must be an object of "
                              "tensor name -> file name")
    for name, file in weight_map.items():
        parts = file.replace("\\", "/").split("/")
        if os.path.isabs(file) or ".." in parts or not file.strip():
            raise CheckpointError(f"{index}: tensor {name!r} is mapped to {file!r}, a path outside the checkpoint "
                                  "directory: refusing to read it (shards must be files inside the directory)")
    return weight_map


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory (sharded via the index, or every *.safetensors)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory")
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        names = sorted(set(read_index(path).values()))
        missing = [n for n in names if not os.path.isfile(os.path.join(path, n))]
        if missing:
            raise CheckpointError(f"{path}: shard(s) listed in {INDEX_FILE} are missing: {', '.join(missing)}")
        return [os.path.join(path, n) for n in names]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if files:
        return [os.path.join(path, f) for f in files]
    pickles = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
    if pickles:
        raise CheckpointError(
            f"{path} holds only PyTorch pickle files ({', '.join(pickles)}); llava-jax reads safetensors only, "
            "because unpickling can run arbitrary code. Convert them once, from a source you trust, with: "
            "python -c \"import torch, safetensors.torch as st; "
            "st.save_file(torch.load('pytorch_model.bin', weights_only=True), 'model.safetensors')\" "
            "(for sharded checkpoints, do this per shard, or load and save_pretrained(safe_serialization=True) "
            "with transformers)"
        )
    raise CheckpointError(f"{path}: no *.safetensors files")


def iter_tensors(path: str) -> Iterator[TensorRef]:
    """Every tensor of a checkpoint directory, in file then header order; a name twice is an error."""
    seen: dict[str, str] = {}
    index = os.path.join(path, INDEX_FILE)
    expected = None
    if os.path.isfile(index):
        expected = read_index(path)
    for file in checkpoint_files(path):
        for ref in read_header(file):
            if ref.name in seen:
                raise CheckpointError(f"tensor {ref.name!r} appears in both {seen[ref.name]} and {file}")
            seen[ref.name] = file
            yield ref
    if expected is not None:
        missing = sorted(set(expected) - set(seen))
        if missing:
            raise CheckpointError(f"{path}: tensors listed in {INDEX_FILE} are in no shard: {missing[:5]}")
