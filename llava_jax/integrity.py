"""Checksums of the files a checkpoint directory holds, written with it and verified when it is loaded.

`write_manifest` records, for every file of a directory, its size and the xxh3-128 hash of each of its
parts: a part is a byte range that belongs to one tensor (a chunk file of a converted param, a tensor's
bytes in a safetensors file) or a whole support file. `verify_manifest` checks that every listed file is
there with its size (always: a stat per file), then re-reads and re-hashes every part (unless verification
is off), so a corrupted byte is reported with the tensor or file it belongs to.

xxh3-128 hashes at about 11 GB/s per core here (sha256 1.4 GB/s, blake2b 0.6 GB/s): verification runs at
disk read speed. It detects corruption (bad disks, truncated copies, bit flips), not deliberate tampering:
a manifest can be rewritten by whoever can rewrite the files.

Switch: `verify=False` (`llava_jax.load`), `--no-verify` (the CLI) or `LLAVA_JAX_VERIFY=0` skip the hashing
(the presence and size checks still run).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from collections.abc import Callable, Collection, Iterable

from .errors import CheckpointError, ChecksumError
from .jsonfile import read_json

MANIFEST_FILE = "checksums.json"
ALGORITHM = "xxh3_128"
VERIFY_ENV = "LLAVA_JAX_VERIFY"
_BLOCK = 8 << 20
PART_BYTES = 256 << 20  # files are hashed in parts of at most this, so one big tensor keeps every thread busy

# One byte range of a file: (start, end, owner), owner naming the tensor it holds (None: the file itself).
Part = tuple[int, int, "str | None"]


def verification_enabled(verify: bool | None = None) -> bool:
    """`verify` if given, else the environment: LLAVA_JAX_VERIFY=0/off/false/no turns hashing off."""
    if verify is not None:
        return bool(verify)
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def _hash_range(path: str, start: int, end: int) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    buf = bytearray(min(_BLOCK, max(end - start, 1)))
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        left = end - start
        while left > 0:
            n = f.readinto(view[: min(len(buf), left)])
            if not n:
                break  # shorter than recorded: the hash differs, reported by the caller
            h.update(view[:n])
            left -= n
    return h.hexdigest()


def _parallel(fn, jobs: list) -> list:
    """fn(*job) for every job on a thread pool (file reads and xxhash release the GIL)."""
    if len(jobs) <= 1:
        return [fn(*job) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 1)) as pool:
        return list(pool.map(lambda job: fn(*job), jobs))


def _split(parts: list[tuple[int, int, str | None]]) -> list[tuple[int, int, str | None]]:
    """Parts cut into blocks of at most `PART_BYTES`."""
    out = []
    for start, end, owner in parts:
        step = PART_BYTES
        out += [(s, min(s + step, end), owner) for s in range(start, end, step)] or [(start, end, owner)]
    return out


def write_manifest(directory: str, parts_of: Callable[[str, int], list[Part]] | None = None,
                   skip: Iterable[str] = ()) -> dict:
    """Hash every file under `directory` and write `checksums.json` there; returns the manifest.

    parts_of(relative path, size) -> [(start, end, owner)]: how a file splits into parts (default: one part,
    the whole file, owned by nothing). Files whose relative path is in `skip` are left out.
    """
    skip = {MANIFEST_FILE, *skip}
    files = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, directory).replace(os.sep, "/")
            if rel not in skip and os.path.isfile(full):
                files.append((rel, full, os.path.getsize(full)))
    jobs, layout = [], {}
    for rel, full, size in files:
        parts = _split(parts_of(rel, size) if parts_of else [(0, size, None)])
        layout[rel] = (size, parts)
        jobs += [(full, s, e) for s, e, _ in parts]
    digests = iter(_parallel(_hash_range, jobs))
    manifest = {"algorithm": ALGORITHM, "files": {
        rel: {"bytes": size, "parts": [[s, e, next(digests), owner] for s, e, owner in parts]}
        for rel, (size, parts) in layout.items()}}
    lines = [f"  {json.dumps(rel)}: {json.dumps(entry, separators=(',', ':'))}"
             for rel, entry in manifest["files"].items()]  # one file a line: readable, diffable
    with open(os.path.join(directory, MANIFEST_FILE), "w") as f:
        f.write(f'{{"algorithm": "{ALGORITHM}", "files": {{\n' + ",\n".join(lines) + "\n}}\n")
    return manifest


def read_manifest(directory: str) -> dict | None:
    """The manifest of `directory`, None when it has none (written before checksums existed)."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    manifest = read_json(path, CheckpointError, "checksum manifest")
    if manifest.get("algorithm") != ALGORITHM or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}: not a llava-jax checksum manifest (algorithm {manifest.get('algorithm')!r})")
    return manifest


def _what(rel: str, owners) -> str:
    owners = sorted({o for o in owners if o})
    if not owners:
        return rel
    named = ", ".join(owners[:3]) + (f" and {len(owners) - 3} more" if len(owners) > 3 else "")
    return f"{rel} (tensor {named})"


def hash_bytes(data) -> str:
    """The manifest's digest of a whole part held in memory (a buffer)."""
    import xxhash

    return xxhash.xxh3_128(data).hexdigest()


def part_digests(manifest: dict, directory: str) -> dict[tuple[str, int, int], tuple[str, str | None]]:
    """{(file path under `directory`, start, end): (digest, owner)} of every part in the manifest: a reader that
    reads exactly a part's bytes can check them as it reads (`hash_bytes`, `new_hasher`), with no second read."""
    return {(os.path.join(directory, *rel.split("/")), start, end): (digest, owner)
            for rel, entry in manifest["files"].items() for start, end, digest, owner in entry["parts"]}


def new_hasher():
    """An incremental hasher of the manifest's algorithm (`update(bytes)`, `hexdigest()`)."""
    import xxhash

    return xxhash.xxh3_128()


def checksum_error(directory: str, bad: list[tuple[str, str | None]], remedy: str = "") -> ChecksumError:
    """The error for parts that hashed wrong: [(path, owner)], named by file (relative to `directory`) and
    tensor."""
    tail = f"; {remedy}" if remedy else ""
    bad = [(os.path.relpath(path, directory).replace(os.sep, "/"), owner) for path, owner in bad]
    files = sorted({rel for rel, _ in bad})
    described = "; ".join(_what(rel, [o for r, o in bad if r == rel]) for rel in files[:3])
    more = f" and {len(files) - 3} more files" if len(files) > 3 else ""
    return ChecksumError(f"{directory}: checksum mismatch in {described}{more}: the file is corrupted"
                         f"{tail} (LLAVA_JAX_VERIFY=0 skips this check)")


def verify_manifest(directory: str, verify: bool | None = None, remedy: str = "",
                    hashed_elsewhere: Collection[tuple[str, int, int]] = ()) -> bool:
    """Check `directory` against its manifest; returns False when it has none, True when it checked out.

    Every listed file must exist with its recorded size (always checked), and, when verification is on
    (`verification_enabled(verify)`), every part must hash to its recorded value. Raises `CheckpointError`
    for a missing file and `ChecksumError` for a changed one, naming the file and the tensor it holds;
    `remedy` (how to recreate the directory) ends the message. Parts in `hashed_elsewhere` ((path, start, end)
    as `part_digests` keys them) are not hashed here: their reader hashes them as it reads them.
    """
    manifest = read_manifest(directory)
    if manifest is None:
        return False
    tail = f"; {remedy}" if remedy else ""
    jobs = []
    for rel, entry in manifest["files"].items():
        full = os.path.join(directory, *rel.split("/"))
        owners = [p[3] for p in entry["parts"]]
        if not os.path.isfile(full):
            raise CheckpointError(f"{directory}: {_what(rel, owners)} is missing{tail}")
        size = os.path.getsize(full)
        if size != entry["bytes"]:
            raise ChecksumError(f"{directory}: {_what(rel, owners)} has {size} bytes, {entry['bytes']} were written: "
                                f"the file is corrupted or truncated{tail}")
        jobs += [(rel, full, start, end, digest, owner) for start, end, digest, owner in entry["parts"]
                 if (full, start, end) not in hashed_elsewhere]
    if not verification_enabled(verify):
        return True

    def check(rel, full, start, end, digest, owner):
        return None if _hash_range(full, start, end) == digest else (rel, owner)

    bad = [b for b in _parallel(check, jobs) if b is not None]
    if bad:
        raise checksum_error(directory, [(os.path.join(directory, *rel.split("/")), owner) for rel, owner in bad],
                             remedy)
    return True
