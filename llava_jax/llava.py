"""The LLaVA model as one Flax module: CLIP tower -> projector -> (NeXT: packing with `image_newline`) -> decoder.

Each stage is its own method so that it can be jitted on its own static shapes: the vision tower per crop
bucket, the decoder per prompt-length bucket and per decode step. Merging image features into the token
embeddings is a scatter at host-computed positions (`merge_image_features`), never a data-dependent shape.
"""

import flax.linen as nn
import jax.numpy as jnp

from .activations import activation
from .clip import CLIPVisionTower
from .config import LlavaConfig
from .layers import Dense
from .llama import LlamaDecoder


class Projector(nn.Module):
    """`linear` (depth 1) or `mlp{depth}x_gelu`: Linear, then (activation, Linear) * (depth - 1)."""

    depth: int
    hidden_size: int
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    act: str = "gelu"  # [issue14] the config's projector_hidden_act (exact erf GELU in LLaVA)

    @nn.compact
    def __call__(self, x):
        for i in range(1, self.depth + 1):
            if i > 1:
                x = activation(self.act)(x)  # [issue14] was: jax.nn.gelu(x, approximate=False)
            x = Dense(self.hidden_size, use_bias=self.use_bias, dtype=self.dtype, name=f"linear_{i}")(x)
        return x


class Llava(nn.Module):
    config: LlavaConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg, dt = self.config, self.dtype
        # [issue14] feature_layers: the selected hidden states, concatenated; projector activation from the config
        self.vision_tower = CLIPVisionTower(cfg.vision, cfg.vision_layers_used, dt, cfg.vision_feature_layers)
        self.multi_modal_projector = Projector(cfg.projector_depth, cfg.text.hidden_size, cfg.projector_bias, dt,
                                               cfg.projector_hidden_act)
        if cfg.has_image_newline:  # [issue14] was: model_type == "llava_next" (anyres + flat has no newline)
            self.image_newline = self.param("image_newline", nn.initializers.normal(1.0), (cfg.text.hidden_size,), dt)
        self.language_model = LlamaDecoder(cfg.text, dt)

    def encode_images(self, pixel_values):
        """(crops, 3, size, size) -> projected features (crops, tokens_per_crop, hidden)."""
        hidden = self.vision_tower(pixel_values)
        if self.config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]  # drop CLS
        return self.multi_modal_projector(hidden)

    def pack_features(self, features, feature_index):
        """Gather packed NeXT image tokens: features (rows, hidden) flattened over crops; index -1 = newline."""
        rows = jnp.take(features, jnp.maximum(feature_index, 0), axis=0)
        if not self.config.has_image_newline:  # [issue14] was: model_type != "llava_next"
            return rows
        return jnp.where((feature_index < 0)[:, None], self.image_newline.astype(rows.dtype), rows)

    def embed(self, input_ids):
        # Image placeholders (the image token id, or -200 in original checkpoints) get overwritten later;
        # clamp them to a valid row so the lookup is defined.
        ids = jnp.where((input_ids < 0) | (input_ids >= self.config.text.vocab_size), 0, input_ids)
        return self.language_model.embed(ids)

    def decode(self, embeds, positions, kv_mask, cache, write_index):
        return self.language_model(embeds, positions, kv_mask, cache, write_index)

    def logits(self, hidden):
        return self.language_model.logits(hidden)

    def __call__(self, input_ids, pixel_values, feature_index, positions, kv_mask, cache):
        """Touches every parameter once; used by `init` only."""
        feats = self.encode_images(pixel_values)
        packed = self.pack_features(feats.reshape(-1, feats.shape[-1]), feature_index)
        embeds = self.embed(input_ids) + packed.sum() * 0
        hidden, cache = self.decode(embeds, positions, kv_mask, cache, 0)
        return self.logits(hidden), cache


def merge_image_features(embeds, features, flat_positions):
    """Write image feature rows into the embeddings at flat positions (batch * seq indexing).

    Positions equal to batch * seq (padding of a fixed-size buffer) are dropped.
    """
    batch, seq, hidden = embeds.shape
    flat = embeds.reshape(batch * seq, hidden)
    flat = flat.at[flat_positions].set(features.astype(flat.dtype), mode="drop")
    return flat.reshape(batch, seq, hidden)
