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
        (r"^model\.vision_tower\.vision_tower\.vision_model\.", "vision."),
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

L = r"(?P<layer>\d+)"
# (canonical regex, parameter path template, kind); kinds: "dense" (torch (out, in) weight -> (in, out)
# kernel), "norm" (weight -> scale), "embed", "conv" (patch Conv2d -> matmul kernel), "raw".
RULES = [
    (r"text\.embed_tokens\.weight", "language_model/embed_tokens/embedding", "raw"),
    (rf"text\.layers\.{L}\.self_attn\.(?P<m>[qkvo]_proj)\.weight", "language_model/layers/{m}/kernel", "dense"),
    (rf"text\.layers\.{L}\.mlp\.(?P<m>gate_proj|up_proj|down_proj)\.weight", "language_model/layers/{m}/kernel",
     "dense"),
    (rf"text\.layers\.{L}\.(?P<m>input_layernorm|post_attention_layernorm)\.weight",
     "language_model/layers/{m}/scale", "raw"),
    (r"text\.norm\.weight", "language_model/norm/scale", "raw"),
    (r"text\.lm_head\.weight", "language_model/lm_head/kernel", "dense"),
    (r"vision\.embeddings\.patch_embedding\.weight", "vision_tower/patch_embedding/kernel", "conv"),
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
    leaf: str  # "kernel"/"scale"/"bias"/... for the transform


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
            if "seq" in groups:
                groups["seq"] = str(int(groups["seq"]) // 2 + 1)
            if "p" in groups:
                groups["p"] = {"dense": {"weight": "kernel"}, "norm": {"weight": "scale"}}.get(kind, {}).get(
                    groups["p"], groups["p"]
                )
            path = tuple(template.format(**groups).split("/"))
            return Target(path, layer, kind, path[-1])
    raise CheckpointError(f"unexpected tensor {name!r} for the {layout} layout: llava-jax has no parameter for it")


def transform(array: np.ndarray, target: Target) -> np.ndarray:
    """Source tensor -> parameter layout (before the layer slot and the dtype cast)."""
    if target.kind == "dense" and target.leaf == "kernel":
        return array.T
    if target.kind == "conv":  # (out, c, kh, kw) -> (c * kh * kw, out), matching clip.py's patch flattening
        return array.reshape(array.shape[0], -1).T
    return array


def load_safetensors_params(sources, config: LlavaConfig, abstract, dtype) -> dict:
    """Read every tensor of `sources` [(directory, layout), ...] into a param tree shaped like `abstract`."""
    from .safetensors_io import iter_tensors

    items = ((ref.name, layout, ref.read) for directory, layout in sources for ref in iter_tensors(directory))
    return assemble_params(items, config, abstract, dtype)


def assemble_params(items, config: LlavaConfig, abstract, dtype) -> dict:
    """Place named source tensors [(name, layout, read_fn), ...] into a param tree shaped like `abstract`.

    Checks as it goes: every source name must map to a parameter (or be known-unused), every shape must
    match, and at the end every parameter and every layer slot must have been written. Errors name the tensor.
    """
    import jax

    flat_abstract = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
    arrays: dict[tuple[str, ...], np.ndarray] = {}
    filled: dict[tuple[str, ...], set] = {}
    origin: dict[tuple[tuple[str, ...], int | None], str] = {}
    for name, layout, read in items:
        target = map_name(name, layout, config)
        if target is None:
            continue
        spec = flat_abstract.get(target.path)
        if spec is None:
            raise CheckpointError(f"unexpected tensor {name!r}: the model config has no {'/'.join(target.path)}")
        want = spec.shape[1:] if target.layer is not None else spec.shape
        if target.layer is not None and target.layer >= spec.shape[0]:
            raise CheckpointError(f"unexpected tensor {name!r}: layer {target.layer} >= {spec.shape[0]} layers")
        source = np.asarray(read())
        value = transform(source, target)
        if value.shape != tuple(want):
            raise CheckpointError(
                f"tensor {name!r} has shape {source.shape}, which does not fit {'/'.join(target.path)} "
                f"of shape {tuple(want)} (check the config against the checkpoint)"
            )
        slot = (target.path, target.layer)
        if slot in origin:
            raise CheckpointError(f"tensors {origin[slot]!r} and {name!r} both map to {'/'.join(target.path)}")
        origin[slot] = name
        if target.layer is None:
            arrays[target.path] = value.astype(dtype)
        else:
            buf = arrays.setdefault(target.path, np.empty(spec.shape, dtype))
            buf[target.layer] = value
        filled.setdefault(target.path, set()).add(target.layer)
    missing = []
    for path, spec in flat_abstract.items():
        got = filled.get(path, set())
        if path in arrays and None in got:
            continue
        if len(spec.shape) and got == set(range(spec.shape[0])):
            continue
        name = "/".join(path)
        layers = sorted(set(range(spec.shape[0])) - got) if got else None
        missing.append(f"{name} (layers {layers})" if layers else name)
    if missing:
        raise CheckpointError(f"checkpoint is missing parameter(s): {', '.join(missing[:8])}"
                              + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    tree: dict = {}
    for path, value in arrays.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree
