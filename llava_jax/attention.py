"""Scaled dot-product attention shared by the vision tower and the decoder.

All of the attention math of the project is here: grouped-query heads, the additive mask, an fp32 softmax.
"""

import jax
import jax.numpy as jnp


def dot_product_attention(q, k, v, mask=None):
    """Softmax attention with grouped-query heads.

    q: (batch, q_len, heads, head_dim); k, v: (batch, kv_len, kv_heads, head_dim) with heads a multiple of
    kv_heads (each kv head serves `heads // kv_heads` consecutive query heads, as in HF's `repeat_kv`).
    mask: bool, broadcastable to (batch, 1, q_len, kv_len); True where a query may attend to a key.
    Returns (batch, q_len, heads, head_dim) in q's dtype.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k) * (head_dim**-0.5)
    scores = scores.astype(jnp.float32)
    if mask is not None:
        # A finite minimum rather than -inf: a query row with no visible key (left padding) yields a uniform
        # average instead of NaN; such rows are never read.
        scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v)
    return out.reshape(batch, q_len, heads, head_dim)
