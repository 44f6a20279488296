"""Model configuration: frozen dataclasses built from a llava-hf or an original-LLaVA `config.json`.

Two source layouts exist:
- llava-hf (transformers): `model_type` "llava" / "llava_next" with nested `vision_config` and `text_config`.
- original (liuhaotian/LLaVA): a flat Llama/Mistral config with `mm_*` keys; the vision tower is named by
  `mm_vision_tower` (a hub name of a known CLIP, or a local directory holding a CLIP `config.json`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .jsonfile import read_json

# The id the original code puts where `<image>` was (llava.constants.IMAGE_TOKEN_INDEX): never a real token.
ORIGINAL_IMAGE_TOKEN_INDEX = -200


class ConfigError(ValueError):
    """A config.json that llava-jax cannot run faithfully."""


def _check_activation(what: str, name: str) -> None:
    from .activations import activation  # deferred: it imports jax, and raises this module's ConfigError

    activation(name, what)


@dataclass(frozen=True)
class VisionConfig:
    """CLIP vision transformer. Defaults are ViT-L/14-336, the tower of every released LLaVA."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self):
        _check_activation("vision hidden_act", self.hidden_act)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclass(frozen=True)
class TextConfig:
    """Llama-family decoder (Llama/Vicuna, Mistral, Yi)."""

    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    model_type: str = "llama"
    hidden_act: str = "silu"  # the gate activation of the MLP: down(act(gate(x)) * up(x))

    def __post_init__(self):
        _check_activation("decoder hidden_act", self.hidden_act)


@dataclass(frozen=True)
class LlavaConfig:
    """The whole model: vision tower, projector, decoder, and how images become tokens.

    `layout` says which checkpoint family this came from ("hf" or "original"); `semantics` says whose
    AnyRes arithmetic to reproduce (the two differ in small ways, see docs/semantics.md). `image_token_id` is
    the id in `input_ids` whose embeddings are replaced by image features (-200 for original checkpoints,
    whose vocabulary has no image token).

    `vision_feature_layer` is one hidden-state index or a tuple of them (their features are concatenated, so
    the projector's input is `len(vision_feature_layers)` times the tower's width). `image_resize` is the image
    processor's shortest-edge resize before its center crop to `vision.image_size` (None: the crop size).
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model_type: str = "llava"  # "llava" (1.5, one crop) or "llava_next" (AnyRes)
    projector_type: str = "mlp2x_gelu"  # "linear" or "mlp{N}x_gelu"
    projector_bias: bool = True
    projector_hidden_act: str = "gelu"  # between the projector's Linear layers (exact erf GELU in LLaVA)
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"  # "default" drops CLS, "full" keeps it
    image_token_id: int = 32000
    image_aspect_ratio: str = "crop"  # "crop" (llava-hf 1.5), "pad" (original 1.5), "anyres"
    image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
    patch_merge_type: str = "flat"  # "flat" (1.5, or NeXT crops concatenated) or "spatial_unpad" (NeXT)
    image_resize: int | None = None
    layout: str = "hf"
    semantics: str = "hf"
    name: str = ""  # model name or path, used to choose a prompt template

    def __post_init__(self):
        _check_choice("vision_feature_select_strategy", self.vision_feature_select_strategy, ("default", "full"))
        _check_choice("model_type", self.model_type, ("llava", "llava_next"))
        _check_choice("image_aspect_ratio", self.image_aspect_ratio, ("crop", "pad", "anyres"))
        _check_choice("patch_merge_type", self.patch_merge_type, ("flat", "spatial_unpad"))
        _check_choice("layout", self.layout, ("hf", "original"))
        _check_choice("semantics", self.semantics, ("hf", "original"))
        _ = self.projector_depth  # raises on an unsupported projector_type
        _check_activation("projector_hidden_act", self.projector_hidden_act)
        n = self.vision.num_layers
        layers = self.vision_feature_layer if isinstance(self.vision_feature_layer, tuple) else (
            self.vision_feature_layer,)
        if not layers or any(not -(n + 1) <= i <= n for i in layers):
            raise ConfigError(
                f"vision_feature_layer={self.vision_feature_layer} is not a hidden state of the tower's {n} layers "
                f"(hidden states -{n + 1} .. {n}: 0 and -{n + 1} are the embeddings, -1 and {n} the last layer)"
            )
        if self.vision_layers_used == 0:
            raise ConfigError(f"vision_feature_layer={self.vision_feature_layer} selects only the embeddings "
                              "(no encoder layer): not supported")
        if self.image_resize is not None and self.image_resize < self.vision.image_size:
            raise ConfigError(f"image processor size {self.image_resize} is smaller than its crop size "
                              f"{self.vision.image_size}: not supported (the center crop would pad)")
        if self.model_type == "llava_next":
            if not self.image_grid_pinpoints:
                raise ConfigError("a llava_next config needs image_grid_pinpoints")
            if self.vision_feature_select_strategy != "default":
                # The reference itself fails: transformers' LLaVA-NeXT forward raises on "full" (the unpad step
                # reshapes each tile's features to a (grid, grid) square, with no room for CLS).
                raise ConfigError("LLaVA-NeXT needs vision_feature_select_strategy='default' (CLS dropped): "
                                  "transformers' LlavaNext forward itself raises on 'full'")

    @property
    def projector_depth(self) -> int:
        """Number of Linear layers in the projector (1 for "linear")."""
        if self.projector_type == "linear":
            return 1
        m = re.fullmatch(r"mlp(\d+)x_gelu", self.projector_type)
        if not m or int(m.group(1)) < 1:
            raise ConfigError(
                f"projector type {self.projector_type!r} is not supported (supported: 'linear', 'mlp{{N}}x_gelu')"
            )
        return int(m.group(1))

    @property
    def vision_feature_layers(self) -> tuple[int, ...]:
        """For each selected hidden state, in order, the number of encoder layers it sits after.

        HF's `hidden_states` index: 0 is the embeddings (after `pre_layrnorm`), i the output of layer i, and
        negative indices count from the end (-1: the last layer's output).
        """
        layers = self.vision_feature_layer
        layers = layers if isinstance(layers, tuple) else (layers,)
        return tuple(i if i >= 0 else self.vision.num_layers + 1 + i for i in layers)

    @property
    def vision_layers_used(self) -> int:
        """Encoder layers computed: the deepest selected hidden state is the output of this many layers."""
        return max(self.vision_feature_layers)

    @property
    def projector_input_size(self) -> int:
        """Width of the projector's input: the selected hidden states concatenated."""
        return self.vision.hidden_size * len(self.vision_feature_layers)

    @property
    def has_image_newline(self) -> bool:
        """Whether the model has and uses `image_newline` (AnyRes with the spatial_unpad merge)."""
        return self.model_type == "llava_next" and self.patch_merge_type == "spatial_unpad"

    @property
    def resize_size(self) -> int:
        """The image processor's shortest-edge resize (before the center crop to `vision.image_size`)."""
        return self.vision.image_size if self.image_resize is None else self.image_resize

    @property
    def tokens_per_crop(self) -> int:
        return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    def replace(self, **changes) -> LlavaConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The normalized config, as written next to converted checkpoints (`llava_jax_config.json`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlavaConfig:
        """Inverse of `to_dict`."""
        d = dict(d)
        text = dict(d.pop("text"))
        text["eos_token_id"] = tuple(text["eos_token_id"])
        d["image_grid_pinpoints"] = tuple(tuple(p) for p in d["image_grid_pinpoints"])
        d["vision_feature_layer"] = _feature_layers(d["vision_feature_layer"])
        return cls(vision=VisionConfig(**d.pop("vision")), text=TextConfig(**text), **d)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not supported (supported: {', '.join(choices)})")


# Known CLIP towers named by original LLaVA configs (`mm_vision_tower`).
KNOWN_VISION_TOWERS = {
    "openai/clip-vit-large-patch14-336": VisionConfig(),
    "openai/clip-vit-large-patch14": VisionConfig(image_size=224),
}


def _eos_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple) else (int(value),)


def text_config_from_dict(d: dict[str, Any]) -> TextConfig:
    """A `TextConfig` from a transformers Llama/Mistral config dict (v4 `rope_theta` or v5 `rope_parameters`)."""
    model_type = d.get("model_type", "llama")
    if model_type not in ("llama", "mistral"):
        raise ConfigError(f"text model_type {model_type!r} is not supported (supported: llama, mistral)")
    rope = d.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" or d.get("rope_scaling"):
        raise ConfigError(f"RoPE scaling {d.get('rope_scaling') or rope} is not supported")
    for flag in ("attention_bias", "mlp_bias"):
        if d.get(flag):
            raise ConfigError(f"{flag}=True is not supported: LLaVA's decoders have no biases")
    if d.get("tie_word_embeddings"):
        raise ConfigError("tie_word_embeddings=True is not supported: LLaVA's decoders have an untied lm_head")
    if model_type == "mistral" and d.get("sliding_window") not in (None, 0):
        window, max_pos = d["sliding_window"], d.get("max_position_embeddings", 32768)
        if window < max_pos:
            raise ConfigError(f"sliding_window={window} is not supported (llava-v1.6-mistral has none)")
    heads = d["num_attention_heads"]
    kv_heads = d.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    return TextConfig(
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        bos_token_id=d.get("bos_token_id", 1),
        eos_token_id=_eos_tuple(d.get("eos_token_id", 2)),
        pad_token_id=d.get("pad_token_id"),
        model_type=model_type,
        hidden_act=d.get("hidden_act", "silu"),
    )


def vision_config_from_dict(d: dict[str, Any]) -> VisionConfig:
    """A `VisionConfig` from a transformers CLIP vision config dict (or a full CLIPConfig's)."""
    d = d.get("vision_config", d)
    model_type = d.get("model_type", "clip_vision_model")
    if model_type not in ("clip_vision_model", "clip"):
        raise ConfigError(f"vision tower {model_type!r} is not supported (supported: CLIP)")
    return VisionConfig(
        hidden_size=d.get("hidden_size", 768),
        intermediate_size=d.get("intermediate_size", 3072),
        num_layers=d.get("num_hidden_layers", 12),
        num_heads=d.get("num_attention_heads", 12),
        image_size=d.get("image_size", 224),
        patch_size=d.get("patch_size", 32),
        num_channels=d.get("num_channels", 3),
        layer_norm_eps=d.get("layer_norm_eps", 1e-5),
        hidden_act=d.get("hidden_act", "quick_gelu"),
    )


def _pinpoints(value) -> tuple[tuple[int, int], ...]:
    if not value:
        return ()
    if isinstance(value, str):  # original configs sometimes hold a string such as "(1x1),...,(3x3)"
        raise ConfigError(f"image_grid_pinpoints given as a range string {value!r} is not supported")
    return tuple((int(a), int(b)) for a, b in value)


def _feature_layers(value) -> int | tuple[int, ...]:
    """`vision_feature_layer` / `mm_vision_select_layer`: one index, or a list of them (kept as a tuple)."""
    if isinstance(value, list | tuple):
        return tuple(int(v) for v in value)
    return int(value)


def _original_feature_layer(value) -> int:
    if isinstance(value, list | tuple):
        raise ConfigError(f"mm_vision_select_layer={value}: the original code indexes hidden_states with it and fails "
                          "on a list; give one layer index")
    return int(value)


def _from_hf(d: dict[str, Any], name: str) -> LlavaConfig:
    model_type = d["model_type"]
    next_ = model_type == "llava_next"
    return LlavaConfig(
        vision=vision_config_from_dict(d["vision_config"]),
        text=text_config_from_dict(d["text_config"]),
        model_type=model_type,
        projector_type="mlp2x_gelu",
        projector_bias=d.get("multimodal_projector_bias", True),
        projector_hidden_act=d.get("projector_hidden_act", "gelu"),
        vision_feature_layer=_feature_layers(d.get("vision_feature_layer", -2)),
        vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
        image_token_id=d.get("image_token_id", d.get("image_token_index", 32000)),
        image_aspect_ratio="anyres" if next_ else "crop",
        image_grid_pinpoints=_pinpoints(d.get("image_grid_pinpoints")) if next_ else (),
        patch_merge_type="spatial_unpad" if next_ else "flat",
        layout="hf",
        semantics="hf",
        name=name,
    )


def _original_vision(d: dict[str, Any], base_dir: str | None) -> VisionConfig:
    if "vision_config" in d:  # written by llava-jax's converter or by hand
        return vision_config_from_dict(d["vision_config"])
    tower = d.get("mm_vision_tower") or d.get("vision_tower")
    if tower is None:
        raise ConfigError("original config names no mm_vision_tower")
    if tower in KNOWN_VISION_TOWERS:
        return KNOWN_VISION_TOWERS[tower]
    for candidate in (tower, os.path.join(base_dir or "", tower)):
        path = os.path.join(candidate, "config.json")
        if os.path.isfile(path):
            return vision_config_from_dict(read_json(path, ConfigError, "config.json"))
    raise ConfigError(
        f"mm_vision_tower={tower!r} is neither a known CLIP ({', '.join(KNOWN_VISION_TOWERS)}) "
        "nor a local directory with a config.json"
    )


def _from_original(d: dict[str, Any], name: str, base_dir: str | None) -> LlavaConfig:
    if d.get("mm_use_im_start_end"):
        raise ConfigError("mm_use_im_start_end=True is not supported (no released LLaVA-1.5/1.6 uses it)")
    select = d.get("mm_vision_select_feature", "patch")
    strategies = {"patch": "default", "cls_patch": "full"}
    if select not in strategies:
        raise ConfigError(f"mm_vision_select_feature={select!r} is not supported (patch, cls_patch)")
    aspect = d.get("image_aspect_ratio", "square")
    merge = d.get("mm_patch_merge_type", "flat")
    if merge not in ("flat", "spatial_unpad"):
        raise ConfigError(f"mm_patch_merge_type={merge!r} is not supported (flat, spatial_unpad)")
    if aspect == "anyres":
        # flat: the crops' features one after the other (base first), no unpad, no image_newline.
        model_type = "llava_next"
    elif aspect in ("pad", "square", None):
        model_type = "llava"
        # One crop per image: llava_arch takes its 4-D image batch straight to the projector and never reads
        # mm_patch_merge_type, so spatial_unpad means flat here (its image_newline weight is never used).
        merge = "flat"
        # "square" is the original's plain resize-and-center-crop path, the same as llava-hf's processor.
        aspect = "pad" if aspect == "pad" else "crop"
    else:
        raise ConfigError(f"image_aspect_ratio={aspect!r} is not supported (pad, square, anyres)")
    text = dict(d)
    text["model_type"] = d.get("model_type", "llama").replace("llava_", "").replace("llava", "llama")
    return LlavaConfig(
        vision=_original_vision(d, base_dir),
        text=text_config_from_dict(text),
        model_type=model_type,
        projector_type=d.get("mm_projector_type", "linear"),
        projector_bias=True,
        vision_feature_layer=_original_feature_layer(d.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=strategies[select],
        image_token_id=ORIGINAL_IMAGE_TOKEN_INDEX,  # original tokenizers have no image token
        image_aspect_ratio="anyres" if model_type == "llava_next" else aspect,
        image_grid_pinpoints=_pinpoints(d.get("image_grid_pinpoints")) if model_type == "llava_next" else (),
        patch_merge_type=merge,
        layout="original",
        semantics="original",
        name=name,
    )


def is_original_layout(d: dict[str, Any]) -> bool:
    return "mm_vision_tower" in d or "mm_projector_type" in d or "mm_hidden_size" in d


def config_from_dict(d: dict[str, Any], name: str = "", base_dir: str | None = None) -> LlavaConfig:
    """A `LlavaConfig` from a parsed `config.json` of either layout."""
    if "vision" in d and "text" in d and "layout" in d:
        return LlavaConfig.from_dict(d)
    if is_original_layout(d):  # before model_type: original 1.5 configs also say "llava"
        return _from_original(d, name, base_dir)
    if d.get("model_type") in ("llava", "llava_next"):
        return _from_hf(d, name)
    raise ConfigError(
        f"config model_type={d.get('model_type')!r} is neither a llava-hf config (llava, llava_next) "
        "nor an original LLaVA config (mm_vision_tower, mm_projector_type)"
    )


def _side(value, what: str) -> int | None:
    """A square side from an image processor size entry: an int, {"shortest_edge": n} or a square height/width."""
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, dict) and set(value) == {"shortest_edge"}:
        return int(value["shortest_edge"])
    if isinstance(value, dict) and set(value) == {"height", "width"} and value["height"] == value["width"]:
        return int(value["height"])
    raise ConfigError(f"preprocessor_config.json {what}={value!r} is not supported (an int, shortest_edge, or a "
                      "square height/width)")


def with_image_processor(config: LlavaConfig, processor: dict[str, Any]) -> LlavaConfig:
    """`config` with the sizes of a `preprocessor_config.json`: `size` (shortest-edge resize) and `crop_size`.

    The crop must be the vision tower's input size; a resize other than the crop size is kept in
    `image_resize`. (transformers resizes each crop's shortest edge to `size`, then center-crops to
    `crop_size`; the original code runs the same CLIP processor.)
    """
    size = processor.get("size")
    if isinstance(size, dict) and set(size) == {"height", "width"}:
        # CLIP resizes to exactly (height, width) then: a squash, not a shortest-edge resize
        raise ConfigError(f"preprocessor_config.json size={size!r} is not supported (give shortest_edge)")
    resize, crop = _side(size, "size"), _side(processor.get("crop_size"), "crop_size")
    if crop is not None and crop != config.vision.image_size:
        raise ConfigError(f"preprocessor_config.json crop_size {crop} differs from the vision tower's image_size "
                          f"{config.vision.image_size}")
    if resize is None or resize == config.vision.image_size:
        return config
    return config.replace(image_resize=resize)


def load_config(path: str) -> LlavaConfig:
    """Read `config.json` (or the converter's `llava_jax_config.json`) from a checkpoint directory, with the image
    processor's sizes from its `preprocessor_config.json` when there is one (see `with_image_processor`; the
    converter copies that file next to its output)."""
    for fname in ("llava_jax_config.json", "config.json"):
        p = os.path.join(path, fname)
        if os.path.isfile(p):
            d = read_json(p, ConfigError, fname)  # invalid JSON: a ConfigError naming the file
            config = config_from_dict(d, name=os.path.basename(os.path.normpath(path)), base_dir=path)
            break
    else:
        raise ConfigError(f"no config.json in {path}")
    processor = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(processor):
        config = with_image_processor(config, read_json(processor, ConfigError, "preprocessor_config.json"))
    return config
