"""The embedded default model: a tiny, deterministic, random-weight LLaVA-NeXT with the real Mistral tokenizer.

It lets `llava-jax generate` run with no checkpoint at all, in seconds on a laptop CPU. Its weights are random:
its answers are fluent-looking noise. It is written once as an ordinary llava-hf checkpoint directory (config,
safetensors, tokenizer) under the cache directory, then loaded like any other checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from .prompt import mistral_tokenizer_dir

VERSION = 1  # bump when the recipe changes: the cache directory name includes it
SEED = 1
CONFIG = {
    "architectures": ["LlavaNextForConditionalGeneration"],
    "model_type": "llava_next",
    "image_token_index": 32000,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "projector_hidden_act": "gelu",
    "multimodal_projector_bias": True,
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "tie_word_embeddings": False,
    "_name_or_path": "llava-jax/tiny-random-llava-v1.6-mistral",
    "vision_config": {
        "model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    },
    "text_config": {
        "model_type": "mistral", "vocab_size": 32064, "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "max_position_embeddings": 8192,
        "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu",
    },
}


def _tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random weights in llava-hf names, scaled so activations and logits are of order one."""
    v, t = CONFIG["vision_config"], CONFIG["text_config"]
    vh, th = v["hidden_size"], t["hidden_size"]
    kv = th // t["num_attention_heads"] * t["num_key_value_heads"]
    out: dict[str, np.ndarray] = {}

    def linear(name, n_out, n_in, bias=True):
        out[name + ".weight"] = rng.standard_normal((n_out, n_in), np.float32) / math.sqrt(n_in)
        if bias:
            out[name + ".bias"] = 0.1 * rng.standard_normal(n_out, np.float32)

    def norm(name, n, bias=True):
        out[name + ".weight"] = 1 + 0.1 * rng.standard_normal(n, np.float32)
        if bias:
            out[name + ".bias"] = 0.1 * rng.standard_normal(n, np.float32)

    grid = v["image_size"] // v["patch_size"]
    pre = "vision_tower.vision_model."
    out[pre + "embeddings.patch_embedding.weight"] = (
        rng.standard_normal((vh, 3, v["patch_size"], v["patch_size"]), np.float32) / math.sqrt(3 * v["patch_size"] ** 2))
    out[pre + "embeddings.class_embedding"] = rng.standard_normal(vh, np.float32)
    out[pre + "embeddings.position_embedding.weight"] = rng.standard_normal((grid * grid + 1, vh), np.float32)
    norm(pre + "pre_layrnorm", vh)
    norm(pre + "post_layernorm", vh)
    for i in range(v["num_hidden_layers"]):
        p = f"{pre}encoder.layers.{i}."
        for m in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(p + "self_attn." + m, vh, vh)
        norm(p + "layer_norm1", vh)
        norm(p + "layer_norm2", vh)
        linear(p + "mlp.fc1", v["intermediate_size"], vh)
        linear(p + "mlp.fc2", vh, v["intermediate_size"])
    linear("multi_modal_projector.linear_1", th, vh)
    linear("multi_modal_projector.linear_2", th, th)
    out["image_newline"] = rng.standard_normal(th, np.float32)
    pre = "language_model.model."
    out[pre + "embed_tokens.weight"] = rng.standard_normal((t["vocab_size"], th), np.float32)
    for i in range(t["num_hidden_layers"]):
        p = f"{pre}layers.{i}."
        linear(p + "self_attn.q_proj", th, th, bias=False)
        linear(p + "self_attn.k_proj", kv, th, bias=False)
        linear(p + "self_attn.v_proj", kv, th, bias=False)
        linear(p + "self_attn.o_proj", th, th, bias=False)
        linear(p + "mlp.gate_proj", t["intermediate_size"], th, bias=False)
        linear(p + "mlp.up_proj", t["intermediate_size"], th, bias=False)
        linear(p + "mlp.down_proj", th, t["intermediate_size"], bias=False)
        norm(p + "input_layernorm", th, bias=False)
        norm(p + "post_attention_layernorm", th, bias=False)
    norm(pre + "norm", th, bias=False)
    # lm_head at 3 / sqrt(fan_in): peaked enough that greedy text is not one repeated token
    out["language_model.lm_head.weight"] = 3 * rng.standard_normal((t["vocab_size"], th), np.float32) / math.sqrt(th)
    return out


def cache_root() -> Path:
    return Path(os.environ.get("LLAVA_JAX_CACHE", Path.home() / ".cache" / "llava-jax"))


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The embedded default checkpoint directory, written on first use (a few MB; deterministic)."""
    from safetensors.numpy import save_file

    root = Path(cache_dir) if cache_dir else cache_root()
    path = root / f"tiny-random-llava-next-v{VERSION}"
    if (path / "model.safetensors").is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))
    save_file(_tensors(np.random.default_rng(SEED)), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(CONFIG, indent=2))
    mistral_tokenizer_dir(tmp)
    try:
        os.rename(tmp, path)  # atomic: a concurrent writer's copy is identical
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path
