"""Export back to PyTorch: a llava-jax param tree -> a llava-hf checkpoint that transformers loads.

`export_hf_state_dict` is the inverse of the loading path (`weights.py`): every stacked (layers, ...) param is
unstacked (params keep torch's layouts: Linear weights are (out, in) already), the patch-embedding matmul weight
becomes the (out, channels, patch, patch) Conv2d weight again, and each tensor is named as transformers 5's
`save_pretrained` names it for LlavaForConditionalGeneration / LlavaNextForConditionalGeneration. The names are
derived from the loading table (`weights.RULES`), and every one is checked to load
back into the param it came from, so the two directions cannot drift apart.

`export_checkpoint` writes that state dict as `model.safetensors` with a llava-hf `config.json` and the source
model's tokenizer and processor files, atomically (a failure leaves nothing at the destination).

Two things differ from the checkpoint the model was once loaded from, neither of them in the outputs:
- llava-jax keeps only the vision layers LLaVA computes (up to the deepest feature layer), so the exported
  tower has that many layers and `vision_feature_layer` is written as the equivalent non-negative
  hidden-state index (the same features);
- the tower's `post_layernorm`, which LLaVA never applies, is written as the identity (weight 1, bias 0) so
  that `from_pretrained` finds every tensor it expects.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from .config import LlavaConfig
from .errors import CheckpointError
from .weights import RULES, map_name

SAFETENSORS_FILE = "model.safetensors"
CONFIG_JSON = "config.json"
# Files taken from the source model as they are (its config.json is not: the exported one is written from the
# model's config, which must match the exported tensors).
COPIED_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "chat_template*", "preprocessor_config.json", "processor_config.json",
                "generation_config.json")
EXPORT_ENTRIES = (SAFETENSORS_FILE, CONFIG_JSON, *COPIED_FILES)

# canonical name prefix -> the name transformers 5's save_pretrained writes (first match wins)
_SAVED_PREFIXES = (("text.lm_head.", "language_model.lm_head."), ("text.", "language_model.model."),
                   ("vision.", "vision_tower."), ("projector.", "multi_modal_projector."),
                   ("image_newline", "image_newline"))
# the param leaf -> the torch tensor suffix, per transform kind (the inverse of weights.map_name's renaming)
_TORCH_LEAF = {"norm": {"scale": "weight"}}


def _template_regex(template: str) -> re.Pattern:
    """A param path template of `weights.RULES` ("language_model/layers/{m}/weight") as a regex."""
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+)" for i, p in enumerate(parts))
    return re.compile(regex + "$")


def _fill(pattern: str, values: dict[str, str]) -> str:
    """A canonical-name regex of `weights.RULES` with its named groups replaced by `values`."""
    name = re.sub(r"\(\?P<(\w+)>(?:[^()]|\([^()]*\))*\)", lambda m: values[m.group(1)], pattern)
    return name.replace("\\.", ".")


# (param path regex, canonical name regex, kind), for the rules llava-hf names can come from: the original
# layout's projector rule (`seq`) maps onto the same params as `linear_{i}` and is skipped.
_INVERSE = [(_template_regex(template), pattern, kind) for pattern, template, kind in RULES
            if "(?P<seq>" not in pattern]


def _saved_name(canonical: str) -> str:
    for prefix, saved in _SAVED_PREFIXES:
        if canonical.startswith(prefix):
            return saved + canonical[len(prefix):]
    raise AssertionError(f"no llava-hf name for {canonical}")  # every RULES target has a prefix above


def hf_name(path: tuple[str, ...], layer: int | None) -> tuple[str, str]:
    """(llava-hf tensor name, transform kind) of the param at `path` (layer `layer` of a stacked one)."""
    joined = "/".join(path)
    for template, pattern, kind in _INVERSE:
        m = template.match(joined)
        if not m:
            continue
        values = dict(m.groupdict())
        if "p" in values:
            values["p"] = _TORCH_LEAF.get(kind, {}).get(values["p"], values["p"])
        if "(?P<layer>" in pattern:
            if layer is None:
                continue
            values["layer"] = str(layer)
        elif layer is not None:
            continue
        canonical = _fill(pattern, values)
        if re.fullmatch(pattern, canonical):  # a group value the rule does not allow: another rule's param
            return _saved_name(canonical), kind
    raise CheckpointError(f"param {joined} has no llava-hf tensor name")


def to_torch_layout(value: np.ndarray, kind: str, config: LlavaConfig) -> np.ndarray:
    """A param (one layer of it) -> the torch tensor `weights.transform` made it from (a view)."""
    if kind == "conv":  # (out, c * kh * kw) -> (out, c, kh, kw), inverting clip.py's patch flattening
        v = config.vision
        return value.reshape(value.shape[0], v.num_channels, v.patch_size, v.patch_size)
    return value


def export_hf_state_dict(params, config: LlavaConfig) -> dict[str, np.ndarray]:
    """{llava-hf tensor name: numpy array in torch layout} of a param tree (`model.params`, or a gradient tree
    shaped like it), named as transformers 5's `save_pretrained` writes them.

    Works for every config (also original-layout models, whose tensors then carry llava-hf names); only the
    vision layers llava-jax keeps are there, and no `post_layernorm` (`export_checkpoint` adds the identity).
    Each name is checked to load back into the param it came from (`weights.map_name`).
    """
    import jax

    out: dict[str, np.ndarray] = {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(params):
        path = tuple(str(getattr(k, "key", k)) for k in key_path)
        value = np.asarray(leaf)
        stacked = path[1:2] == ("layers",)
        for layer, array in (enumerate(value) if stacked else [(None, value)]):
            name, kind = hf_name(path, layer)
            target = map_name(name, "hf", config)
            if target is None or (target.path, target.layer) != (path, layer):  # the table is inconsistent
                raise AssertionError(f"{name} does not load back into {'/'.join(path)} (layer {layer})")
            out[name] = to_torch_layout(array, kind, config)
    return out


# ---------------------------------------------------------------- config.json


def _int_or_list(ids: tuple[int, ...]):
    return ids[0] if len(ids) == 1 else list(ids) or None


def hf_config_dict(config: LlavaConfig, dtype: str) -> dict:
    """The llava-hf `config.json` of a model exported by `export_checkpoint` (see the module docstring for the
    vision tower's layers)."""
    t, v = config.text, config.vision
    text = {
        "model_type": t.model_type, "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim,
        "rms_norm_eps": t.rms_norm_eps, "rope_parameters": {"rope_theta": t.rope_theta, "rope_type": "default"},
        "max_position_embeddings": t.max_position_embeddings, "bos_token_id": t.bos_token_id,
        "eos_token_id": _int_or_list(t.eos_token_id), "pad_token_id": t.pad_token_id, "hidden_act": t.hidden_act,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
    }
    if t.model_type == "mistral":
        text["sliding_window"] = None
    layers = config.vision_layers_used
    feature = config.vision_feature_layer
    if layers < v.num_layers:  # the truncated tower: the same hidden states, counted from the front
        feature = list(config.vision_feature_layers) if isinstance(feature, tuple) else config.vision_feature_layers[0]
    elif isinstance(feature, tuple):
        feature = list(feature)
    vision = {
        "model_type": "clip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": layers, "num_attention_heads": v.num_heads, "image_size": v.image_size,
        "patch_size": v.patch_size, "num_channels": v.num_channels, "layer_norm_eps": v.layer_norm_eps,
        "hidden_act": v.hidden_act,
    }
    next_ = config.model_type == "llava_next"
    out = {
        "architectures": ["LlavaNextForConditionalGeneration" if next_ else "LlavaForConditionalGeneration"],
        "model_type": config.model_type,
        "image_token_index": config.image_token_id,
        "image_seq_length": config.tokens_per_crop,
        "projector_hidden_act": config.projector_hidden_act,
        "multimodal_projector_bias": config.projector_bias,
        "vision_feature_layer": feature,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "tie_word_embeddings": False,
        "dtype": dtype,
        "text_config": text,
        "vision_config": vision,
    }
    if next_:
        out["image_grid_pinpoints"] = [list(p) for p in config.image_grid_pinpoints]
    return out


def check_exportable(config: LlavaConfig) -> None:
    """CheckpointError when a llava-hf checkpoint cannot compute what this model computes."""
    what = config.name or "the model"
    if config.semantics != "hf" or config.image_token_id < 0:
        raise CheckpointError(
            f"{what} is an original LLaVA checkpoint (image token {config.image_token_id}, no token of its "
            "vocabulary, and the original image preprocessing): export writes llava-hf checkpoints, which need "
            "an image token in the vocabulary and compute images the llava-hf way; exporting it is not supported")
    if config.projector_depth != 2:
        raise CheckpointError(f"{what} has a {config.projector_type} projector; llava-hf's has exactly two Linear "
                              "layers (mlp2x_gelu): exporting it is not supported")


# ---------------------------------------------------------------- writing


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None,
                      on_tensor=None) -> None:
    """Write `tensors` as one safetensors file, one tensor at a time (each made contiguous as it is written);
    `on_tensor(nbytes)` is called after each."""
    from .dtypes import safetensors_code

    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, array in tensors.items():
        nbytes = array.size * array.dtype.itemsize
        header[name] = {"dtype": safetensors_code(array.dtype), "shape": list(array.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())
            if on_tensor is not None:
                on_tensor(array.nbytes)


def export_foreign_entries(path: str) -> list[str]:
    """The entries of `path` that an export does not write (`--force` replaces only a directory with none)."""
    import fnmatch

    return [n for n in os.listdir(path) if not any(fnmatch.fnmatchcase(n, p) for p in EXPORT_ENTRIES)]


def export_checkpoint(src, out_dir: str, *, dtype: str | None = None, force: bool = False,
                      progress: bool = True, adapter: str | None = None) -> str:
    """Write a llava-hf checkpoint of `src` (a `LlavaModel`, or a checkpoint directory `llava_jax.load` reads)
    into `out_dir`: `model.safetensors`, `config.json`, and the tokenizer, processor and generation files of
    the source directory. `transformers`' `from_pretrained(out_dir)` then computes the model's logits.

    dtype: the tensors' dtype ("float32", "bfloat16", "float16"; default: the model's params' dtype; a
    directory is loaded in float32 unless dtype is given). force: replace an existing export (a directory
    holding other files is refused). The directory is built next to `out_dir` and renamed into place: a failure
    leaves nothing there. adapter: a saved LoRA adapter directory (`train.lora.save_adapter`, OUT/adapter of a
    LoRA run) to merge into the weights first. Returns the absolute output path. CheckpointError for a model
    llava-hf cannot express (`check_exportable`).
    """
    from tqdm import tqdm

    from convert.atomic import atomic_directory, check_destination, clean_stale
    from convert.converter import copy_support_files

    from .dtypes import resolve_dtype
    from .model import LlavaModel, load

    check_destination(out_dir, force, export_foreign_entries)  # before loading anything
    model = src if isinstance(src, LlavaModel) else load(str(src), dtype=dtype or "float32", mesh=None)
    check_exportable(model.config)
    if adapter is not None:
        from .train.lora import apply_adapter

        model = apply_adapter(model, adapter)
    target = np.dtype(resolve_dtype(dtype)) if dtype else np.dtype(model.dtype)
    tensors = export_hf_state_dict(model.params, model.config)
    vh = model.config.vision.hidden_size
    tensors["vision_tower.post_layernorm.weight"] = np.ones(vh, np.float32)
    tensors["vision_tower.post_layernorm.bias"] = np.zeros(vh, np.float32)
    tensors = {name: tensors[name].astype(target, copy=False) for name in sorted(tensors)}
    clean_stale(out_dir, export_foreign_entries)
    total = sum(t.nbytes for t in tensors.values())
    with atomic_directory(out_dir, force, export_foreign_entries) as tmp, \
            tqdm(total=total, desc="export", unit="B", unit_scale=True, disable=not progress or None) as bar:
        write_safetensors(os.path.join(tmp, SAFETENSORS_FILE), tensors, on_tensor=bar.update)
        with open(os.path.join(tmp, CONFIG_JSON), "w") as f:
            json.dump(hf_config_dict(model.config, target.name), f, indent=2)
            f.write("\n")
        if model.path is not None:
            copy_support_files(model.path, tmp, only=COPIED_FILES)
    return os.path.abspath(out_dir)


# ---------------------------------------------------------------- CLI


def cmd_export(args) -> int:
    out = export_checkpoint(args.src, args.out, dtype=args.dtype, force=args.force, progress=not args.quiet,
                            adapter=args.adapter)
    print(f"wrote the llava-hf checkpoint {out} (transformers: LlavaForConditionalGeneration / "
          "LlavaNextForConditionalGeneration.from_pretrained)")
    return 0


def register_export(sub) -> None:
    """Add `llava-jax export SRC OUT` to the `llava-jax` parser's subcommands."""
    p = sub.add_parser("export", help="write a model as a llava-hf (PyTorch/transformers) checkpoint",
                       description="Write SRC (a checkpoint directory llava-jax loads: a trained model, a converted "
                       "or a llava-hf one) as a llava-hf checkpoint in OUT: model.safetensors, config.json and the "
                       "tokenizer and processor files, which transformers' from_pretrained loads.")
    p.add_argument("src", metavar="SRC", help="checkpoint directory")
    p.add_argument("out", metavar="OUT", help="output directory (must not exist, unless --force)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written tensors (default float32)")
    p.add_argument("--force", action="store_true", help="replace an existing export in OUT")
    p.add_argument("--adapter", help="a saved LoRA adapter directory (OUT/adapter of a LoRA run) to merge into "
                   "SRC's weights (a LoRA run's OUT already holds them merged)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)
