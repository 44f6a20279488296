"""The weight table: source tensor names (llava-hf, original LLaVA, CLIP) -> llava-jax parameter paths.

Two steps, both declarative:
1. `PREFIXES[layout]` rewrites a source name to a canonical name (`text.*`, `vision.*`, `projector.*`,
   `image_newline`): this is where the layouts differ.
2. `RULES` maps canonical names to parameter paths and transforms: this is the same for every layout.
Layer-indexed tensors land in one slice of a stacked (layers, ...) parameter, the layout `nn.scan` wants.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .config import LlavaConfig
from .safetensors_io import CheckpointError

# (source regex, canonical replacement); first match wins. Published llava-hf repos, transformers 5
# `save_pretrained` and transformers 5 in-memory names are all accepted for the hf layout.
PREFIXES = {
    "hf": [
        (r"^(?:model\.)?language_model\.lm_head\.", "text.lm_head."),
        (r"^lm_head\.", "text.lm_head."),
        (r"^(?:model\.)?language_model\.(?:model\.)?", "text."),
        (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?", "vision."),
        (r"^(?:model\.)?multi_modal_projector\.", "projector."),
        (r"^(?:model\.)?image_newline$", "image_newline"),
    ],
    "original": [
        # llava-torch under transformers 5 saves its CLIPVisionModel without the `vision_model.` segment
        (r"^model\.vision_tower\.vision_tower\.(?:vision_model\.)?", "vision."),
        (r"^model\.mm_projector\.(weight|bias)$", r"projector.0.\1"),  # mm_projector_type "linear"
        (r"^model\.mm_projector\.", "projector."),
        (r"^model\.image_newline$", "image_newline"),
        (r"^model\.", "text."),
        (r"^lm_head\.", "text.lm_head."),
    ],
    # A stand-alone CLIP checkpoint (the tower that original LLaVA-1.5 checkpoints refer to).
    "clip": [
        (r"^vision_model\.", "vision."),
        (r"^(?=embeddings\.|encoder\.|pre_layrnorm\.|post_layernorm\.)", "vision."),  # CLIPVisionModel, v5
        (r"^(text_model|text_projection|visual_projection|logit_scale)\b", r"unused.\1"),
    ],
}

# Tensor names that only one layout has (`checkpoint.detect_layout`); transformers 5 in-memory names
# (`model.language_model.*`) count as hf.
LAYOUT_SIGNATURES = {
    "hf": r"(model\.)?(language_model|multi_modal_projector)\.",
    "original": r"model\.(mm_projector|layers|embed_tokens|vision_tower\.vision_tower)\.",
}

L = r"(?P<layer>\d+)"
# (canonical regex, parameter path template, kind); kinds: "dense" (a torch Linear's (out, in) weight and bias, kept
# as they are), "norm" (weight -> scale), "conv" (patch Conv2d (out, c, kh, kw) -> matmul weight (out, c*kh*kw)),
# "raw".
RULES = [
    (r"text\.embed_tokens\.weight", "language_model/embed_tokens/embedding", "raw"),
    (rf"text\.layers\.{L}\.self_attn\.(?P<m>[qkvo]_proj)\.weight", "language_model/layers/{m}/weight", "dense"),
    (rf"text\.layers\.{L}\.mlp\.(?P<m>gate_proj|up_proj|down_proj)\.weight", "language_model/layers/{m}/weight",
     "dense"),
    (rf"text\.layers\.{L}\.(?P<m>input_layernorm|post_attention_layernorm)\.weight",
     "language_model/layers/{m}/scale", "raw"),
    (r"text\.norm\.weight", "language_model/norm/scale", "raw"),
    (r"text\.lm_head\.weight", "language_model/lm_head/weight", "dense"),
    (r"vision\.embeddings\.patch_embedding\.weight", "vision_tower/patch_embedding/weight", "conv"),
    (r"vision\.embeddings\.class_embedding", "vision_tower/class_embedding", "raw"),
    (r"vision\.embeddings\.position_embedding\.weight", "vision_tower/position_embedding", "raw"),
    (r"vision\.pre_layrnorm\.(?P<p>weight|bias)", "vision_tower/pre_layrnorm/{p}", "norm"),
    (rf"vision\.encoder\.layers\.{L}\.self_attn\.(?P<m>[qkv]_proj|out_proj)\.(?P<p>weight|bias)",
     "vision_tower/layers/{m}/{p}", "dense"),
    (rf"vision\.encoder\.layers\.{L}\.(?P<m>layer_norm[12])\.(?P<p>weight|bias)", "vision_tower/layers/{m}/{p}",
     "norm"),
    (rf"vision\.encoder\.layers\.{L}\.mlp\.(?P<m>fc[12])\.(?P<p>weight|bias)", "vision_tower/layers/{m}/{p}",
     "dense"),
    (r"projector\.linear_(?P<i>\d+)\.(?P<p>weight|bias)", "multi_modal_projector/linear_{i}/{p}", "dense"),
    # original: nn.Sequential(Linear, GELU, Linear, ...): Linear k sits at index 2 * (k - 1)
    (r"projector\.(?P<seq>\d+)\.(?P<p>weight|bias)", "multi_modal_projector/linear_{seq}/{p}", "dense"),
    (r"image_newline", "image_newline", "raw"),
]
_RULES = [(re.compile(pattern + "$"), template, kind) for pattern, template, kind in RULES]

# Tensors that exist in checkpoints but never influence LLaVA's output (besides vision layers past the feature
# layer, decided from the config).
UNUSED = [
    r"vision\.post_layernorm\..*",
    r"vision\.embeddings\.position_ids",
    r"text\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
    r"unused\..*",
]
_UNUSED = [re.compile(p + "$") for p in UNUSED]


@dataclass(frozen=True)
class Target:
    """Where a source tensor goes: a parameter path, a layer slot (stacked params) and a transform."""

    path: tuple[str, ...]
    layer: int | None
    kind: str


def canonical_name(name: str, layout: str) -> str | None:
    for pattern, repl in PREFIXES[layout]:
        new, n = re.subn(pattern, repl, name, count=1)
        if n:
            return new
    return None


def map_name(name: str, layout: str, config: LlavaConfig) -> Target | None:
    """The target of a source tensor, None for a known-unused tensor; CheckpointError for an unknown name."""
    canon = canonical_name(name, layout)
    if canon is not None:
        if any(p.match(canon) for p in _UNUSED):
            return None
        for pattern, template, kind in _RULES:
            m = pattern.match(canon)
            if not m:
                continue
            groups = m.groupdict()
            layer = int(groups.pop("layer")) if "layer" in groups else None
            if layer is not None and canon.startswith("vision.") and layer >= config.vision_layers_used:
                return None  # past the feature layer: never computed
            if canon == "image_newline" and not config.has_image_newline:
                return None  # original pad + spatial_unpad checkpoints hold one that llava_arch never uses
            if "seq" in groups:
                groups["seq"] = str(int(groups["seq"]) // 2 + 1)
            if kind == "norm" and groups.get("p") == "weight":
                groups["p"] = "scale"
            path = tuple(template.format(**groups).split("/"))
            return Target(path, layer, kind)
    raise CheckpointError(f"unexpected tensor {name!r} for the {layout} layout: llava-jax has no parameter for it")


def transform(array: np.ndarray, target: Target) -> np.ndarray:
    """Source tensor -> parameter layout (before the layer slot and the dtype cast): a reshape at most, never a
    copy (params keep torch's layouts)."""
    if target.kind == "conv":  # (out, c, kh, kw) -> (out, c * kh * kw), matching clip.py's patch flattening
        return array.reshape(array.shape[0], -1)
    return array


def transformed_shape(shape: tuple[int, ...], target: Target) -> tuple[int, ...]:
    """The shape `transform` gives a tensor of `shape`, computed without data (a zero-byte dtype)."""
    return transform(np.empty(shape, np.dtype([])), target).shape


@dataclass(frozen=True)
class Placement:
    """One source tensor checked against the param tree: its name, where it goes, its shape on disk."""

    name: str
    target: Target
    shape: tuple[int, ...]


class ParamAssembly:
    """Where each source tensor goes, checked against the model's abstract param tree before any data is read.

    The one per-tensor API behind both loading and conversion: `add` maps a source tensor by its name and
    its on-disk shape (a safetensors header is enough), so a whole checkpoint can be validated, then read or
    streamed one tensor at a time; `finish` checks that every parameter and every layer slot is covered.
    Errors name the tensor.
    """

    def __init__(self, config: LlavaConfig, abstract):
        import jax

        self.config = config
        self.specs = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
        self.placements: dict[tuple[str, ...], list[Placement]] = {}
        self.unused: list[str] = []  # known-unused source tensors (UNUSED, vision layers past the feature layer)
        self._origin: dict[tuple[tuple[str, ...], int | None], str] = {}

    def skips(self, name: str, layout: str) -> bool:
        """True for a known-unused tensor (no need to read it); CheckpointError for an unknown name."""
        return map_name(name, layout, self.config) is None

    def add(self, name: str, layout: str, shape: tuple[int, ...]) -> Placement | None:
        """Check and record one source tensor; None (and recorded as unused) for a known-unused one."""
        target = map_name(name, layout, self.config)
        if target is None:
            self.unused.append(name)
            return None
        spec = self.specs.get(target.path)
        if spec is None:
            raise CheckpointError(f"unexpected tensor {name!r}: the model config has no {'/'.join(target.path)}")
        want = spec.shape[1:] if target.layer is not None else spec.shape
        if target.layer is not None and target.layer >= spec.shape[0]:
            raise CheckpointError(f"unexpected tensor {name!r}: layer {target.layer} >= {spec.shape[0]} layers")
        if transformed_shape(tuple(shape), target) != tuple(want):
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(shape)}, which does not fit {'/'.join(target.path)} "
                f"of shape {tuple(want)} (check the config against the checkpoint)"
            )
        slot = (target.path, target.layer)
        if slot in self._origin:
            raise CheckpointError(f"tensors {self._origin[slot]!r} and {name!r} both map to {'/'.join(target.path)}")
        self._origin[slot] = name
        placement = Placement(name, target, tuple(shape))
        self.placements.setdefault(target.path, []).append(placement)
        return placement

    def finish(self) -> dict[tuple[str, ...], list[Placement]]:
        """The placements per parameter path; CheckpointError naming what no source tensor covers."""
        missing = []
        for path, spec in self.specs.items():
            got = {p.target.layer for p in self.placements.get(path, [])}
            if None in got or (len(spec.shape) and got == set(range(spec.shape[0]))):
                continue
            name = "/".join(path)
            layers = sorted(set(range(spec.shape[0])) - got) if got else None
            missing.append(f"{name} (layers {layers})" if layers else name)
        if missing:
            raise CheckpointError(f"checkpoint is missing parameter(s): {', '.join(missing[:8])}"
                                  + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
        return self.placements


def load_safetensors_params(sources, config: LlavaConfig, abstract, dtype, digests=None, on_mismatch=None,
                            progress=None) -> dict:
    """Read every tensor of `sources` [(directory, layout), ...] into a param tree shaped like `abstract`.

    Every header is checked first (names, shapes, completeness); then each param is allocated once, in its
    final (stacked) shape and in `dtype`, and every tensor is read straight into its slot
    (`direct_read`: no per-tensor or per-layer copies, casts in parallel threads).
    digests: {(file, start, end): (digest, owner)} of tensors to hash as they are read (`SourceCheckpoint.digests`;
    unused ones are read just to hash them); `on_mismatch(file, owner)` for each that hashes otherwise.
    progress(nbytes): called after each tensor is read, with its bytes on disk.
    """
    from .direct_read import run_jobs, tensor_job
    from .safetensors_io import iter_tensors

    digests = digests or {}
    assembly = ParamAssembly(config, abstract)
    placed = [(assembly.add(ref.name, layout, ref.shape), ref) for directory, layout in sources
              for ref in iter_tensors(directory)]
    placements = assembly.finish()
    arrays = {path: aligned_empty(assembly.specs[path].shape, dtype) for path in placements}
    jobs = []
    for p, ref in placed:
        expected = digests.get((ref.file, ref.start, ref.end))
        if p is not None:
            dest = arrays[p.target.path] if p.target.layer is None else arrays[p.target.path][p.target.layer]
            jobs.append(tensor_job(dest, ref, expected, on_mismatch))
        elif expected is not None:
            jobs.append(tensor_job(None, ref, expected, on_mismatch))
    run_jobs(jobs, progress=progress)
    return tree_from_paths(arrays)


def assemble_params(items, config: LlavaConfig, abstract, dtype) -> dict:
    """Place named source tensors [(name, layout, read_fn), ...] into a param tree shaped like `abstract`.

    Checks as it goes: every source name must map to a parameter (or be known-unused), every shape must
    match, and at the end every parameter and every layer slot must have been written. Errors name the tensor.
    """
    assembly = ParamAssembly(config, abstract)
    arrays: dict[tuple[str, ...], np.ndarray] = {}
    for name, layout, read in items:
        if assembly.skips(name, layout):
            continue
        source = np.asarray(read())
        _put(arrays, assembly, assembly.add(name, layout, source.shape), source, dtype)
    assembly.finish()
    return tree_from_paths(arrays)


def _put(arrays: dict, assembly: ParamAssembly, placement: Placement, source: np.ndarray, dtype) -> None:
    target = placement.target
    value = transform(source, target)
    if target.layer is None:
        arrays[target.path] = aligned_empty(value.shape, dtype)
        arrays[target.path][...] = value
    else:
        if target.path not in arrays:
            arrays[target.path] = aligned_empty(assembly.specs[target.path].shape, dtype)
        arrays[target.path][target.layer] = value


def aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """`np.empty` starting on a 64-byte boundary: on CPU, `jax.device_put` then adopts the buffer instead of
    copying it, so loading holds one copy of the weights, not two."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    offset = -raw.ctypes.data % align
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def tree_from_paths(arrays: dict[tuple[str, ...], np.ndarray]) -> dict:
    """{(a, b, c): leaf} -> the nested dict {a: {b: {c: leaf}}}."""
    tree: dict = {}
    for path, value in arrays.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree
