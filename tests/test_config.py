"""Config parsing: llava-hf (transformers 5 save_pretrained) and original-LLaVA layouts; clear errors."""

import json

import pytest

from llava_jax.config import ConfigError, LlavaConfig, config_from_dict, load_config

from builders import build_llava

ORIGINAL_16_MISTRAL = {  # abridged from liuhaotian/llava-v1.6-mistral-7b config.json
    "architectures": ["LlavaMistralForCausalLM"],
    "model_type": "llava_mistral",
    "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
    "max_position_embeddings": 32768, "vocab_size": 32000, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2,
    "image_aspect_ratio": "anyres", "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336],
                                                             [336, 1008]],
    "mm_hidden_size": 1024, "mm_patch_merge_type": "spatial_unpad", "mm_projector_type": "mlp2x_gelu",
    "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_use_im_start_end": False,
}
ORIGINAL_15 = {  # abridged from liuhaotian/llava-v1.5-7b config.json
    "model_type": "llava", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05, "max_position_embeddings": 4096,
    "vocab_size": 32000, "tie_word_embeddings": False, "image_aspect_ratio": "pad", "mm_hidden_size": 1024,
    "mm_projector_type": "mlp2x_gelu", "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336",
}


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_hf_config_from_save_pretrained(tmp_path, kind):
    build_llava(kind, "gqa").config.save_pretrained(tmp_path)
    cfg = load_config(str(tmp_path))
    assert cfg.model_type == kind and cfg.layout == "hf" and cfg.semantics == "hf"
    assert cfg.image_token_id == 250
    assert (cfg.text.num_heads, cfg.text.num_kv_heads, cfg.text.rope_theta) == (4, 2, 1e6)
    assert (cfg.vision.hidden_size, cfg.vision.num_layers, cfg.vision.image_size) == (32, 3, 56)
    assert cfg.vision_layers_used == 2
    assert cfg.image_aspect_ratio == ("anyres" if kind == "llava_next" else "crop")
    if kind == "llava_next":
        assert cfg.image_grid_pinpoints[0] == (56, 112) and cfg.patch_merge_type == "spatial_unpad"


def test_original_configs():
    nxt = config_from_dict(ORIGINAL_16_MISTRAL, name="llava-v1.6-mistral-7b")
    assert nxt.model_type == "llava_next" and nxt.layout == "original" and nxt.semantics == "original"
    assert nxt.text.model_type == "mistral" and nxt.text.num_kv_heads == 8 and nxt.text.rope_theta == 1e6
    assert nxt.vision.image_size == 336 and nxt.vision.num_layers == 24 and nxt.vision_layers_used == 23
    assert nxt.image_token_id == -200 and nxt.image_grid_pinpoints[3] == (1008, 336)
    v15 = config_from_dict(ORIGINAL_15)
    assert v15.model_type == "llava" and v15.image_aspect_ratio == "pad" and v15.text.rope_theta == 1e4
    assert v15.projector_depth == 2


def test_original_config_with_local_vision_tower(tmp_path):
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps(
        {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
         "num_attention_heads": 4, "image_size": 56, "patch_size": 14}))
    cfg = config_from_dict({**ORIGINAL_15, "mm_vision_tower": str(tmp_path / "clip")})
    assert cfg.vision.hidden_size == 32
    with pytest.raises(ConfigError, match="neither a known CLIP"):
        config_from_dict({**ORIGINAL_15, "mm_vision_tower": str(tmp_path / "nowhere")})


def test_round_trip_of_normalized_config():
    cfg = config_from_dict(ORIGINAL_16_MISTRAL)
    assert LlavaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mm_projector_type": "resampler"}, "projector type 'resampler' is not supported"),
        ({"mm_projector_type": "mlp3x_relu"}, "projector type 'mlp3x_relu'"),
        ({"mm_vision_select_layer": [-2, -5]}, "original code indexes hidden_states with it and fails on a list"),
        ({"mm_vision_select_layer": -30}, "is not a hidden state of the tower's 24 layers"),
        ({"mm_vision_select_layer": -25}, "selects only the embeddings"),
        ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature='cls'"),
        ({"image_aspect_ratio": "anyres_max_9"}, "image_aspect_ratio='anyres_max_9'"),
        ({"mm_patch_merge_type": "spatial"}, "mm_patch_merge_type='spatial'"),
        ({"mm_vision_tower": "google/siglip-so400m"}, "neither a known CLIP"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE scaling"),
        ({"sliding_window": 4096}, "sliding_window=4096"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
    ],
)
def test_unsupported_original_values_raise(change, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({**ORIGINAL_16_MISTRAL, **change})


def test_unsupported_hf_values_raise():
    hf = build_llava("llava_next", "mha").config.to_dict()
    with pytest.raises(ConfigError, match=r"vision_feature_layer=\(-2, 4\) is not a hidden state"):
        config_from_dict({**hf, "vision_feature_layer": [-2, 4]})
    with pytest.raises(ConfigError, match=r"projector_hidden_act='xielu' is not supported \(supported: .*gelu_pytorch_tanh"):
        config_from_dict({**hf, "projector_hidden_act": "xielu"})
    with pytest.raises(ConfigError, match="decoder hidden_act='prelu' is not supported"):
        config_from_dict({**hf, "text_config": {**hf["text_config"], "hidden_act": "prelu"}})
    with pytest.raises(ConfigError, match="vision hidden_act='nope' is not supported"):
        config_from_dict({**hf, "vision_config": {**hf["vision_config"], "hidden_act": "nope"}})
    with pytest.raises(ConfigError, match="transformers' LlavaNext forward itself raises on 'full'"):
        config_from_dict({**hf, "vision_feature_select_strategy": "full"})
    with pytest.raises(ConfigError, match="neither a llava-hf config"):
        config_from_dict({"model_type": "qwen2_vl"})


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_hf_variants_accepted(kind):
    """Configs transformers runs: other activations, several feature layers (HF hidden_states indices)."""
    hf = build_llava(kind, "mha").config.to_dict()
    hf["text_config"]["hidden_act"] = "gelu"
    hf["vision_config"]["hidden_act"] = "gelu_new"
    cfg = config_from_dict({**hf, "projector_hidden_act": "gelu_pytorch_tanh", "vision_feature_layer": [-2, -4, 1]})
    assert (cfg.text.hidden_act, cfg.vision.hidden_act, cfg.projector_hidden_act) == ("gelu", "gelu_new",
                                                                                     "gelu_pytorch_tanh")
    # 3 layers, 4 hidden states: -2 is after layer 2, -4 the embeddings (after 0 layers), 1 after layer 1
    assert cfg.vision_feature_layer == (-2, -4, 1) and cfg.vision_feature_layers == (2, 0, 1)
    assert cfg.vision_layers_used == 2 and cfg.projector_input_size == 3 * 32
    assert LlavaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    single = config_from_dict(build_llava(kind, "mha").config.to_dict())
    assert single.vision_feature_layer == -2 and single.vision_feature_layers == (2,)
    assert LlavaConfig.from_dict(json.loads(json.dumps(single.to_dict()))) == single


@pytest.mark.parametrize(
    "aspect, merge, model_type, newline",
    [("anyres", "flat", "llava_next", False), ("anyres", "spatial_unpad", "llava_next", True),
     ("pad", "spatial_unpad", "llava", False), ("pad", "flat", "llava", False), ("square", "spatial_unpad", "llava",
                                                                                 False)],
)
def test_original_merge_variants(aspect, merge, model_type, newline):
    """Every aspect/merge pair the original llava_arch runs (without anyres it never reads the merge type)."""
    cfg = config_from_dict({**ORIGINAL_16_MISTRAL, "image_aspect_ratio": aspect, "mm_patch_merge_type": merge})
    assert cfg.model_type == model_type and cfg.has_image_newline == newline
    assert cfg.patch_merge_type == (merge if aspect == "anyres" else "flat")


def test_image_processor_sizes(tmp_path):
    build_llava("llava", "mha").config.save_pretrained(tmp_path)
    assert load_config(str(tmp_path)).image_resize is None
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 64},
                                                                   "crop_size": {"height": 56, "width": 56}}))
    cfg = load_config(str(tmp_path))
    assert cfg.image_resize == 64 and cfg.resize_size == 64 and cfg.vision.image_size == 56
    for bad, message in [({"crop_size": 48}, "crop_size 48 differs from the vision tower's image_size 56"),
                         ({"size": {"shortest_edge": 50}}, "size 50 is smaller than its crop size 56"),
                         ({"size": {"height": 64, "width": 64}}, "give shortest_edge")]:
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=message):
            load_config(str(tmp_path))
