"""XLA:CPU kernels: the same math as the reference, in the layouts and fusions XLA:CPU runs fast.

Each override says which XLA:CPU behaviour it works around; `tests/test_kernels.py` checks every one against
the reference set. The tricks:
- one-row 16-bit matmuls get a zero second row (`matmul_fp32`);
- a prompt's projections of one input run as one wide matmul (`project`);
- attention with heads as batch dimensions, normalized after the value matmul; a prompt's causal attention
  block by block, skipping keys past each block (`attention`); a decode step as block-diagonal matmuls over the
  cache in place (`one_query_attention`);
- 16-bit KV caches updated through uint16 views (`write_cache`);
- 16-bit stacked weights scanned as uint16 views (`prepare("scan")` + `scan_layers`), and 16-bit weights
  concatenated as uint16 (`project`): neither in the differentiable set a training network uses (no gradient
  flows through an integer view);
- the decode loop unrolled over per-layer views of the stacked weights, writing straight into the stacked cache
  (`prepare("decode")` + `scan_layers` + `write_cache`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ..remat import rematerialized
from .reference import MASKED, Kernels, causal_mask, write_rows
from .reference import matmul_fp32 as reference_matmul


def _is_16bit_float(a) -> bool:
    return jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize == 2


def to_bits(tree):
    """16-bit float leaves -> uint16 (a bitcast: free); other leaves unchanged."""
    return jax.tree_util.tree_map(lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16) if _is_16bit_float(a) else a,
                                  tree)


def from_bits(tree, dtypes):
    """Undo `to_bits` given the dtypes to restore (a tree of the same structure)."""
    return jax.tree_util.tree_map(lambda a, d: jax.lax.bitcast_convert_type(a, d) if a.dtype != d else a, tree, dtypes)


def matmul_fp32(x, weight):
    """x (..., in) @ weight (out, in).T, accumulated and returned in fp32.

    XLA:CPU runs a bf16 matmul at full speed (its bf16 GEMM) only when the dot asks for an fp32 result, and
    lowers a one-row 16-bit dot (a batch-1 decode step) by converting the whole weight matrix to fp32 first, on
    every call: so a one-row product gets a zero second row.
    """
    x = x.astype(weight.dtype)
    if math.prod(x.shape[:-1]) == 1 and weight.dtype.itemsize == 2:
        x2 = jnp.concatenate([x.reshape(1, -1), jnp.zeros((1, x.shape[-1]), x.dtype)])
        return reference_matmul(x2, weight)[:1].reshape(*x.shape[:-1], weight.shape[0])
    return reference_matmul(x, weight)


def update_slice(buffer, update, start):
    """`dynamic_update_slice`, in place. A 16-bit float buffer is updated through a uint16 view: XLA:CPU
    otherwise widens the whole buffer to fp32 and back when the update's producer fuses into it (a full copy
    of the KV cache per layer per decode step)."""
    update = update.astype(buffer.dtype)
    if _is_16bit_float(buffer):
        bits = jax.lax.dynamic_update_slice(to_bits(buffer), to_bits(update), start)
        return jax.lax.bitcast_convert_type(bits, buffer.dtype)
    return jax.lax.dynamic_update_slice(buffer, update, start)


@dataclass(frozen=True)
class StackedCacheSlot:
    """Layer `index` of the stacked cache {"k", "v"} (layers, batch, cache_len, kv_heads, head_dim), handed to
    each layer of the unrolled decode step so that its new keys go straight into the stacked buffer."""

    stack: dict
    index: int


class XlaCpuKernels(Kernels):
    name = "xla_cpu"

    def project(self, x, weights):
        """One matmul against the weights concatenated on their output axis when `x` (batch, seq, in) holds
        several tokens per row (a prompt or an image: one wide matmul beats a wide and two narrow ones, and
        inside a scan the concatenation replaces the per-layer slice copies); one matmul each for a decode step,
        whatever the batch (concatenating would copy the weights on every step: at 16 rows that copy cost more
        than the matmuls)."""
        if len(weights) == 1 or x.shape[-2] == 1:
            return [matmul_fp32(x, w) + (0 if b is None else b.astype(jnp.float32)) for w, b in weights]
        mats = [w for w, _ in weights]
        # concatenated as uint16 (XLA:CPU widens a 16-bit float concat to fp32); not when training: uint16 carries
        # no gradient
        if _is_16bit_float(mats[0]) and not self.differentiable:
            weight = jax.lax.bitcast_convert_type(jnp.concatenate(to_bits(mats), axis=0), mats[0].dtype)
        else:
            weight = jnp.concatenate(mats, axis=0)
        y = matmul_fp32(x, weight)
        if any(b is not None for _, b in weights):
            y = y + jnp.concatenate([jnp.zeros(w.shape[0], w.dtype) if b is None else b for w, b in weights]
                                    ).astype(jnp.float32)
        sizes = [w.shape[0] for w in mats]
        return jnp.split(y, list(np.cumsum(sizes)[:-1]), axis=-1)

    def attention(self, q, k, v, mask=None, *, causal: bool = False):
        q_len, kv_len, kv_heads = q.shape[1], k.shape[1], k.shape[2]
        if causal:
            visible = causal_mask(q_len, kv_len) if mask is None else (mask & causal_mask(q_len, kv_len))
            return blocked_causal_attention(q, k, v, visible)
        if q_len == 1 and kv_heads <= 8:
            return one_query_attention(q, k, v, mask)
        if q_len > 1:
            qh, kh, vh = _heads_first(q, k, v)
            return _heads_last(_attend(qh, kh, vh, mask), q.dtype)
        return super().attention(q, k, v, mask)

    def write_cache(self, cache, k, v, index):
        if isinstance(cache, StackedCacheSlot):  # the unrolled decode step: write into the stacked buffer
            i, stack = cache.index, cache.stack
            write = lambda buf, new: jax.lax.dynamic_update_index_in_dim(  # noqa: E731
                buf, write_rows(buf[i], new, index, 0, update_slice), i, 0) if jnp.ndim(index) else update_slice(
                buf, new[None], (i, 0, index, 0, 0))
            ck, cv = write(stack["k"], k), write(stack["v"], v)
            return ck[i], cv[i], StackedCacheSlot({"k": ck, "v": cv}, i)
        ck = write_rows(cache["k"], k, index, 0, update_slice)
        cv = write_rows(cache["v"], v, index, 0, update_slice)
        return ck, cv, {"k": ck, "v": cv}

    def scan_layers(self, layer, layers, carry, per_layer=None, remat: str | None = None):
        """Per-layer params (a list, from `prepare("decode")`): the layers unrolled, each reading its own weights
        where they lie and writing the stacked cache in place. Stacked params: a scan over uint16 views of the
        16-bit stacks (slicing a layer out of a 16-bit float stack makes XLA:CPU convert the whole stack to fp32
        first, hoisted out of the loop: a hidden fp32 copy of every weight). Leaves that `prepare("scan")`
        already viewed as uint16 are restored to the activations' dtype (params and activations share it).
        A differentiable set scans the float stacks as they are: a uint16 view carries no gradient."""
        if self.differentiable:
            return super().scan_layers(layer, layers, carry, per_layer, remat)
        layer = rematerialized(layer, remat)
        if isinstance(layers, list | tuple):
            for i, params in enumerate(layers):
                slot = None if per_layer is None else StackedCacheSlot(per_layer, i)
                carry, slot = layer(params, carry, slot)
                per_layer = None if slot is None else slot.stack
            return carry, per_layer
        act_dtype = jax.tree_util.tree_leaves(carry)[0].dtype
        dtypes = jax.tree_util.tree_map(lambda a: act_dtype if a.dtype == jnp.uint16 else a.dtype,
                                        (layers, per_layer))

        def body(c, bits):
            params, x = from_bits(bits, dtypes)
            c, y = layer(params, c, x)
            return c, to_bits(y)

        carry, ys = jax.lax.scan(body, carry, to_bits((layers, per_layer)))
        return carry, from_bits(ys, dtypes[1])

    def prepare(self, params, program: str):
        """"scan": 16-bit stacked weights as uint16 views of the same buffers (a bitcast inside the program would
        be materialized: a copy of every stack). "decode": the language model's layers as per-layer views of the
        stacked arrays, so that a decode step reads each weight once instead of copying each layer's slice first.
        Views need arrays on one CPU device; elsewhere `params` is returned unchanged."""
        if program == "decode":
            return unstack_layers(params) or params
        return bits_view(params)


def zero_copy_put(host: np.ndarray, device) -> jax.Array | None:
    """`host` (a view into a CPU device buffer) as a device array sharing its memory, or None where jax would
    copy it (a buffer not 64-byte aligned)."""
    array = jax.device_put(host, device)
    return array if array.unsafe_buffer_pointer() == host.ctypes.data else None


def _on_one_cpu_device(leaf) -> bool:
    return isinstance(leaf, jax.Array) and len(leaf.devices()) == 1 and leaf.device.platform == "cpu"


def bits_view(params: dict) -> dict:
    """`params` with every stacked (3-D or more) 16-bit float weight replaced by a uint16 array sharing its
    buffer; other leaves (and leaves not viewable) unchanged."""
    def view(path, leaf):
        name = jax.tree_util.keystr(path)
        if not (leaf.ndim >= 3 and name.endswith("['weight']") and _is_16bit_float(leaf) and _on_one_cpu_device(leaf)):
            return leaf
        bits = zero_copy_put(np.asarray(leaf).view(np.uint16), leaf.device)
        return leaf if bits is None else bits

    return jax.tree_util.tree_map_with_path(view, params)


def unstack_layers(params: dict) -> dict | None:
    """`params` with `language_model/layers` split into a list of per-layer dicts, each array a view of the
    stacked one (no copy), or None where views are impossible (not a single-device CPU array, not aligned)."""
    layers = params["language_model"]["layers"]
    leaves, treedef = jax.tree_util.tree_flatten(layers)
    if not all(_on_one_cpu_device(leaf) for leaf in leaves):
        return None
    host = [np.asarray(leaf) for leaf in leaves]  # zero-copy views of the CPU buffers
    device = leaves[0].device
    per_layer = []
    for i in range(host[0].shape[0]):
        views = [zero_copy_put(h[i], device) for h in host]
        if any(v is None for v in views):
            return None  # jax would copy: per-layer arrays would double the decoder's memory
        per_layer.append(jax.tree_util.tree_unflatten(treedef, views))
    return {**params, "language_model": {**params["language_model"], "layers": per_layer}}


# ---- attention layouts ---------------------------------------------------------------------------------------
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
        s = jnp.where(mask[:, :, None], s, MASKED)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    denom = jnp.sum(e, axis=-1, keepdims=True)
    out = jax.lax.dot_general(e.astype(vh.dtype).reshape(b, kvh, g * ql, -1), vh, (((3,), (2,)), batch_dims),
                              preferred_element_type=jnp.float32)
    return out.reshape(b, kvh, g, ql, d) / denom


def blocked_causal_attention(q, k, v, visible, block: int = 128):
    """Causal attention of a prompt on itself, `visible` (batch or 1, 1, seq, seq) the full mask.

    Query block j (rows [j * block, (j + 1) * block)) looks only at keys [0, (j + 1) * block): the keys past a
    block's end are masked for all its rows, so skipping them changes nothing (their softmax weight is exactly
    0) but halves the work of a long prompt, and the scores of one block stay small enough to be re-read from
    cache by the softmax and the value matmul.
    """
    seq = q.shape[1]
    qh, kh, vh = _heads_first(q, k, v)
    outs = []
    for start in range(0, seq, block):
        end = min(start + block, seq)
        outs.append(_attend(qh[:, :, :, start:end], kh[:, :, :end], vh[:, :, :end],
                            visible[:, :, start:end, :end]))
    return _heads_last(jnp.concatenate(outs, axis=3), q.dtype)


def one_query_attention(q, k, v, mask):
    """A decode step's attention, reading k and v where they lie in the cache (batch, kv_len, kv_heads * d).

    With kv heads batched, XLA:CPU would first transpose each layer's cache slice (kv heads major) on every
    step. Instead both products run over all kv heads at once as plain matmuls on the (kv_len, kv_heads * d)
    view, the query being block-diagonal (zeros off its own kv head, so every kept sum is the same sum) and
    the value product keeping the diagonal blocks: kv_heads times the (small) arithmetic, one pass over the
    cache, no copies. Used up to 8 kv heads, where the extra arithmetic stays below the memory traffic saved.
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
        s = jnp.where(jnp.broadcast_to(mask, (batch, 1, 1, kv_len))[:, :, 0], s, MASKED)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    denom = jnp.sum(e, axis=-1, keepdims=True)  # (batch, heads, 1)
    out = jax.lax.dot_general(e.astype(v.dtype), v_flat, (((2,), (1,)), ((0,), (0,))),
                              preferred_element_type=jnp.float32)  # (batch, heads, kv_heads * d)
    out = jnp.diagonal(out.reshape(batch, kv_heads, group, kv_heads, head_dim), axis1=1, axis2=3)  # (b, g, d, h)
    out = out.transpose(0, 3, 1, 2).reshape(batch, heads, head_dim) / denom
    return out.reshape(batch, 1, heads, head_dim).astype(q.dtype)
