"""Write a directory atomically: build it under a temporary name next to its destination, rename at the end.

An interrupted or failed write leaves no partial destination: the temporary directory is removed, and after
a hard kill (`kill -9`, power loss) it remains as a hidden `.NAME.tmp-*` directory next to NAME, which the
next write to NAME removes (`clean_stale`). A write in progress holds an exclusive `flock` on its temporary
directory, so a concurrent write's temporary is never taken for a stale one.

An existing destination is replaced only with `force`, only once the new one is complete, and only if every
entry in it is one that such a write produces (`foreign_entries` says which are not): a directory holding
anything else is refused, naming what it holds, and nothing is deleted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from llava_jax.tempdir import make_temp_dir


class DestinationError(FileExistsError):
    """The destination exists (and `force` was not given), or may not be replaced."""


def check_destination(out: str, force: bool, foreign_entries: Callable[[str], list[str]], protected=()) -> str:
    """The absolute destination path; DestinationError if writing it is not allowed.

    foreign_entries(out) -> the entries of an existing `out` that a write does not produce (an existing
    `out` is replaced, with `force`, only when there are none).
    """
    out = os.path.abspath(out)
    real = os.path.realpath(out)
    for p in protected:
        p = os.path.realpath(p)
        if real == p or p.startswith(real.rstrip(os.sep) + os.sep):
            raise DestinationError(f"{out} is or contains the input {p}: choose another output directory")
    if os.path.lexists(out):
        if not force:
            raise DestinationError(f"{out} already exists; pass --force to replace it")
        if os.path.islink(out) or not os.path.isdir(out):
            raise DestinationError(f"{out} exists and is not a directory: not replacing it even with --force "
                                   "(remove it yourself)")
        foreign = foreign_entries(out)
        if foreign:
            shown = ", ".join(sorted(foreign)[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
            raise DestinationError(f"{out} holds entries that a conversion does not write ({shown}): not replacing "
                                   "it even with --force (move them elsewhere, or choose another output directory)")
    return out


def _try_lock(path: str) -> int | None:
    """An fd holding an exclusive flock on directory `path`, None if another process holds it."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


@dataclass
class Stale:
    """Leftovers of earlier writes to one destination: removed, and kept (in use, or not safely removable)."""

    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def clean_stale(out: str, foreign_entries: Callable[[str], list[str]]) -> Stale:
    """Remove the leftovers of interrupted writes to `out`: `.NAME.tmp-*` directories no running write holds,
    and `.NAME.old-*` directories (a replaced destination whose removal was cut short) when `out` exists and
    they hold nothing foreign. Anything else matching is left alone and listed in `kept`."""
    out = os.path.abspath(out)
    parent, name = os.path.split(out)
    stale = Stale()
    for path in sorted(glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.tmp-*"))):
        if os.path.islink(path) or not os.path.isdir(path):
            stale.kept.append(path)
            continue
        try:
            fd = _try_lock(path)
        except OSError:  # a file system without flock: cannot tell whether a write is running
            stale.kept.append(path)
            continue
        if fd is None:  # a conversion to the same destination is running
            stale.kept.append(path)
            continue
        try:
            shutil.rmtree(path)
            stale.removed.append(path)
        finally:
            os.close(fd)
    for path in sorted(glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.old-*"))):
        if os.path.isdir(out) and os.path.isdir(path) and not os.path.islink(path) and not foreign_entries(path):
            shutil.rmtree(path, ignore_errors=True)
            stale.removed.append(path)
        else:
            stale.kept.append(path)
    return stale


@contextlib.contextmanager
def atomic_directory(out: str, force: bool, foreign_entries: Callable[[str], list[str]],
                     protected=()) -> Iterator[str]:
    """Yield an empty temporary directory next to `out` (mode as `mkdir` gives, locked while in use); when the
    block succeeds it becomes `out`."""
    out = check_destination(out, force, foreign_entries, protected)
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    tmp = make_temp_dir(parent, prefix=f".{name}.tmp-")
    lock = _try_lock(tmp)
    try:
        yield tmp
        out = check_destination(out, force, foreign_entries, protected)  # again: it may have appeared meanwhile
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
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)
