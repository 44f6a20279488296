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

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing or truncated files, bad names or shapes."""


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
    refs = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
        if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape}")
        if 8 + n + end > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte {8 + n + end}, "
                f"the file has {size}"
            )
        refs.append(TensorRef(name, path, dtype, shape, 8 + n + begin, 8 + n + end))
    return refs


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory (sharded via the index, or every *.safetensors)."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory")
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
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
        with open(index) as f:
            expected = json.load(f)["weight_map"]
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
