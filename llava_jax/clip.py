"""CLIP vision transformer, stopping at LLaVA's feature layer.

Parameter names follow HF's `CLIPVisionModel` so that the weight table stays a plain rename. Only the layers up
to the selected feature layer exist: the last layer and `post_layernorm` never influence LLaVA's output.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from .activations import activation
from .attention import dot_product_attention
from .config import VisionConfig
from .layers import Dense, DenseParams, fused_dense, scan_stacked


class CLIPEncoderLayer(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, _=None):
        cfg, dt = self.cfg, self.dtype
        heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        dense = lambda n, name: Dense(n, dtype=dt, name=name)  # noqa: E731
        norm = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=dt, param_dtype=dt, name=name)  # noqa: E731

        h = norm("layer_norm1")(x)
        split = lambda t: t.reshape(*t.shape[:2], heads, head_dim)  # noqa: E731
        qkv = [DenseParams(cfg.hidden_size, dtype=dt, name=n)(cfg.hidden_size) for n in ("q_proj", "k_proj", "v_proj")]
        q, k, v = (split(t) for t in fused_dense(h, qkv, dt))
        attn = dot_product_attention(q, k, v).reshape(x.shape)
        x = x + dense(cfg.hidden_size, "out_proj")(attn)

        h = norm("layer_norm2")(x)
        act = activation(cfg.hidden_act)  # [issue14] the config's activation (was: quick_gelu only)
        h = dense(cfg.hidden_size, "fc2")(act(dense(cfg.intermediate_size, "fc1")(h)))
        return x + h, None


class CLIPVisionTower(nn.Module):
    """pixel_values (n, 3, size, size) -> hidden state after `num_layers` encoder layers, (n, 1 + patches, dim).

    [issue14] With `feature_layers` (layer counts, `LlavaConfig.vision_feature_layers`): the hidden states after
    each of those many layers, concatenated on the feature axis, (n, 1 + patches, dim * len(feature_layers)).
    """

    cfg: VisionConfig
    num_layers: int
    dtype: jnp.dtype = jnp.float32
    feature_layers: tuple[int, ...] = ()  # [issue14] () = (num_layers,)

    @nn.compact
    def __call__(self, pixel_values):
        cfg, dt = self.cfg, self.dtype
        n, c, size, _ = pixel_values.shape
        p, g = cfg.patch_size, size // cfg.patch_size
        # The patch Conv2d (stride = kernel, no bias) as a matmul over flattened (channel, row, col) patches:
        # the same order as torch's (out, in, kh, kw) weight flattened.
        patches = pixel_values.astype(dt).reshape(n, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(n, g * g, c * p * p)
        x = Dense(cfg.hidden_size, use_bias=False, dtype=dt, name="patch_embedding")(patches)
        cls = self.param("class_embedding", nn.initializers.normal(1.0), (cfg.hidden_size,), dt)
        x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, cfg.hidden_size)), x], axis=1)
        pos = self.param("position_embedding", nn.initializers.normal(1.0), (g * g + 1, cfg.hidden_size), dt)
        x = x + pos[None]
        x = nn.LayerNorm(cfg.layer_norm_eps, dtype=dt, param_dtype=dt, name="pre_layrnorm")(x)
        feature_layers = self.feature_layers or (self.num_layers,)  # [issue14]
        if self.has_variable("params", "layers"):  # see `scan_stacked`; the nn.scan below creates the params
            # [issue14] run the stack in segments, keeping the hidden state at each selected depth
            stacked, states, done = self.get_variable("params", "layers"), {0: x}, 0
            for stop in sorted(set(feature_layers) - {0}):
                segment = stacked if (done, stop) == (0, self.num_layers) else jax.tree_util.tree_map(
                    lambda a, lo=done, hi=stop: a[lo:hi], stacked)
                x, _ = scan_stacked(CLIPEncoderLayer(cfg, dt, parent=None), segment, x, None)
                states[stop], done = x, stop
            return jnp.concatenate([states[i] for i in feature_layers], axis=-1)
        layers = nn.scan(
            CLIPEncoderLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.num_layers,
        )(cfg, dt, name="layers")
        x, _ = layers(x, None)
        return jnp.concatenate([x] * len(feature_layers), axis=-1)  # [issue14] init only: the output's shape
