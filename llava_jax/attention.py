"""Scaled dot-product attention shared by the vision tower and the decoder.

All of the attention math of the project is here: grouped-query heads, the additive mask, an fp32 softmax.
"""

import jax
import jax.numpy as jnp

MIN = jnp.finfo(jnp.float32).min


def dot_product_attention(q, k, v, mask=None):
    """Softmax attention with grouped-query heads.

    q: (batch, q_len, heads, head_dim); k, v: (batch, kv_len, kv_heads, head_dim) with heads a multiple of
    kv_heads (each kv head serves `heads // kv_heads` consecutive query heads, as in HF's `repeat_kv`).
    mask: bool, broadcastable to (batch, 1, q_len, kv_len); True where a query may attend to a key.
    Returns (batch, q_len, heads, head_dim) in q's dtype.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    if q_len > 1:
        qh, kh, vh = _heads_first(q, k, v)
        return _heads_last(_attend(qh, kh, vh, mask), q.dtype)
    if kv_heads <= 8:
        return _one_query_attention(q, k, v, mask)
    # One query (a decode step) over many kv heads: the plain formulation.
    q = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
    # fp32 accumulation (`preferred_element_type`): exact for fp32, and XLA:CPU's fast path for bf16
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32) * (head_dim**-0.5)
    if mask is not None:
        # A finite minimum rather than -inf: a query row with no visible key (left padding) yields a uniform
        # average instead of NaN; such rows are never read.
        scores = jnp.where(mask[:, :, None], scores, MIN)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)


def _heads_first(q, k, v):
    """q -> (batch, kv_heads, group, q_len, head_dim), scaled by 1/sqrt(head_dim); k, v -> (batch, kv_heads,
    kv_len, head_dim). Both matmuls then have the heads as batch dimensions and write their natural layout
    (with q, k in the cache's layout XLA:CPU computes the scores key-major and transposes them after)."""
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = (q.astype(jnp.float32) * head_dim**-0.5).astype(q.dtype)
    qh = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    return qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _heads_last(out, dtype):
    batch, kv_heads, group, q_len, head_dim = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, kv_heads * group, head_dim).astype(dtype)


def _attend(qh, kh, vh, mask):
    """Heads-first attention: qh (b, kv_heads, g, q_len, d) pre-scaled, kh, vh (b, kv_heads, kv_len, d); fp32
    (b, kv_heads, g, q_len, d). The softmax is normalized after the value matmul (on q_len x d, not on the
    q_len x kv_len probabilities)."""
    b, kvh, g, ql, d = qh.shape
    batch_dims = ((0, 1), (0, 1))
    s = jax.lax.dot_general(qh.reshape(b, kvh, g * ql, d), kh, (((3,), (3,)), batch_dims),
                            preferred_element_type=jnp.float32).reshape(b, kvh, g, ql, -1)
    if mask is not None:
        s = jnp.where(mask[:, :, None], s, MIN)  # finite: a row with no visible key averages uniformly
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    denom = jnp.sum(e, axis=-1, keepdims=True)
    out = jax.lax.dot_general(e.astype(vh.dtype).reshape(b, kvh, g * ql, -1), vh, (((3,), (2,)), batch_dims),
                              preferred_element_type=jnp.float32)
    return out.reshape(b, kvh, g, ql, d) / denom


def causal_self_attention(q, k, v, mask, block: int = 128):
    """`dot_product_attention` of a prompt on itself: keys are the queries' own positions and `mask` is causal.

    Query block j (rows [j * block, (j + 1) * block)) looks only at keys [0, (j + 1) * block): the keys past a
    block's end are masked for all its rows, so skipping them changes nothing (their softmax weight is exactly
    0) but halves the work of a long prompt, and the scores of one block (block x keys x heads) stay small
    enough to be re-read from cache by the softmax and the value matmul.
    mask: bool (batch, 1, seq, seq).
    """
    seq = q.shape[1]
    qh, kh, vh = _heads_first(q, k, v)
    outs = []
    for start in range(0, seq, block):
        end = min(start + block, seq)
        outs.append(_attend(qh[:, :, :, start:end], kh[:, :, :end], vh[:, :, :end], mask[:, :, start:end, :end]))
    return _heads_last(jnp.concatenate(outs, axis=3), q.dtype)


def _one_query_attention(q, k, v, mask):
    """A decode step's attention, reading k and v where they lie in the cache (batch, kv_len, kv_heads * d).

    With kv_heads batched, XLA:CPU would first transpose each layer's cache slice (kv heads major) on every
    step. Instead both products run over all kv heads at once as plain matmuls on the (kv_len, kv_heads * d)
    view, the query being block-diagonal (zeros off its own kv head, so every kept sum is the same sum) and
    the value product keeping the diagonal blocks: kv_heads times the (small) arithmetic, one pass over the
    cache, no copies.
    """
    batch, _, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    q = (q.astype(jnp.float32) * head_dim**-0.5).astype(q.dtype).reshape(batch, kv_heads, group, 1, head_dim)
    eye = jnp.eye(kv_heads, dtype=q.dtype)[None, :, None, :, None]
    q_blocks = (q * eye).reshape(batch, heads, kv_heads * head_dim)  # row (h, g): q[h, g] at columns h * d...
    k_flat = k.reshape(batch, kv_len, kv_heads * head_dim)
    v_flat = v.reshape(batch, kv_len, kv_heads * head_dim)
    s = jax.lax.dot_general(q_blocks, k_flat, (((2,), (2,)), ((0,), (0,))), preferred_element_type=jnp.float32)
    if mask is not None:
        s = jnp.where(jnp.broadcast_to(mask, (batch, 1, 1, kv_len))[:, :, 0], s, MIN)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    denom = jnp.sum(e, axis=-1, keepdims=True)  # (batch, heads, 1)
    out = jax.lax.dot_general(e.astype(v.dtype), v_flat, (((2,), (1,)), ((0,), (0,))),
                              preferred_element_type=jnp.float32)  # (batch, heads, kv_heads * d)
    out = jnp.diagonal(out.reshape(batch, kv_heads, group, kv_heads, head_dim), axis1=1, axis2=3)  # (b, g, d, h)
    out = out.transpose(0, 3, 1, 2).reshape(batch, heads, head_dim) / denom
    return out.reshape(batch, 1, heads, head_dim).astype(q.dtype)
