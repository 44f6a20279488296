"""Files laid end to end in one copy-on-write memory mapping: a param array whose bytes are the files' pages.

A converted checkpoint stores each param as Zarr chunk files in C order; when the chunks are whole row blocks
(the converter writes them so) and their sizes are multiples of the page size, the files side by side are
exactly the param's bytes. Mapping them (`mmap` with MAP_FIXED into one reserved address range) gives a numpy
array over the operating system's page cache that the CPU device adopts without a copy: loading the param
costs neither a read into new memory nor the first touch of that memory (on this kind of VM, first touching
1 GB of fresh memory takes ~1 s, more than reading it).

The mapping is private (MAP_PRIVATE, writable): a program that writes into a param (a donated buffer) gets
its own copy of the page, and the file never changes. Files must not be truncated while mapped (reading a
page past a file's end is a SIGBUS): the converter replaces a checkpoint by renaming a new directory into
place, which leaves mapped files intact; sizes are checked before mapping.

POSIX only (Linux, macOS): `map_files` returns None elsewhere, and the caller reads the files instead.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref

import numpy as np

PAGE = mmap.PAGESIZE
PROT_NONE = 0
MAP_FIXED = getattr(mmap, "MAP_FIXED", 0x10)  # exported by Python's mmap module only from 3.13 on
_libc = None


def _c_library():
    """libc's mmap and munmap through ctypes (Python's `mmap` module cannot map at a given address)."""
    global _libc
    if _libc is None:
        libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: libc's, on POSIX
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc = libc
    return _libc


def supported() -> bool:
    """True where `map_files` can map (POSIX: anonymous and fixed-address mappings)."""
    return os.name == "posix" and hasattr(mmap, "MAP_ANONYMOUS")


def round_up(n: int, to: int = PAGE) -> int:
    return -(-n // to) * to


def map_files(parts: list[tuple[str, int]]) -> np.ndarray | None:
    """One writable uint8 array over the files `parts` [(path, nbytes), ...] laid end to end: the first
    `nbytes` of each file, in order. Every `nbytes` but the last must be a multiple of `PAGE` and every file
    at least `nbytes` long (the caller checks sizes: a short file would fault on access). The mapping is
    unmapped when the array (and every view of it) is gone. None where mapping is not supported.
    OSError when a mapping fails."""
    if not supported():
        return None
    if any(n % PAGE for _, n in parts[:-1]):
        raise ValueError("every part but the last must be a whole number of pages")
    libc = _c_library()
    total = sum(n for _, n in parts)
    reserved = round_up(max(total, 1))
    failed = ctypes.c_void_p(-1).value
    # Reserve the whole range first (no access), then map each file over its place in it.
    base = libc.mmap(None, reserved, PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if base in (None, failed):
        raise OSError(ctypes.get_errno(), f"reserving {reserved} bytes of address space failed")
    try:
        offset = 0
        for path, nbytes in parts:
            if nbytes:
                fd = os.open(path, os.O_RDONLY)
                try:
                    got = libc.mmap(base + offset, round_up(nbytes), mmap.PROT_READ | mmap.PROT_WRITE,
                                    mmap.MAP_PRIVATE | MAP_FIXED, fd, 0)
                finally:
                    os.close(fd)
                if got != base + offset:
                    raise OSError(ctypes.get_errno(), f"mapping {path} failed")
            offset += nbytes
    except BaseException:
        libc.munmap(base, reserved)
        raise
    buffer = (ctypes.c_uint8 * total).from_address(base)
    weakref.finalize(buffer, libc.munmap, base, reserved)  # the numpy array keeps `buffer` alive
    return np.frombuffer(buffer, np.uint8)


def touch_pages(flat: np.ndarray) -> None:
    """Read one byte of every page of a mapped uint8 array, so that its pages are mapped in now, not by the first
    program that reads it (each fault maps its neighbours too: 2.8 GB in 0.05 s here, where
    madvise(MADV_POPULATE_READ) took 0.9 s)."""
    if flat.size:
        int(flat[::PAGE].max())
