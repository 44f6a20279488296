"""Temporary directories that become user-visible directories (converted checkpoints, the default-model cache).

`tempfile.mkdtemp` creates mode 0700 whatever the umask, which is right for scratch space but wrong for a
directory that is renamed into place: another user, or a container reading a shared directory under another
uid, could not read the result. `make_temp_dir` gives the mode `mkdir` would (0777 minus the umask).
"""

from __future__ import annotations

import os
import tempfile


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> str:
    """A new, uniquely named, empty directory under `parent` with the mode `mkdir` would give it."""
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(path, 0o777 & ~current_umask())
    return path
