"""The embedded models: the default (a toy trained on synthetic shapes) and a random-weight twin for tests.

`default_model_dir()` is what `llava-jax generate` / `chat` / `serve` / `train` use with no `--model`: a tiny
LLaVA-NeXT (AnyRes, image_newline, the real Mistral tokenizer) trained by llava-jax itself on the synthetic
shapes data (`llava-jax make-default`, `train/make_default.py`): it answers "What color is the shape?" and
"What shape is this?" about one coloured shape on white, and nothing else. Its weights ship in the package
(`assets/default-model/`: `config.json`, fp16 `model.safetensors`, and `checksums.json` recorded by the recipe);
the first use copies them, with the Mistral tokenizer, into a cache directory that `load` verifies against
those checksums.

`random_model_dir()` is a random-weight LLaVA-NeXT (bigger vision: 336-pixel crops) written on first use from
`RANDOM_CONFIG` and a seed: its answers are fluent-looking noise. Tests build on it.

Both are ordinary llava-hf checkpoint directories under the cache directory (`LLAVA_JAX_CACHE`, default
~/.cache/llava-jax), loaded like any other checkpoint. A corrupted cache is reported by `load`; deleting the
directory rebuilds it.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

from .prompt import mistral_tokenizer_dir
from .random_checkpoint import write_random_checkpoint
from .tempdir import make_temp_dir

VERSION = 3  # bump when the random model's recipe changes: the cache directory name includes it
SEED = 1
RANDOM_CONFIG = {
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


# The trained default's architecture (`make-default` starts from random weights of it): the random model's with
# 64-pixel crops cut in 16-pixel patches (16 features a crop: the shapes pictures are 64 x 64) and a thinner,
# shallower decoder, so that the whole recipe trains in minutes on a CPU and the weights are a few MB.
SHAPES_CONFIG = copy.deepcopy(RANDOM_CONFIG)
SHAPES_CONFIG["_name_or_path"] = "llava-jax/tiny-shapes-llava-v1.6-mistral"
SHAPES_CONFIG["image_grid_pinpoints"] = [[64, 128], [128, 64], [128, 128]]
SHAPES_CONFIG["vision_config"].update(image_size=64, patch_size=16)
SHAPES_CONFIG["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2)

ASSET_DIR = Path(__file__).parent / "assets" / "default-model"
ASSET_FILES = ("config.json", "model.safetensors", "checksums.json")


def cache_root() -> Path:
    return Path(os.environ.get("LLAVA_JAX_CACHE", Path.home() / ".cache" / "llava-jax"))


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The default (trained) checkpoint directory: the shipped weights (`ASSET_DIR`) and the Mistral tokenizer,
    copied into the cache on first use. Its `checksums.json` is the recipe's, so `load` checks the copied
    weights against the hashes recorded when they were made."""
    from .errors import CheckpointError
    from .integrity import hash_bytes

    missing = [name for name in ASSET_FILES if not (ASSET_DIR / name).is_file()]
    if missing:
        raise CheckpointError(f"the installed package lacks the default model's {', '.join(missing)} in {ASSET_DIR}; "
                              "reinstall llava-jax")
    root = Path(cache_dir) if cache_dir else cache_root()
    # the manifest's hash names the directory: new shipped weights get a new cache entry
    path = root / f"tiny-shapes-llava-next-{hash_bytes((ASSET_DIR / 'checksums.json').read_bytes())[:12]}"
    if (path / "model.safetensors").is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(make_temp_dir(root, prefix=".shapes-"))
    mistral_tokenizer_dir(tmp)
    for name in ASSET_FILES:
        shutil.copyfile(ASSET_DIR / name, tmp / name)
    try:
        os.rename(tmp, path)  # atomic: a concurrent writer's copy is identical
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def random_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The random-weight checkpoint directory (`RANDOM_CONFIG`), written on first use (a few MB; deterministic)."""
    root = Path(cache_dir) if cache_dir else cache_root()
    path = root / f"tiny-random-llava-next-v{VERSION}"
    if (path / "model.safetensors").is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(make_temp_dir(root, prefix=".tiny-"))  # the mode mkdir gives: readable as the umask allows
    mistral_tokenizer_dir(tmp)
    # weights scaled for logits of order one; checksums.json covers them and the tokenizer, verified by load
    write_random_checkpoint(tmp, RANDOM_CONFIG, "float32", SEED)
    try:
        os.rename(tmp, path)  # atomic: a concurrent writer's copy is identical
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def small_config() -> dict:
    """The default model's config with 56-pixel crops (16 features a crop instead of 576) and thinner, shallower
    towers: a LLaVA-NeXT that trains in seconds on a CPU (tests, the fine-tuning notebook)."""
    config = copy.deepcopy(RANDOM_CONFIG)
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
