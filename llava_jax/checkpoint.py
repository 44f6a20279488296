"""Checkpoint directories: what makes up a source checkpoint, and reading llava-jax's converted (Orbax) format.

Source checkpoints are safetensors in the llava-hf or the original LLaVA layout (`open_source`); original
LLaVA-1.5 checkpoints hold no vision tower and name a separate CLIP checkpoint.

A converted directory, written by `llava-jax-convert` (`convert/`; its writer is `convert/writer.py`),
needs nothing else to load:

    llava_jax_config.json   the normalized `LlavaConfig`; its presence marks a converted directory
    params/                 an Orbax PyTree checkpoint of the param tree, exactly the tree `Llava.init` makes,
                            one Zarr array directory per param
    conversion.json         provenance: source, layouts, dtypes, which tensors were used and skipped
    checksums.json          size and xxh3-128 hashes of every file (`integrity`), verified by `load`
    config.json, tokenizer*, chat_template*, preprocessor_config.json, ...   copied from the source

This module only reads: loading never imports `convert/`.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import ConfigError, LlavaConfig, config_from_dict, is_original_layout
from .errors import CheckpointError, first_line
from .integrity import MANIFEST_FILE, part_digests, read_manifest, verification_enabled, verify_manifest
from .jsonfile import read_json
from .safetensors_io import checkpoint_files, iter_tensors
from .weights import LAYOUT_SIGNATURES, canonical_name, map_name

CONFIG_FILE = "llava_jax_config.json"
PARAMS_DIR = "params"
INFO_FILE = "conversion.json"
# Files copied verbatim from a source checkpoint (tokenizer, processor, generation defaults, its config).
SUPPORT_FILES = (
    "config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template*", "preprocessor_config.json", "processor_config.json",
    "generation_config.json",
)
# Every entry a conversion writes at the top of its directory: `--force` replaces only directories made of these.
CONVERSION_ENTRIES = (CONFIG_FILE, PARAMS_DIR, INFO_FILE, MANIFEST_FILE, *SUPPORT_FILES)
RECONVERT = "convert it again with llava-jax-convert SRC OUT --force"
RESTORE_CONCURRENT_GB = 1  # restore read-ahead: host memory beyond the params themselves


# ---------------------------------------------------------------- source checkpoints (safetensors)


@dataclass(frozen=True)
class SourceCheckpoint:
    """A safetensors checkpoint: its config and the directories whose tensors make up the model."""

    path: str
    config: LlavaConfig
    sources: tuple[tuple[str, str], ...]  # (directory, weights layout), e.g. ((ckpt, "original"), (clip, "clip"))
    # tensors left for the reader to hash as it reads them (`open_source(defer_tensor_hashes=True)`):
    # {(file, start, end): (digest, tensor name)}, as `integrity.part_digests` keys them
    digests: dict = field(default_factory=dict)

    @property
    def remedy(self) -> str:
        """What to do about a corrupted file of this checkpoint (the end of checksum errors)."""
        return f"delete {self.path} and write it again"


def is_converted(path: str) -> bool:
    """True for a directory written by the converter (it holds `llava_jax_config.json`)."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def is_conversion_entry(name: str) -> bool:
    """True for a top-level entry name that a conversion writes (`CONVERSION_ENTRIES`)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in CONVERSION_ENTRIES)


def detect_layout(names, config: LlavaConfig, layout: str = "auto") -> str:
    """The weights layout ("hf" or "original") of a checkpoint's tensor names, checked against its config."""
    if layout != "auto":
        if layout not in LAYOUT_SIGNATURES:
            raise CheckpointError(f"layout {layout!r} is not supported (supported: auto, {', '.join(LAYOUT_SIGNATURES)})")
        return layout
    found = sorted({lay for lay, pattern in LAYOUT_SIGNATURES.items() for n in names if re.match(pattern, n)})
    if not found or found == [config.layout]:
        return config.layout
    if len(found) > 1:
        raise CheckpointError("tensor names of both the hf and the original layout: cannot tell the layout "
                              "(pass --layout)")
    raise CheckpointError(
        f"the config is a {config.layout}-layout config but the "
        f"tensor names are {found[0]}-layout names (pass --layout {found[0]} to read them anyway)"
    )


def _has_safetensors(path: str) -> bool:
    return os.path.isdir(path) and any(f.endswith(".safetensors") for f in os.listdir(path))


def open_source(path: str, layout: str = "auto", vision_tower: str | None = None,
                verify: bool | None = None, defer_tensor_hashes: bool = False) -> SourceCheckpoint:
    """Config and tensor sources of a llava-hf or original LLaVA safetensors checkpoint directory.

    vision_tower: a CLIP safetensors checkpoint directory, for original LLaVA-1.5 checkpoints (which hold no
    vision tower); without it, the config's `mm_vision_tower` is used when it is a local directory.
    A directory that carries a checksum manifest (the embedded default model) is verified against it
    (`integrity.verify_manifest`; `verify=False` or LLAVA_JAX_VERIFY=0 skip the hashing). With
    `defer_tensor_hashes`, the tensors' bytes are left out of that, to be hashed by the reader from the bytes it
    reads (the result's `digests`; `weights.load_safetensors_params`): the files are read once, not twice.
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a checkpoint directory")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"no config.json in {path}")
    manifest = read_manifest(path) if defer_tensor_hashes and verification_enabled(verify) else None
    digests = {}
    if manifest is not None:
        tensors = {(ref.file, ref.start, ref.end) for ref in iter_tensors(path)}
        digests = {key: value for key, value in part_digests(manifest, path).items() if key in tensors}
    verify_manifest(path, verify, remedy=f"delete {path} and write it again", hashed_elsewhere=digests)
    raw = read_json(config_path, ConfigError, "config.json")
    name = os.path.basename(os.path.normpath(path))
    if vision_tower is not None:
        if not is_original_layout(raw):
            raise CheckpointError("--vision-tower is for original LLaVA checkpoints (mm_vision_tower in config.json); "
                                  f"{path} is a llava-hf checkpoint, which holds its vision tower")
        if not os.path.isfile(os.path.join(vision_tower, "config.json")):
            raise CheckpointError(f"vision tower {vision_tower} is not a CLIP checkpoint directory (no config.json)")
        raw = {**raw, "mm_vision_tower": os.path.abspath(vision_tower)}
    config = config_from_dict(raw, name=name, base_dir=path)
    checkpoint_files(path)  # refuses pickles and reports missing shards before anything else
    names = [ref.name for ref in iter_tensors(path)]
    layout = detect_layout(names, config, layout)
    for n in names:
        map_name(n, layout, config)  # an unknown name is an error before anything else
    sources = [(path, layout)]
    has_vision = any((canonical_name(n, layout) or "").startswith("vision.") for n in names)
    if vision_tower is not None:
        if has_vision:
            raise CheckpointError(f"{path} already holds a vision tower; drop --vision-tower")
        sources.append((vision_tower, "clip"))
    elif not has_vision:
        tower = (raw.get("mm_vision_tower") or raw.get("vision_tower")) if is_original_layout(raw) else None
        local = [d for d in (tower, os.path.join(path, tower)) if d and _has_safetensors(d)] if tower else []
        if not local:
            raise CheckpointError(
                f"{path} holds no vision tower tensors (original LLaVA-1.5 checkpoints refer to a separate CLIP "
                f"checkpoint, here mm_vision_tower={tower!r}): pass the CLIP safetensors checkpoint directory "
                "with --vision-tower DIR (llava-jax-convert), or set mm_vision_tower in config.json to that directory"
            )
        sources.append((local[0], "clip"))
    return SourceCheckpoint(path, config, tuple(sources), digests)


# ---------------------------------------------------------------- restore


def flatten(tree) -> dict[str, Any]:
    """{"a/b/c": leaf} of a nested param dict."""
    import jax

    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _written_with_checksums(path: str) -> bool:
    """True when the conversion record says a manifest was written (conversions before checksums wrote none)."""
    info = os.path.join(path, INFO_FILE)
    return os.path.isfile(info) and bool(read_json(info, CheckpointError, INFO_FILE).get("checksums"))


def stored_params(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{param path: (shape, dtype)} of a converted directory's params, from Orbax's metadata (no data read)."""
    import orbax.checkpoint as ocp

    params_dir = os.path.abspath(os.path.join(path, PARAMS_DIR))
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{path} has {CONFIG_FILE} but no {PARAMS_DIR}/: an incomplete converted checkpoint; "
                              f"{RECONVERT}")
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            meta = checkpointer.metadata(params_dir).item_metadata
    except (ValueError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{params_dir} is not a readable Orbax checkpoint ({first_line(e)}); {RECONVERT}") from e
    if meta is None:
        raise CheckpointError(f"{params_dir} is not a readable Orbax checkpoint")
    tree = getattr(meta, "tree", meta)
    return {k: (tuple(m.shape), np.dtype(m.dtype)) for k, m in flatten(tree).items()}


def restore_params(path: str, abstract, shardings=None, concurrent_gb: int = RESTORE_CONCURRENT_GB,
                   verify: bool | None = None) -> dict:
    """Restore a converted directory's param tree onto devices in one Orbax call.

    abstract: the model's param tree of `jax.ShapeDtypeStruct`s (`abstract_params(config, dtype)`); params
    are cast to its dtypes as they are read. shardings: None (the default device) or a tree like `abstract`
    of `jax.sharding.Sharding`s, e.g. `NamedSharding`s of a mesh: each host then reads only its shards.
    concurrent_gb: host bytes read ahead of the device copies (at least the largest param): bounds the
    host memory beyond the params themselves.
    verify: check every file against `checksums.json` (`integrity.verify_manifest`); None: on unless
    LLAVA_JAX_VERIFY=0. Files missing or corrupted raise `CheckpointError` / `ChecksumError` naming the
    tensor; a directory converted before checksums existed is loaded unchecked.
    On one device (shardings None), params stored as plain Zarr arrays (what the converter writes) are read
    without Orbax, straight into host arrays of the target dtype, each chunk hashed as it is read
    (`zarr_read`), then adopted by the device.
    """
    if shardings is None:
        params = _read_plain_params(path, abstract, verify)
        if params is not None:
            return params
    import jax
    import orbax.checkpoint as ocp

    if not verify_manifest(path, verify, remedy=RECONVERT) and _written_with_checksums(path):
        raise CheckpointError(f"{path}: {MANIFEST_FILE} is missing (it was written with the checkpoint); {RECONVERT}")
    stored = stored_params(path)
    _check_stored_shapes(path, {k: shape for k, (shape, _) in stored.items()},
                         {k: tuple(a.shape) for k, a in flatten(abstract).items()})
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: device, abstract)
    args = jax.tree_util.tree_map(
        lambda a, s: ocp.ArrayRestoreArgs(sharding=s, dtype=a.dtype, global_shape=tuple(a.shape)), abstract, shardings)
    # Orbax refuses a single read larger than its in-flight limit: make room for the largest param.
    largest = max(math.prod(a.shape) * max(np.dtype(a.dtype).itemsize, stored[k][1].itemsize)
                  for k, a in flatten(abstract).items())
    handler = ocp.PyTreeCheckpointHandler(restore_concurrent_gb=max(concurrent_gb, largest // 10**9 + 1))
    try:
        with ocp.Checkpointer(handler) as checkpointer:
            return checkpointer.restore(os.path.abspath(os.path.join(path, PARAMS_DIR)),
                                        args=ocp.args.PyTreeRestore(restore_args=args))
    except (ValueError, OSError, RuntimeError) as e:  # TensorStore / Orbax read errors: one line, not a traceback
        raise CheckpointError(f"{path}: reading the params failed ({first_line(e)}); {RECONVERT}") from e


def _check_stored_shapes(path: str, have: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]]) -> None:
    if any(k.endswith("/kernel") for k in have):  # a square kernel would fit its (out, in) weight's shape
        raise CheckpointError(f"{path} was converted by an earlier llava-jax, which stored Linear weights transposed, "
                              f"as (in, out) 'kernel's; {RECONVERT}")
    if have != want:
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {extra[:5]}" if extra else "",
                 "shapes differ: " + ", ".join(f"{k} {have[k]} != {want[k]}" for k in wrong[:5]) if wrong else ""]
        raise CheckpointError(f"{path}: the stored params do not fit its config ({'; '.join(p for p in parts if p)})")


def _read_plain_params(path: str, abstract, verify: bool | None) -> dict | None:
    """The param tree read by `zarr_read` onto the default device; None when some param is not a plain Zarr
    array (or the directory lists other params than `abstract`'s): Orbax reads those."""
    from . import file_mapping
    from .direct_read import adopt_host_arrays, run_jobs
    from .integrity import checksum_error
    from .weights import aligned_empty, tree_from_paths
    from .zarr_read import chunk_jobs, chunk_regions, map_array, mapped_chunk_job, mapped_chunks, open_array

    params_dir = os.path.join(path, PARAMS_DIR)
    want = flatten(abstract)
    if not os.path.isdir(params_dir):
        return None
    stored_names = {e for e in os.listdir(params_dir) if os.path.isfile(os.path.join(params_dir, e, ".zarray"))}
    if stored_names != {k.replace("/", ".") for k in want}:
        return None  # let Orbax's metadata name what differs
    arrays = {k: open_array(os.path.join(params_dir, k.replace("/", "."))) for k in want}
    if any(a is None for a in arrays.values()):
        return None
    _check_stored_shapes(path, {k: a.shape for k, a in arrays.items()}, {k: tuple(a.shape) for k, a in want.items()})
    manifest = read_manifest(path)
    if manifest is None and _written_with_checksums(path):
        raise CheckpointError(f"{path}: {MANIFEST_FILE} is missing (it was written with the checkpoint); {RECONVERT}")
    digests = part_digests(manifest, path) if manifest is not None and verification_enabled(verify) else {}
    bad: list[tuple[str, str | None]] = []
    on_mismatch = lambda *b: bad.append(b)  # noqa: E731
    # Params stored in the target dtype in mappable chunks are memory-mapped (`zarr_read.map_array`), the others read:
    # {param: its chunk files and the bytes of each that are mapped} for the first kind.
    mappable = {k: parts for k, a in arrays.items() if file_mapping.supported() and np.dtype(want[k].dtype) == a.dtype
                and (parts := mapped_chunks(a)) is not None}
    hashed = set()  # the manifest parts that the jobs hash (a mapped edge chunk only up to the array's end)
    for k, a in arrays.items():
        files = mappable[k] if k in mappable else [(file, a.chunk_bytes) for file, _ in chunk_regions(a)]
        hashed |= {(file, 0, nbytes) for file, nbytes in files} & digests.keys()
    if manifest is not None:  # presence and sizes of every file (before any is mapped); hashes of the others
        verify_manifest(path, verify, remedy=RECONVERT, hashed_elsewhere=hashed)
    dests, jobs = {}, []
    for k, a in arrays.items():
        try:
            got = map_array(a, mappable[k]) if k in mappable else None
        except OSError:  # e.g. the process's limit on mappings: read this one
            got = None
        if got is not None:
            dests[k] = got[0]
            jobs += [mapped_chunk_job(view, file, digests.get((file, 0, view.nbytes)), on_mismatch)
                     for file, view in got[1]]
        else:
            dests[k] = aligned_empty(a.shape, want[k].dtype)
            jobs += chunk_jobs(a, dests[k], digests, on_mismatch)
    run_jobs(jobs)
    if bad:
        raise checksum_error(path, bad, RECONVERT)
    return adopt_host_arrays(tree_from_paths({tuple(k.split("/")): v for k, v in dests.items()}))


__all__ = [
    "CONFIG_FILE", "CONVERSION_ENTRIES", "INFO_FILE", "PARAMS_DIR", "SUPPORT_FILES", "SourceCheckpoint",
    "detect_layout", "flatten", "is_conversion_entry", "is_converted", "open_source", "restore_params",
    "stored_params",
]
