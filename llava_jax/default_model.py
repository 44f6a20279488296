"""The embedded default model: a tiny, deterministic, random-weight LLaVA-NeXT with the real Mistral tokenizer.

It lets `llava-jax generate` run with no checkpoint at all, in seconds on a laptop CPU. Its weights are random:
its answers are fluent-looking noise. It is written once as an ordinary llava-hf checkpoint directory (config,
safetensors, tokenizer, and `checksums.json`, which `load` verifies) under the cache directory, then loaded
like any other checkpoint. A corrupted cache is reported by `load`; deleting the directory rebuilds it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .prompt import mistral_tokenizer_dir
from .random_checkpoint import write_random_checkpoint
from .tempdir import make_temp_dir

VERSION = 3  # bump when the recipe changes: the cache directory name includes it
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


def cache_root() -> Path:
    return Path(os.environ.get("LLAVA_JAX_CACHE", Path.home() / ".cache" / "llava-jax"))


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The embedded default checkpoint directory, written on first use (a few MB; deterministic)."""
    root = Path(cache_dir) if cache_dir else cache_root()
    path = root / f"tiny-random-llava-next-v{VERSION}"
    if (path / "model.safetensors").is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(make_temp_dir(root, prefix=".tiny-"))  # the mode mkdir gives: readable as the umask allows
    mistral_tokenizer_dir(tmp)
    # weights scaled for logits of order one; checksums.json covers them and the tokenizer, verified by load
    write_random_checkpoint(tmp, CONFIG, "float32", SEED)
    try:
        os.rename(tmp, path)  # atomic: a concurrent writer's copy is identical
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path


def small_config() -> dict:
    """The default model's config with 56-pixel crops (16 features a crop instead of 576) and thinner, shallower
    towers: a LLaVA-NeXT that trains in seconds on a CPU (tests, the fine-tuning notebook)."""
    import copy

    config = copy.deepcopy(CONFIG)
    config["_name_or_path"] = "llava-jax/small-random-llava-v1.6-mistral"
    config["vision_config"].update(image_size=56, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    config["image_grid_pinpoints"] = [[56, 112], [112, 56], [112, 112]]
    config["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    return config


def write_small_model(path: str | os.PathLike, seed: int = 3) -> Path:
    """Write the `small_config` model (random weights, the real Mistral tokenizer) to `path`."""
    path = Path(path)
    mistral_tokenizer_dir(path)
    write_random_checkpoint(path, small_config(), "float32", seed)
    return path
