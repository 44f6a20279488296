"""The benchmark's checkpoints: `llava-jax bench --make-checkpoint DIR --shape tinyllava|7b|tiny`.

A deterministic random-weight llava-hf LLaVA-NeXT with the full CLIP ViT-L/14-336 tower and a TinyLlama-1.1B
shaped decoder (`--shape 7b`: llava-v1.6-vicuna-7b's shape; `--shape tiny`: a toy for tests), written without a
hub by `random_checkpoint.write_random_checkpoint` (tensors generated and written one at a time, in row blocks,
into safetensors shards: the model is never in memory), plus the Mistral tokenizer and the processor files HF's
`AutoProcessor` needs.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)
SHAPES = {
    # TinyLlama-1.1B's decoder (vocab 32064 as llava-hf checkpoints have it: 32000 pieces, <image>, <pad>,
    # rounded up to a multiple of 64) under the full CLIP ViT-L/14-336 tower: about 1.4 B parameters.
    "tinyllava": dict(
        vision=CLIP_L_336,
        text=dict(vocab_size=32064, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                  num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096),
        pinpoints=PINPOINTS,
    ),
    # llava-hf/llava-v1.6-vicuna-7b-hf: about 7.1 B parameters.
    "7b": dict(
        vision=CLIP_L_336,
        text=dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
        pinpoints=PINPOINTS,
    ),
    # llava-hf/llava-v1.6-34b-hf (Nous-Hermes-2-Yi-34B's decoder): about 34.8 B parameters.
    "34b": dict(
        vision=CLIP_L_336,
        text=dict(vocab_size=64064, hidden_size=7168, intermediate_size=20480, num_hidden_layers=60,
                  num_attention_heads=56, num_key_value_heads=8, max_position_embeddings=4096),
        pinpoints=PINPOINTS,
    ),
    # a toy with the same structure, for tests: 56-pixel crops of 4x4 patches
    "tiny": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                    image_size=56, patch_size=14, projection_dim=16),
        text=dict(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
        pinpoints=[[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]],
    ),
}


def checkpoint_config(shape: str, dtype: str = "float16") -> dict:
    """The llava-hf `config.json` of a benchmark shape."""
    s = SHAPES[shape]
    text = {
        "model_type": "llama", "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, **s["text"],
    }
    vision = {"model_type": "clip_vision_model", "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
              "num_channels": 3, **s["vision"]}
    return {
        "architectures": ["LlavaNextForConditionalGeneration"],
        "model_type": "llava_next",
        "_name_or_path": f"llava-jax/bench-random-{shape}",
        "image_token_index": 32000,
        "image_grid_pinpoints": s["pinpoints"],
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
        "dtype": dtype,
        "text_config": text,
        "vision_config": vision,
    }


def _write_tokenizer(path: Path) -> None:
    """The Mistral SentencePiece tokenizer (offline, from mistral-common) with `<image>` = 32000 and
    `<pad>` = 32001, saved with transformers like llava-hf's tokenizers."""
    from transformers import AutoTokenizer

    from ..prompt import mistral_tokenizer_dir

    with tempfile.TemporaryDirectory() as tmp:
        tok = AutoTokenizer.from_pretrained(str(mistral_tokenizer_dir(tmp)))
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        tok.add_special_tokens({"pad_token": "<pad>"})
        if tok.convert_tokens_to_ids("<image>") != 32000 or tok.convert_tokens_to_ids("<pad>") != 32001:
            raise RuntimeError("unexpected ids for <image>/<pad> in the Mistral tokenizer")
        tok.save_pretrained(str(path))


def _write_processor_files(path: Path, config: dict) -> None:
    """preprocessor_config.json / processor_config.json as llava-hf repos have them (for HF's AutoProcessor)."""
    v = config["vision_config"]
    size = v["image_size"]
    pre = {
        "image_processor_type": "LlavaNextImageProcessor", "processor_class": "LlavaNextProcessor",
        "crop_size": {"height": size, "width": size}, "size": {"shortest_edge": size},
        "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
        "do_resize": True, "do_pad": True, "image_grid_pinpoints": config["image_grid_pinpoints"],
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "rescale_factor": 1 / 255,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    proc = {"processor_class": "LlavaNextProcessor", "patch_size": v["patch_size"], "image_token": "<image>",
            "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    (path / "processor_config.json").write_text(json.dumps(proc, indent=2))


def make_checkpoint(path, shape: str = "tinyllava", dtype: str = "float16", seed: int = 0,
                    shard_bytes: int | None = None, log=None) -> Path:
    """Write a deterministic random-weight llava-hf LLaVA-NeXT checkpoint of `shape` into `path`, with the
    Mistral tokenizer and the processor files HF's `AutoProcessor` needs. Memory stays at one block of one
    tensor whatever the model size (`random_checkpoint.write_random_checkpoint`)."""
    from ..random_checkpoint import SHARD_BYTES, write_random_checkpoint

    path = Path(path)
    config = checkpoint_config(shape, dtype)
    params = write_random_checkpoint(path, config, dtype, seed, shard_bytes or SHARD_BYTES, log)
    _write_tokenizer(path)
    _write_processor_files(path, config)
    if log:
        log(f"{path}: {shape} LLaVA-NeXT, {params / 1e9:.3f} B parameters of {dtype}")
    return path
