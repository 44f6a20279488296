"""CLIP vision transformer (HF's `CLIPVisionModel`), stopping at the last hidden state LLaVA reads.

Parameter names follow HF's so that the weight table stays a plain rename. Only the layers up to the deepest
selected feature layer exist: CLIP's last layer and `post_layernorm` never influence LLaVA's output.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from .activations import activation
from .config import VisionConfig
from .kernels import get_kernels
from .linear import Linear, stacked_layers


class CLIPEncoderLayer(nn.Module):
    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    kernels: str = "reference"
    differentiable: bool = False  # part of a training network (the kernels' differentiable set)

    @nn.compact
    def __call__(self, x):
        cfg, dt, K = self.cfg, self.dtype, get_kernels(self.kernels, self.differentiable)
        width, heads = cfg.hidden_size, cfg.num_heads
        norm = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=dt, param_dtype=dt, name=name)  # noqa: E731
        linear = lambda n, name: Linear(n, dtype=dt, name=name)  # noqa: E731

        h = norm("layer_norm1")(x)
        q, k, v = (t.astype(dt).reshape(*x.shape[:2], heads, width // heads) for t in K.project(
            h, [linear(width, n)(width) for n in ("q_proj", "k_proj", "v_proj")]))
        attn = K.attention(q, k, v).reshape(x.shape)
        (out,) = K.project(attn, [linear(width, "out_proj")(width)])
        x = x + out.astype(dt)

        h = norm("layer_norm2")(x)
        (h,) = K.project(h, [linear(cfg.intermediate_size, "fc1")(width)])
        (h,) = K.project(activation(cfg.hidden_act)(h.astype(dt)), [linear(width, "fc2")(cfg.intermediate_size)])
        return x + h.astype(dt)


class CLIPVisionTower(nn.Module):
    """pixel_values (n, 3, size, size) -> the hidden states after each of `feature_layers` encoder layers (HF's
    `hidden_states` indices, 0 = the embeddings after `pre_layrnorm`), concatenated on the feature axis:
    (n, 1 + patches, dim * len(feature_layers)). `num_layers` layers exist: the deepest one selected. remat: None
    for inference, else a training network's per-layer rematerialization policy (`llava_jax.remat`)."""

    cfg: VisionConfig
    num_layers: int
    dtype: jnp.dtype = jnp.float32
    kernels: str = "reference"
    feature_layers: tuple[int, ...] = ()  # () = (num_layers,)
    remat: str | None = None

    @nn.compact
    def __call__(self, pixel_values):
        cfg, dt, K = self.cfg, self.dtype, get_kernels(self.kernels, self.remat is not None)
        n, c, size, _ = pixel_values.shape
        p, g = cfg.patch_size, size // cfg.patch_size
        # The patch Conv2d (stride = kernel, no bias) as a matmul over flattened (channel, row, col) patches:
        # the same order as torch's (out, in, kh, kw) weight flattened.
        patches = pixel_values.astype(dt).reshape(n, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(n, g * g, c * p * p)
        (x,) = K.project(patches, [Linear(cfg.hidden_size, use_bias=False, dtype=dt, name="patch_embedding")(
            c * p * p)])
        cls = self.param("class_embedding", nn.initializers.normal(1.0), (cfg.hidden_size,), dt)
        x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, cfg.hidden_size)), x.astype(dt)], axis=1)
        pos = self.param("position_embedding", nn.initializers.normal(1.0), (g * g + 1, cfg.hidden_size), dt)
        x = nn.LayerNorm(cfg.layer_norm_eps, dtype=dt, param_dtype=dt, name="pre_layrnorm")(x + pos[None])

        layer = CLIPEncoderLayer(cfg, dt, self.kernels, self.remat is not None, parent=None)
        layers = stacked_layers(self, "layers", layer, self.num_layers, x[:1, :2])
        run = lambda params, h, _: (layer.apply({"params": params}, h), None)  # noqa: E731
        feature_layers = self.feature_layers or (self.num_layers,)
        if feature_layers == (self.num_layers,):
            return K.scan_layers(run, layers, x, remat=self.remat)[0]
        states, done = {0: x}, 0  # several depths: the stack in segments, keeping the state at each
        for stop in sorted(set(feature_layers) - {0}):
            segment = jax.tree_util.tree_map(lambda a, lo=done, hi=stop: a[lo:hi], layers)
            x, _ = K.scan_layers(run, segment, x, remat=self.remat)
            states[stop], done = x, stop
        return jnp.concatenate([states[i] for i in feature_layers], axis=-1)
