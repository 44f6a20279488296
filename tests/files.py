"""Helpers for tests that compare what is on disk."""

import os


def file_tree(path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `path`."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out
