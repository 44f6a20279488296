"""The Llama-family language model (Llama/Vicuna, Mistral, Yi): RMSNorm, rotate-half RoPE, grouped-query
attention, SwiGLU, an untied lm_head.

Layers share one set of stacked weights (a leading layer axis), run by `Kernels.scan_layers`, so compile time
does not grow with depth. Two ways through the layers:
- a prompt (`cache` None or a fresh cache, `write_index` None): causal attention over the prompt itself; with a
  cache, its keys and values are also written at slots [0, seq);
- a decode step (`write_index` set): the new keys and values are written at slots [write_index, write_index +
  seq) of the cache, and the queries attend over every valid slot.
The cache is {"k": (layers, batch, cache_len, kv_heads, head_dim), "v": same}.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .activations import activation
from .config import TextConfig
from .kernels import get_kernels
from .linear import Linear, adapter_of, add_low_rank, stacked_layers


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale * x32.astype(x.dtype)


def rope_tables(positions, head_dim: int, theta: float, dtype):
    """cos, sin of shape (batch, seq, head_dim) for integer positions (batch, seq), HF's layout."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x, cos, sin):
    """x: (batch, seq, heads, head_dim); rotate-half convention."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


class DecoderLayer(nn.Module):
    """One decoder layer. `cache`: this layer's part of the KV cache (None: a prompt without a cache);
    `write_index`: None for a prompt (causal attention over itself), else a decode step's first cache slot.
    differentiable: part of a training network (the kernels' differentiable set)."""

    cfg: TextConfig
    dtype: jnp.dtype = jnp.float32
    kernels: str = "reference"
    differentiable: bool = False

    @nn.compact
    def __call__(self, x, rope, mask, cache=None, write_index=None):
        cfg, dt, K = self.cfg, self.dtype, get_kernels(self.kernels, self.differentiable)
        batch, seq, width = x.shape
        hd = cfg.head_dim
        linear = lambda n, name, fan_in=width: Linear(n, use_bias=False, dtype=dt, name=name)(fan_in)  # noqa: E731

        def project(x, *maps):  # maps: (features, name[, fan_in]); LoRA adapters, where the params hold any, added
            outs = K.project(x, [linear(*m) for m in maps])
            return add_low_rank(x, outs, [adapter_of(self, m[1]) for m in maps])

        h = RMSNorm(cfg.rms_norm_eps, dt, name="input_layernorm")(x)
        q, k, v = project(h, (cfg.num_heads * hd, "q_proj"), (cfg.num_kv_heads * hd, "k_proj"),
                          (cfg.num_kv_heads * hd, "v_proj"))
        q = q.astype(dt).reshape(batch, seq, cfg.num_heads, hd)
        k = k.astype(dt).reshape(batch, seq, cfg.num_kv_heads, hd)
        v = v.astype(dt).reshape(batch, seq, cfg.num_kv_heads, hd)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if write_index is None:  # a prompt: attend over itself; keep its keys and values for decoding
            attn = K.attention(q, k, v, mask, causal=True)
            if cache is not None:
                *_, cache = K.write_cache(cache, k, v, 0)
        else:
            keys, values, cache = K.write_cache(cache, k, v, write_index)
            attn = K.attention(q, keys.astype(dt), values.astype(dt), mask)
        (out,) = project(attn.reshape(batch, seq, -1), (width, "o_proj", cfg.num_heads * hd))
        x = x + out.astype(dt)

        h = RMSNorm(cfg.rms_norm_eps, dt, name="post_attention_layernorm")(x)
        gate, up = project(h, (cfg.intermediate_size, "gate_proj"), (cfg.intermediate_size, "up_proj"))
        h = activation(cfg.hidden_act)(gate.astype(dt)) * up.astype(dt)
        (out,) = project(h, (width, "down_proj", cfg.intermediate_size))
        return x + out.astype(dt), cache


def init_cache(cfg: TextConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
    """An empty KV cache {"k", "v"}: (layers, batch, length, kv_heads, head_dim)."""
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


class LlamaModel(nn.Module):
    """Token embeddings, the decoder layers, the final norm and the lm_head. remat: None for inference, else a
    training network's per-layer rematerialization policy (`llava_jax.remat`)."""

    cfg: TextConfig
    dtype: jnp.dtype = jnp.float32
    kernels: str = "reference"
    remat: str | None = None

    def setup(self):
        cfg, dt = self.cfg, self.dtype
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=dt)
        one = jnp.zeros((1, 1), jnp.int32)
        example = (jnp.zeros((1, 1, cfg.hidden_size), dt), rope_tables(one, cfg.head_dim, cfg.rope_theta, dt),
                   jnp.ones((1, 1, 1, 1), bool))
        self.layers = stacked_layers(self, "layers", self._layer(), cfg.num_layers, *example)
        self.norm = RMSNorm(cfg.rms_norm_eps, dt)
        self.lm_head = Linear(cfg.vocab_size, use_bias=False, dtype=dt)

    def _layer(self) -> DecoderLayer:
        return DecoderLayer(self.cfg, self.dtype, self.kernels, self.remat is not None, parent=None)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def __call__(self, embeds, positions, kv_mask, cache=None, write_index=None):
        """Run the layers on `embeds` (batch, seq, hidden) at `positions` (batch, seq); returns the final-normed
        hidden states and the cache. kv_mask (batch, keys): True where a key holds a real token: the prompt's
        own tokens for a prompt, the cache slots for a decode step (see the module docstring)."""
        cfg = self.cfg
        rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta, self.dtype)
        mask = kv_mask[:, None, None, :]
        layer = self._layer()

        def run_layer(params, h, layer_cache):
            return layer.apply({"params": params}, h, rope, mask, layer_cache, write_index)

        x, cache = get_kernels(self.kernels, self.remat is not None).scan_layers(
            run_layer, self.layers, embeds.astype(self.dtype), cache, self.remat)
        return self.norm(x), cache

    def logits(self, hidden):
        """fp32 logits: accumulated in fp32, not rounded to a 16-bit param dtype."""
        (out,) = get_kernels(self.kernels, self.remat is not None).project(hidden, [self.lm_head(self.cfg.hidden_size)])
        return out
