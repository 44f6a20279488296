"""Per-part fp32 parity against transformers: the CLIP tower at the feature layer, the projector, one decoder
layer; at toy widths and at real widths (full CLIP ViT-L/14-336, a 4096-wide Llama layer with 32 heads).

Bounds are relative to the largest reference magnitude, since real-width activations are not of order one.
Both sides are fp32 and differ only in summation order (about sqrt(K) * 6e-8 relative for an inner size K).
Measured: 3e-7 for the toy layers, 5.7e-7 for the 4096-wide layer, 9.5e-7 for 23 layers of ViT-L/14-336.
The bound, 1e-5, leaves a factor of ten over the worst of these; a real error (tanh GELU, a wrong RoPE or
LayerNorm eps) is 1e-3 or more.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from llava_jax.clip import CLIPVisionTower
from llava_jax.config import LlavaConfig, TextConfig, vision_config_from_dict
from llava_jax.llama import DecoderLayer, rope_tables
from llava_jax.model import abstract_params
from llava_jax.network import Projector
from llava_jax.weights import assemble_params

from builders import randomize_

REL_BOUND = 1e-5


def rel_err(out, ref):
    return float(np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)))


def vision_params(hf_vision: CLIPVisionModel, layers_used: int):
    cfg = LlavaConfig(vision=vision_config_from_dict(hf_vision.config.to_dict()), text=TextConfig(
        vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8),
        vision_feature_layer=layers_used)
    abstract = {"vision_tower": abstract_params(cfg)["vision_tower"]}
    items = [(k, "clip", v.numpy) for k, v in hf_vision.state_dict().items()]
    return cfg, assemble_params(items, cfg, abstract, np.float32)["vision_tower"]


@pytest.mark.parametrize(
    "vision_kw, layer",
    [
        (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=56,
              patch_size=14), -2),
        (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=56,
              patch_size=14), 3),
        pytest.param(dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          image_size=336, patch_size=14), -2, marks=pytest.mark.slow, id="ViT-L-14-336"),
    ],
)
def test_vision_tower_feature_layer(vision_kw, layer):
    hf = CLIPVisionModel(CLIPVisionConfig(**vision_kw))
    randomize_(hf, seed=4)
    hf.eval()
    n_layers = vision_kw["num_hidden_layers"]
    used = layer if layer > 0 else n_layers + 1 + layer
    cfg, params = vision_params(hf, used)
    assert params["layers"]["fc1"]["weight"].shape[0] == used  # layers past the feature layer are not loaded
    px = np.random.default_rng(5).standard_normal((1, 3, vision_kw["image_size"], vision_kw["image_size"]))
    px = px.astype(np.float32)
    with torch.no_grad():
        ref = hf(pixel_values=torch.tensor(px), output_hidden_states=True).hidden_states[layer].numpy()
    out = CLIPVisionTower(cfg.vision, used).apply({"params": params}, px)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < REL_BOUND


def test_projector_exact_gelu():
    torch.manual_seed(6)
    lin1, lin2 = torch.nn.Linear(32, 64), torch.nn.Linear(64, 64)
    x = torch.randn(5, 7, 32) * 2
    with torch.no_grad():
        ref = lin2(torch.nn.functional.gelu(lin1(x))).numpy()
    params = {f"linear_{i}": {"weight": lin.weight.detach().numpy(), "bias": lin.bias.detach().numpy()}
              for i, lin in ((1, lin1), (2, lin2))}
    out = np.asarray(Projector(2, 64).apply({"params": params}, x.numpy()))
    assert np.max(np.abs(out - ref)) < 1e-5
    # The tanh approximation differs by ~1e-3 here: the bound above would catch it.
    tanh = lin2(torch.nn.functional.gelu(lin1(x), approximate="tanh")).detach().numpy()
    assert np.max(np.abs(tanh - ref)) > 1e-4


def decoder_layer_case(hidden, heads, kv_heads, mlp, theta, seq, seed):
    hf_cfg = LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         intermediate_size=mlp, rope_theta=theta, rms_norm_eps=1e-5, num_hidden_layers=1,
                         vocab_size=8, max_position_embeddings=4096)
    hf_cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(hf_cfg, layer_idx=0)
    randomize_(layer, seed)
    layer.eval()
    cfg = TextConfig(vocab_size=8, hidden_size=hidden, intermediate_size=mlp, num_layers=1, num_heads=heads,
                     num_kv_heads=kv_heads, head_dim=hidden // heads, rms_norm_eps=1e-5, rope_theta=theta)
    llava_cfg = LlavaConfig(text=cfg, vision=vision_config_from_dict(dict(
        hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1, image_size=14,
        patch_size=14)), vision_feature_layer=1)
    abstract = {"language_model": {"layers": abstract_params(llava_cfg)["language_model"]["layers"]}}
    items = [(f"language_model.model.layers.0.{k}", "hf", v.numpy) for k, v in layer.state_dict().items()]
    params = assemble_params(items, llava_cfg, abstract, np.float32)["language_model"]["layers"]
    params = {k: {n: a[0] for n, a in v.items()} for k, v in params.items()}  # unstack the single layer

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, seq, hidden)).astype(np.float32)
    positions = np.stack([np.arange(seq), np.arange(seq) + 37])  # second row: offset positions
    kv_mask = np.ones((2, seq), bool)
    kv_mask[1, :3] = False  # left padding
    with torch.no_grad():
        rope = LlamaRotaryEmbedding(hf_cfg)
        pos_t = torch.tensor(positions)
        cos_sin = rope(torch.tensor(x), pos_t)
        allowed = torch.tril(torch.ones(seq, seq, dtype=torch.bool))[None] & torch.tensor(kv_mask)[:, None, :]
        add_mask = torch.zeros(2, 1, seq, seq).masked_fill(~allowed[:, None], -math.inf)
        ref = layer(torch.tensor(x), attention_mask=add_mask, position_ids=pos_t, position_embeddings=cos_sin)
        ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
    out, _ = DecoderLayer(cfg).apply({"params": params}, jnp.asarray(x),
                                     rope_tables(jnp.asarray(positions), cfg.head_dim, theta, jnp.float32),
                                     jnp.asarray(kv_mask)[:, None, None, :])
    valid = kv_mask  # query rows of padding see no key in HF (NaN-free garbage), skip them
    return rel_err(np.asarray(out)[valid], ref[valid])


@pytest.mark.parametrize(
    "hidden, heads, kv_heads, mlp, theta",
    [
        (64, 4, 4, 128, 1e4),
        (64, 8, 2, 96, 1e6),
        pytest.param(4096, 32, 32, 11008, 1e4, marks=pytest.mark.slow, id="llama-4096"),
    ],
)
def test_decoder_layer(hidden, heads, kv_heads, mlp, theta):
    assert decoder_layer_case(hidden, heads, kv_heads, mlp, theta, seq=24, seed=7) < REL_BOUND
