"""`Kernels`: the interface of the backend seam, implemented as plain math (the "reference" set).

Every other kernel set subclasses this one and overrides what its backend runs faster; anything it does not
override is this plain math. The reference is also what the tests compare the others against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..remat import rematerialized

# A finite minimum rather than -inf for masked scores: a query row with no visible key (left padding) then
# averages uniformly instead of producing NaN; such rows are never read.
MASKED = jnp.finfo(jnp.float32).min


def matmul_fp32(x, weight):
    """x (..., in) @ weight (out, in).T in the weight's dtype, accumulated and returned in fp32."""
    return jax.lax.dot_general(x.astype(weight.dtype), weight, (((x.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


class Kernels:
    """The backend seam. Arrays in, arrays out; no parameters of its own.

    differentiable: the set a training network uses (`get_kernels(name, differentiable=True)`): a backend whose
    inference tricks block gradients (integer views of 16-bit weights) leaves them out."""

    name = "reference"

    def __init__(self, differentiable: bool = False):
        self.differentiable = differentiable

    def project(self, x, weights):
        """Several linear maps of one input: `weights` [(weight (out, in), bias (out,) or None), ...] ->
        [x @ weight.T + bias, ...], each in fp32."""
        return [matmul_fp32(x, k) + (0 if b is None else b.astype(jnp.float32)) for k, b in weights]

    def attention(self, q, k, v, mask=None, *, causal: bool = False):
        """Softmax attention with grouped-query heads.

        q: (batch, q_len, heads, head_dim); k, v: (batch, kv_len, kv_heads, head_dim), each kv head serving
        `heads // kv_heads` consecutive query heads (HF's `repeat_kv`). mask: bool broadcastable to
        (batch, 1, q_len, kv_len), True where a query may see a key. causal: q and k are the same positions
        and query i also sees only keys <= i. Scores and softmax in fp32; returns q's dtype.
        """
        batch, q_len, heads, head_dim = q.shape
        kv_len, kv_heads = k.shape[1], k.shape[2]
        qg = q.reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)
        scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32) * head_dim**-0.5
        visible = causal_mask(q_len, kv_len) if causal else None
        if mask is not None:
            visible = mask if visible is None else (mask & visible)
        if visible is not None:
            scores = jnp.where(visible[:, :, None], scores, MASKED)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v, preferred_element_type=jnp.float32)
        return out.reshape(batch, q_len, heads, head_dim).astype(q.dtype)

    def write_cache(self, cache, k, v, index):
        """Write new keys/values (batch, s, kv_heads, head_dim) into one layer's cache {"k", "v"} (batch,
        cache_len, kv_heads, head_dim) at slots [index, index + s): `index` a scalar, or (batch,) for a slot
        per row (continuous batching). Returns (keys, values, cache): all of the layer's keys and values after
        the write, and the updated cache (whatever form `scan_layers` gave)."""
        keys = write_rows(cache["k"], k, index, batch_axis=0)
        values = write_rows(cache["v"], v, index, batch_axis=0)
        return keys, values, {"k": keys, "v": values}

    def scan_layers(self, layer, layers, carry, per_layer=None, remat: str | None = None):
        """Run `layer(params_i, carry, per_layer_i) -> (carry, out_i)` over layer params stacked on axis 0 (and
        `per_layer` inputs stacked likewise, e.g. the KV cache); returns (carry, outs stacked). remat: the
        per-layer rematerialization policy of a training network (`llava_jax.remat`; None: inference)."""
        layer = rematerialized(layer, remat)
        return jax.lax.scan(lambda c, xs: layer(xs[0], c, xs[1]), carry, (layers, per_layer))

    def prepare(self, params, program: str):
        """The params a compiled program takes, built outside it (zero-copy views on some backends): `program`
        is "scan" (programs that scan over stacked layers) or "decode" (the decode loop). Plain: `params`."""
        del program
        return params


def write_rows(buffer, update, index, batch_axis: int, update_slice=jax.lax.dynamic_update_slice):
    """`update` (..., batch, s, ...) into `buffer` at slot `index` of the axis after `batch_axis`: one slot for
    every row (scalar index) or one per row ((batch,) index, each row written on its own)."""
    update = update.astype(buffer.dtype)
    if jnp.ndim(index) == 0:
        start = [0] * buffer.ndim
        start[batch_axis + 1] = index
        return update_slice(buffer, update, tuple(start))
    row_start = [0] * (buffer.ndim - 1)

    def one_row(b, u, i):
        start = list(row_start)
        start[batch_axis] = i
        return update_slice(b, u, tuple(start))

    return jax.vmap(one_row, in_axes=(batch_axis, batch_axis, 0), out_axes=batch_axis)(buffer, update, index)


def causal_mask(q_len: int, kv_len: int):
    """(1, 1, q_len, kv_len) bool: query i sees keys <= i + (kv_len - q_len)."""
    offset = kv_len - q_len
    return (jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None] + offset)[None, None]
