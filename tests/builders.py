"""Small random-weight LLaVA checkpoints built with transformers, for parity tests (no hub access).

HF's default init (std 0.02) gives nearly flat logits that hide errors, so `randomize_` redraws every weight at
a scale that keeps activations of order one: Linear weights ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.1^2),
biases ~ N(0, 0.1^2), embeddings ~ N(0, 1). Logits then are of order one and vary across positions.
"""

from __future__ import annotations

import math

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    MistralConfig,
)

IMAGE_TOKEN = 250
VOCAB = 256


def vision_config(**kw) -> CLIPVisionConfig:
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=56,
                patch_size=14, projection_dim=16)
    return CLIPVisionConfig(**{**base, **kw})


def text_config(kind: str = "mha", **kw):
    """kind "mha": Llama, heads == kv heads, theta 1e4; "gqa": Mistral-style, 4 heads / 2 kv, theta 1e6."""
    if kind == "mha":
        base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, rope_theta=1e4, rms_norm_eps=1e-5,
                    max_position_embeddings=512, tie_word_embeddings=False)
        return LlamaConfig(**{**base, **kw})
    if kind == "gqa":
        base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-5,
                    max_position_embeddings=512, sliding_window=None, tie_word_embeddings=False)
        return MistralConfig(**{**base, **kw})
    raise ValueError(kind)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        elif "norm" in name or "layrnorm" in name:
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        elif p.ndim >= 2 and "embed" not in name:
            fan_in = math.prod(p.shape[1:])
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        else:  # embeddings, class embedding, image_newline
            p.copy_(torch.randn(p.shape, generator=g))


def build_llava(kind="llava", text="mha", strategy="default", seed=0, vision=None, text_kw=None, **cfg_kw):
    """An eval-mode HF LLaVA (1.5 for kind="llava", NeXT for "llava_next") with randomized weights."""
    vc = vision or vision_config()
    tc = text_config(text, **(text_kw or {}))
    if kind == "llava":
        cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_TOKEN,
                          vision_feature_select_strategy=strategy, tie_word_embeddings=False, **cfg_kw)
        model = LlavaForConditionalGeneration(cfg)
    else:
        cfg_kw.setdefault("image_grid_pinpoints", [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]])
        cfg = LlavaNextConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_TOKEN,
                              vision_feature_select_strategy=strategy, tie_word_embeddings=False, **cfg_kw)
        model = LlavaNextForConditionalGeneration(cfg)
    randomize_(model, seed)
    return model.eval()


def original_state(hf, with_vision: bool, vision_prefix: str = "model.vision_tower.vision_tower.vision_model.") -> dict:
    """An HF model's weights under the original LLaVA names (docs/semantics.md, "Weight names").

    vision_prefix: where the CLIP tower's tensors go; llava-torch under transformers 5 saves them under
    "model.vision_tower.vision_tower." (no "vision_model.")."""
    out = {}
    for name, value in hf.state_dict().items():
        value = value.detach().contiguous().numpy()
        if name.startswith("model.language_model."):
            out["model." + name.removeprefix("model.language_model.")] = value
        elif name == "lm_head.weight" or name == "model.image_newline":
            out[name] = value
        elif name.startswith("model.multi_modal_projector.linear_"):
            index, param = name.removeprefix("model.multi_modal_projector.linear_").split(".")
            out[f"model.mm_projector.{2 * (int(index) - 1)}.{param}"] = value
        elif name.startswith("model.vision_tower."):
            if with_vision:
                rest = name.removeprefix("model.vision_tower.").removeprefix("vision_model.")
                out[vision_prefix + rest] = value
        else:
            raise KeyError(name)
    return out


def original_config(hf, vision_tower: str) -> dict:
    """A flat original-LLaVA config.json for an HF model (see test_config.py's ORIGINAL_* dicts)."""
    vision = hf.config.vision_config
    text = hf.config.text_config.to_dict()
    cfg = {k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_parameters",
                                "max_position_embeddings", "bos_token_id", "eos_token_id")}
    cfg |= {"model_type": f"llava_{text['model_type']}", "tie_word_embeddings": False, "mm_hidden_size": vision.hidden_size,
            "mm_projector_type": "mlp2x_gelu", "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
            "mm_vision_tower": vision_tower, "mm_use_im_start_end": False}
    if text["model_type"] == "mistral":
        cfg["sliding_window"] = None
    if hf.config.model_type == "llava_next":
        cfg |= {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
                "image_grid_pinpoints": [list(p) for p in hf.config.image_grid_pinpoints]}
    else:
        cfg |= {"image_aspect_ratio": "pad", "mm_patch_merge_type": "flat"}
    return cfg


def save(model, path) -> str:
    model.save_pretrained(path)
    return str(path)


def image_rows(spec, counts, seed=0):
    """Left-padded (ids, attention_mask) from a row spec: each row a list of items, an int n for n random text
    tokens or ("img", k) for image k's tokens (counts[k] copies of IMAGE_TOKEN)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for items in spec:
        parts = [np.full(counts[it[1]], IMAGE_TOKEN) if isinstance(it, tuple) else rng.integers(3, IMAGE_TOKEN - 10, it)
                 for it in items]
        rows.append(np.concatenate(parts))
    seq = max(map(len, rows))
    ids = np.zeros((len(rows), seq), np.int64)
    mask = np.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, seq - len(r):], mask[b, seq - len(r):] = r, 1
    return ids, mask


def random_pixels(num_crops, size=56, seed=0):
    """(images, max_crops, 3, size, size) noise, zero past each image's crop count, as HF's processor pads."""
    import numpy as np

    rng = np.random.default_rng(seed)
    px = np.zeros((len(num_crops), max(num_crops), 3, size, size), np.float32)
    for i, n in enumerate(num_crops):
        px[i, :n] = rng.standard_normal((n, 3, size, size))
    return px
