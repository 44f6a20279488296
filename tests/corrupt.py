"""Test helper (torch-free): damage a file the way a bad disk or a cut download does."""

import os


def flip_bit(path, offset: int) -> None:
    """Invert the lowest bit of the byte at `offset` of the file at `path`, in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
