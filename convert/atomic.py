"""Write a directory atomically: build it under a temporary name next to its destination, rename at the end.

An interrupted or failed write leaves no partial destination (the temporary directory is removed; after a
hard kill it remains as a hidden `.NAME.tmp-*` directory next to it, never as NAME). An existing destination
is replaced only with `force`, only once the new one is complete, and only if it is safe to delete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator


class DestinationError(FileExistsError):
    """The destination exists (and `force` was not given), or may not be replaced."""


def check_destination(out: str, force: bool, replaceable: Callable[[str], bool], protected=()) -> str:
    """The absolute destination path; DestinationError if writing it is not allowed."""
    out = os.path.abspath(out)
    real = os.path.realpath(out)
    for p in protected:
        p = os.path.realpath(p)
        if real == p or p.startswith(real.rstrip(os.sep) + os.sep):
            raise DestinationError(f"{out} is or contains the input {p}: choose another output directory")
    if os.path.lexists(out):
        if not force:
            raise DestinationError(f"{out} already exists; pass --force to replace it")
        if not replaceable(out):
            raise DestinationError(f"{out} exists and is neither empty nor a llava-jax checkpoint: not replacing "
                                   "it even with --force (remove it yourself)")
    return out


@contextlib.contextmanager
def atomic_directory(out: str, force: bool, replaceable: Callable[[str], bool] = lambda _: False,
                     protected=()) -> Iterator[str]:
    """Yield an empty temporary directory next to `out`; when the block succeeds it becomes `out`."""
    out = check_destination(out, force, replaceable, protected)
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        yield tmp
        out = check_destination(out, force, replaceable, protected)  # again: it may have appeared meanwhile
        old = None
        if os.path.lexists(out):
            old = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            if old is not None:
                os.rename(old, out)
            raise
        if old is not None:
            shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.remove(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
