"""The LLaVA network: CLIP tower -> projector -> (NeXT: `image_newline` packing) -> merge -> language model.

`LlavaNetwork.__call__` is the whole forward pass (token ids and image crops in, logits out): plain,
differentiable math, used for `forward` and for training. Generation runs the same pieces as separate compiled
programs (see `engine.py`): `embed`, `insert_images` (one program per AnyRes pinpoint), `prefill`, `decode_step`.

Images enter as crops plus two host-computed index arrays, so that no shape depends on the data:
- `feature_index` (features,): for each image feature row in sequence order, its row in the flattened encoder
  output (crops * tokens_per_crop), or -1 for LLaVA-NeXT's `image_newline`;
- `feature_positions` (features,): where that row goes in the flattened (batch * seq) token sequence; batch * seq
  (one past the end) marks padding rows, which are dropped.
"""

import flax.linen as nn
import jax.numpy as jnp

from .activations import activation
from .clip import CLIPVisionTower
from .config import LlavaConfig
from .kernels import get_kernels
from .linear import Linear
from .llama import LlamaModel


class Projector(nn.Module):
    """`linear` (depth 1) or `mlp{depth}x_gelu`: Linear, then (activation, Linear) * (depth - 1); the
    activation is the config's `projector_hidden_act` (erf GELU in every released LLaVA)."""

    depth: int
    hidden_size: int
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    kernels: str = "reference"
    act: str = "gelu"

    @nn.compact
    def __call__(self, x):
        K = get_kernels(self.kernels)
        for i in range(1, self.depth + 1):
            if i > 1:
                x = activation(self.act)(x)
            (x,) = K.project(x, [Linear(self.hidden_size, self.use_bias, self.dtype, name=f"linear_{i}")(x.shape[-1])])
            x = x.astype(self.dtype)
        return x


def merge_image_features(embeds, features, feature_positions):
    """Write image feature rows into the embeddings (batch, seq, hidden) at flat positions (batch * seq
    indexing); positions equal to batch * seq are dropped."""
    batch, seq, hidden = embeds.shape
    flat = embeds.reshape(batch * seq, hidden)
    flat = flat.at[feature_positions].set(features.astype(flat.dtype), mode="drop")
    return flat.reshape(batch, seq, hidden)


class LlavaNetwork(nn.Module):
    """remat: None (the default) for inference; a training network sets its per-layer rematerialization policy
    ("none", "dots", "full": `llava_jax.remat`), which also picks the kernels' differentiable set."""

    config: LlavaConfig
    dtype: jnp.dtype = jnp.float32
    kernels: str = "reference"
    remat: str | None = None

    def setup(self):
        cfg, dt = self.config, self.dtype
        self.vision_tower = CLIPVisionTower(cfg.vision, cfg.vision_layers_used, dt, self.kernels,
                                            cfg.vision_feature_layers, self.remat)
        self.multi_modal_projector = Projector(cfg.projector_depth, cfg.text.hidden_size, cfg.projector_bias, dt,
                                               self.kernels, cfg.projector_hidden_act)
        if cfg.has_image_newline:
            self.image_newline = self.param("image_newline", nn.initializers.normal(1.0), (cfg.text.hidden_size,), dt)
        self.language_model = LlamaModel(cfg.text, dt, self.kernels, self.remat)

    def __call__(self, input_ids, attention_mask, positions, crops, feature_index, feature_positions):
        """Logits (batch, seq, vocab) in fp32 of a batch of prompts with their images (see the module
        docstring); attention_mask (batch, seq) is True on real tokens (left padding False)."""
        embeds = self.insert_images(self.embed(input_ids), crops, feature_index, feature_positions)
        hidden, _ = self.language_model(embeds, positions, attention_mask)
        return self.logits(hidden)

    def embed(self, input_ids):
        # Image placeholders (the image token id, or -200 in original checkpoints) are overwritten by
        # `insert_images`; clamp them to a valid row so that the lookup is defined.
        ids = jnp.where((input_ids < 0) | (input_ids >= self.config.text.vocab_size), 0, input_ids)
        return self.language_model.embed(ids)

    def image_features(self, crops, feature_index):
        """Crops (n, 3, size, size) -> the image feature rows `feature_index` selects, (features, hidden)."""
        hidden = self.vision_tower(crops)
        if self.config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]  # drop CLS
        projected = self.multi_modal_projector(hidden)
        rows = jnp.take(projected.reshape(-1, projected.shape[-1]), jnp.maximum(feature_index, 0), axis=0)
        if not self.config.has_image_newline:
            return rows
        return jnp.where((feature_index < 0)[:, None], self.image_newline.astype(rows.dtype), rows)

    def insert_images(self, embeds, crops, feature_index, feature_positions):
        """`embeds` with the image features of `crops` written at `feature_positions`."""
        return merge_image_features(embeds, self.image_features(crops, feature_index), feature_positions)

    def prefill(self, embeds, positions, attention_mask, cache):
        """A prompt through the language model, its keys and values written to `cache` from slot 0; returns
        the final hidden states and the cache."""
        return self.language_model(embeds, positions, attention_mask, cache)

    def decode_step(self, embeds, positions, kv_mask, cache, write_index):
        """New tokens (usually one) at cache slots [write_index, ...), attending over the valid slots
        (`kv_mask` (batch, cache_len)); returns the final hidden states and the cache."""
        return self.language_model(embeds, positions, kv_mask, cache, write_index)

    def logits(self, hidden):
        return self.language_model.logits(hidden)
