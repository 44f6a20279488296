"""Llama-family decoder (Vicuna, Mistral, Yi): RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU.

Layers run under `nn.scan` with their weights stacked on a leading layer axis, so compile time does not grow
with depth. Every call goes through a preallocated KV cache:

    cache = {"k": (layers, batch, cache_len, kv_heads, head_dim), "v": same}

A call with `s` new tokens writes their keys and values at cache slots [write_index, write_index + s) and
attends over the whole cache, restricted by `kv_mask` (batch, cache_len): True where a slot holds a real token
(left padding and unwritten slots are False). Prefill is a call with the prompt at write_index 0, a decode step
a call with one token.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .activations import activation
from .attention import causal_self_attention, dot_product_attention
from .config import TextConfig
from .layers import Dense, DenseParams, fused_dense, scan_stacked, zero_copy_put


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


def update_slice(buffer, update, start):
    """`dynamic_update_slice`, in place. A 16-bit float buffer is updated through a uint16 view: XLA:CPU
    otherwise widens the whole buffer to fp32 and back when the update's producer fuses into it (a full copy
    of the KV cache per layer per decode step)."""
    update = update.astype(buffer.dtype)
    if buffer.dtype.itemsize == 2 and jnp.issubdtype(buffer.dtype, jnp.floating):
        bits = jax.lax.dynamic_update_slice(jax.lax.bitcast_convert_type(buffer, jnp.uint16),
                                            jax.lax.bitcast_convert_type(update, jnp.uint16), start)
        return jax.lax.bitcast_convert_type(bits, buffer.dtype)
    return jax.lax.dynamic_update_slice(buffer, update, start)


class DecoderLayer(nn.Module):
    """One decoder layer. `layer_cache` is this layer's {"k", "v"} (batch, cache_len, kv_heads, head_dim), or,
    with `layer_index` set, the whole stacked cache, of which the layer writes and reads slot `layer_index`
    (the unrolled decode path: the new keys go straight into the stacked buffer)."""

    cfg: TextConfig
    dtype: jnp.dtype = jnp.float32
    layer_index: int | None = None

    @nn.compact
    def __call__(self, x, layer_cache, rope, mask, write_index):
        cfg, dt = self.cfg, self.dtype
        dense = lambda n, name: Dense(n, use_bias=False, dtype=dt, name=name)  # noqa: E731
        batch, seq, _ = x.shape
        hd = cfg.head_dim

        proj = lambda n, name: DenseParams(n, use_bias=False, dtype=dt, name=name)(cfg.hidden_size)  # noqa: E731
        fuse = seq > 1  # a prompt: fused matmuls; a decode step: each weight read where it lies

        h = RMSNorm(cfg.rms_norm_eps, dt, name="input_layernorm")(x)
        q, k, v = fused_dense(h, [proj(cfg.num_heads * hd, "q_proj"), proj(cfg.num_kv_heads * hd, "k_proj"),
                                  proj(cfg.num_kv_heads * hd, "v_proj")], dt, fuse)
        q = q.reshape(batch, seq, cfg.num_heads, hd)
        k = k.reshape(batch, seq, cfg.num_kv_heads, hd)
        v = v.reshape(batch, seq, cfg.num_kv_heads, hd)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = k.astype(layer_cache["k"].dtype), v.astype(layer_cache["v"].dtype)
        if self.layer_index is None:
            cache_k = update_slice(layer_cache["k"], k, (0, write_index, 0, 0))
            cache_v = update_slice(layer_cache["v"], v, (0, write_index, 0, 0))
            keys, values = cache_k, cache_v
        else:
            start = (self.layer_index, 0, write_index, 0, 0)
            cache_k = update_slice(layer_cache["k"], k[None], start)
            cache_v = update_slice(layer_cache["v"], v[None], start)
            keys, values = cache_k[self.layer_index], cache_v[self.layer_index]
        if isinstance(write_index, int) and write_index == 0 and seq > 1:
            # a prompt into an empty cache: its keys are exactly the new ones, slots past `seq` are all masked
            attn = causal_self_attention(q, k.astype(dt), v.astype(dt), mask[..., :seq])
        else:
            attn = dot_product_attention(q, keys.astype(dt), values.astype(dt), mask)
        x = x + dense(cfg.hidden_size, "o_proj")(attn.reshape(batch, seq, -1))

        h = RMSNorm(cfg.rms_norm_eps, dt, name="post_attention_layernorm")(x)
        gate, up = fused_dense(h, [proj(cfg.intermediate_size, "gate_proj"), proj(cfg.intermediate_size, "up_proj")],
                               dt, fuse)
        h = activation(cfg.hidden_act)(gate) * up  # [issue14] the config's activation (was: silu only)
        x = x + dense(cfg.hidden_size, "down_proj")(h)
        return x, {"k": cache_k, "v": cache_v}


def attention_mask(kv_mask, write_index, seq_len):
    """(batch, 1, seq, cache_len) bool: causal over cache slots, restricted to valid slots."""
    cache_len = kv_mask.shape[-1]
    q_slot = write_index + jnp.arange(seq_len)
    causal = jnp.arange(cache_len)[None, :] <= q_slot[:, None]
    return (causal[None] & kv_mask[:, None, :])[:, None]


def init_cache(cfg: TextConfig, batch: int, length: int, dtype=jnp.float32):
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


class LlamaDecoder(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg, dt = self.cfg, self.dtype
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=dt)
        self.layers = nn.scan(
            DecoderLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
        )(cfg, dt)
        self.norm = RMSNorm(cfg.rms_norm_eps, dt)
        self.lm_head = Dense(cfg.vocab_size, use_bias=False, dtype=dt, fp32_result=True)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def __call__(self, embeds, positions, kv_mask, cache, write_index):
        """Run the layers on `embeds` (batch, seq, hidden); returns final-normed hidden states and the cache."""
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, self.dtype)
        mask = attention_mask(kv_mask, write_index, embeds.shape[1])
        x = embeds.astype(self.dtype)
        layers = self.get_variable("params", "layers") if self.has_variable("params", "layers") else None
        if isinstance(layers, list | tuple):
            # per-layer params (`unstack_layers`): layers unrolled, each reading its own weights in place
            for i, layer_params in enumerate(layers):
                x, cache = DecoderLayer(self.cfg, self.dtype, layer_index=i, parent=None).apply(
                    {"params": layer_params}, x, cache, (cos, sin), mask, write_index)
            return self.norm(x), cache
        if layers is not None:  # (the nn.scan below only creates the params, at init)
            x, cache = scan_stacked(DecoderLayer(self.cfg, self.dtype, parent=None), layers, x, cache, (cos, sin),
                                    mask, write_index)
            return self.norm(x), cache
        x, cache = self.layers(x, cache, (cos, sin), mask, write_index)
        return self.norm(x), cache

    def logits(self, hidden):
        """fp32 logits: accumulated in fp32 and not rounded to a low param dtype."""
        return self.lm_head(hidden)


def unstack_layers(params: dict) -> dict | None:
    """`params` with `language_model/layers` split into one dict per layer, each array a view of the stacked
    one (no copy), or None where views are impossible (not a single-device CPU array).

    Why: inside a compiled loop over layers (`nn.scan`, or a decode step), taking layer i of a stacked weight is
    a dynamic slice that XLA:CPU materializes, so a batch-1 decode step would read every weight three times
    (read, write the copy, read it). With per-layer arrays the unrolled decode step reads each weight once.
    """
    layers = params["language_model"]["layers"]
    leaves, treedef = jax.tree_util.tree_flatten(layers)
    host = []
    for leaf in leaves:
        if not isinstance(leaf, jax.Array) or len(leaf.devices()) != 1 or leaf.device.platform != "cpu":
            return None
        host.append(np.asarray(leaf))  # zero-copy view of the CPU buffer
    device = leaves[0].device
    per_layer = []
    for i in range(host[0].shape[0]):
        views = [zero_copy_put(h[i], device) for h in host]
        if any(v is None for v in views):
            return None  # jax would copy: per-layer arrays would double the decoder's memory
        per_layer.append(jax.tree_util.tree_unflatten(treedef, views))
    return {**params, "language_model": {**params["language_model"], "layers": per_layer}}
