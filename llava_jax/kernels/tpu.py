"""TPU attention: JAX's Pallas TPU flash attention kernel, wrapped to the project's attention contract.

    attention(q, k, v, mask=None, *, causal=False) -> out

q: (batch, q_len, heads, head_dim); k, v: (batch, kv_len, kv_heads, head_dim), heads a multiple of kv_heads
(query head h reads kv head h // (heads // kv_heads), as HF's `repeat_kv`). mask: None or bool, broadcastable
to (batch, 1, q_len, kv_len), True = may attend. causal=True (only with q_len == kv_len, a prompt over its own
keys; other lengths raise ValueError): query i additionally sees only keys <= i. Scale 1/sqrt(head_dim), fp32
softmax, output in q.dtype. A query row that sees no key gets finite values (a uniform average), never NaN.

The kernel is `jax.experimental.pallas.ops.tpu.flash_attention.flash_attention` (layout (batch, heads, len,
head_dim), equal head counts, optional causal mask, segment ids, additive bias `ab`). This module maps the
contract onto it; every choice below is static (from shapes, dtypes and the `causal` flag):

* Mask forms.
  - None: no mask operand.
  - A key-validity mask, i.e. `mask.shape[-2] == 1` (broadcastable to (batch, 1, 1, kv_len); a decode step's
    cache mask, or a prompt's left-padding mask when combined with `causal=True`): passed as **segment ids**,
    every query in segment 1, valid keys in segment 1, masked (and padded) keys in segment 0. This is exact
    for every mask of that shape and costs O(batch * len) memory.
  - Any other mask (a real q_len axis, e.g. a dense causal & padding mask): passed as an additive fp32 bias
    `ab` of shape (batch, heads, q_len, kv_len) (0 where allowed, -1e30 where not). Exact, but it
    materializes the bias per head: O(batch * heads * q_len * kv_len) memory and bandwidth. Callers that
    can should pass a key-validity mask plus `causal=True` instead.
* GQA. Non-causal attention folds each kv head's query group into the query-length axis (q becomes
  (batch, kv_heads, group * q_len, head_dim)) so k and v are read as they are, never repeated; this is also
  what makes a decode step (q_len == 1) use `group` rows per kernel block instead of one. Causal attention
  cannot fold (the kernel's causal mask compares the row index with the key index), so k and v are
  repeated `group` times along the heads (`jnp.repeat`, HF's `repeat_kv` order).
* Lengths. The kernel needs kv blocks that are multiples of 128 (its segment-id and online-softmax code
  path) and dividing kv_len, so keys are zero-padded at the end to a multiple of 128 (and of the kv block);
  padded keys are masked (by the segment ids, by the bias, or, for causal prompts, by causality itself,
  since a padded key's index exceeds every real query's). Query rows are padded to a multiple of 8 (TPU
  sublanes) and of the q block, and the padded rows are dropped.
* Layout cost. The kernel reads (batch, heads, len, head_dim); the contract's k and v are
  (batch, len, kv_heads, head_dim), so both are transposed, i.e. copied by XLA, on every call (a padding to
  128 fuses into that copy). For a decode step that is a copy of the layer's whole cache slice per step;
  XLA's einsum (`reference_attention`) reads the cache in place, so for q_len == 1 it may well be the faster
  choice on TPU until the cache is stored heads-major. Unmeasured (no TPU here): the seam can route decode
  steps to `reference_attention` if so.
* head_dim must be <= 128 or a multiple of 128 (the kernel's accumulator layout); other sizes, and a kv_len
  of 0, fall back to `reference_attention` (plain einsum, XLA). `kernel_supported` states the rule.
* Masked logits: the kernel adds -0.7 * float32 max to masked scores, so a row with no visible key averages
  uniformly (finite). The bias uses -1e30 (not a float32 extreme) so that bias + kernel mask stays finite.

Why not splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`): it takes GQA natively, but its
masks are static numpy masks shared by the batch (plus segment ids), so a dense per-batch mask has no place in
it, and it wants q and kv blocks that are multiples of 128. flash_attention covers every mask form above;
splash (which would avoid the kv repeat of causal GQA prompts) is a possible later optimization.

Running without a TPU: pass `interpret=True` (wraps the call in `pltpu.force_tpu_interpret_mode()`, the
Pallas TPU interpreter: slow, for tests on CPU only; this is how every kernel path here was tested: no TPU was
available, so compilation by Mosaic for a real TPU and its speed are untested). Without it, on a non-TPU
backend the Pallas call cannot lower; `attention` then raises (it never silently swaps the kernel for XLA on
the wrong device) unless `fallback=True` is given, in which case non-TPU backends use `reference_attention`.
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import flash_attention as _fa

from .reference import Kernels

_BIAS_MASKED = -1e30  # additive bias of a masked key: exp() underflows to exactly 0 for any real logit
_LANES = 128  # kv blocks: multiple of this (the kernel's segment-id / softmax tiling)
_SUBLANES = 8  # q rows: multiple of this


def reference_attention(q, k, v, mask=None, *, causal=False):
    """The plain attention of the reference kernel set (XLA einsums)."""
    return Kernels().attention(q, k, v, mask, causal=causal)


def _full_mask(mask, causal, batch, q_len, kv_len):
    """The effective bool mask (batch, 1, q_len, kv_len), or None when nothing is masked."""
    allowed = None if mask is None else jnp.broadcast_to(mask, (batch, 1, q_len, kv_len))
    if causal:
        tri = jnp.tril(jnp.ones((q_len, kv_len), bool))[None, None]
        allowed = tri if allowed is None else allowed & tri
    return allowed


def kernel_supported(q_shape, k_shape) -> bool:
    """Whether `attention` runs the Pallas kernel for these shapes (else it uses `reference_attention`).

    head_dim <= 128 or a multiple of 128; q_len, kv_len >= 1.
    """
    head_dim = q_shape[-1]
    return (head_dim <= 128 or head_dim % 128 == 0) and k_shape[1] >= 1 and q_shape[1] >= 1


def _round_up(n, m):
    return -(-n // m) * m


def attention(q, k, v, mask=None, *, causal=False, block_q=128, block_k=128, interpret=False,
              fallback=False):
    """Contract attention (see the module docstring) through the Pallas TPU flash-attention kernel.

    block_q / block_k: the kernel's query and key block sizes (block_k a multiple of 128); short sequences
    use one block of their padded length. interpret: run the kernel in the Pallas TPU interpreter (CPU
    tests). fallback: on a backend other than TPU (and not interpreting), use `reference_attention`
    instead of failing to lower the kernel.
    """
    if block_k % _LANES:
        raise ValueError(f"block_k must be a multiple of {_LANES}, got {block_k}")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal attention needs q_len == kv_len, got {q.shape[1]} and {k.shape[1]}")
    on_tpu = jax.default_backend() == "tpu"
    if not kernel_supported(q.shape, k.shape) or (fallback and not on_tpu and not interpret):
        return reference_attention(q, k, v, mask, causal=causal)
    if interpret:
        with pltpu.force_tpu_interpret_mode():
            return _kernel_attention(q, k, v, mask, causal, block_q, block_k)
    return _kernel_attention(q, k, v, mask, causal, block_q, block_k)


def _kernel_attention(q, k, v, mask, causal, block_q, block_k):
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    fold = not causal  # fold each kv head's query group into the rows (no kv repeat)

    if fold:
        n_heads, rows = kv_heads, group * q_len
        qh = q.reshape(batch, q_len, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
        qh = qh.reshape(batch, kv_heads, rows, head_dim)  # row g * q_len + i: query i of group member g
        kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    else:
        n_heads, rows = heads, q_len
        qh = q.transpose(0, 2, 1, 3)
        kh = jnp.repeat(k, group, axis=2).transpose(0, 2, 1, 3)
        vh = jnp.repeat(v, group, axis=2).transpose(0, 2, 1, 3)

    # Block sizes and padded lengths.
    bq = min(_round_up(block_q, _SUBLANES), _round_up(rows, _SUBLANES))
    rows_pad = _round_up(rows, bq)
    bk = min(block_k, _round_up(kv_len, _LANES))
    kv_pad = _round_up(kv_len, bk)
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, rows_pad - rows), (0, 0)))
    kh = jnp.pad(kh, ((0, 0), (0, 0), (0, kv_pad - kv_len), (0, 0)))
    vh = jnp.pad(vh, ((0, 0), (0, 0), (0, kv_pad - kv_len), (0, 0)))

    ab = segment_ids = None
    key_valid = None  # (batch, kv_len) bool, when the mask is a key-validity mask
    if mask is not None and mask.shape[-2] == 1:
        key_valid = jnp.broadcast_to(mask, (batch, 1, 1, kv_len))[:, 0, 0, :]
    elif mask is not None:
        full = jnp.broadcast_to(mask, (batch, 1, q_len, kv_len))
        if fold:  # rows g * q_len + i read the mask row i for every group member g
            full = jnp.broadcast_to(full[:, :, None], (batch, n_heads, group, q_len, kv_len))
            full = full.reshape(batch, n_heads, rows, kv_len)
        else:
            full = jnp.broadcast_to(full, (batch, n_heads, rows, kv_len))
        full = jnp.pad(full, ((0, 0), (0, 0), (0, rows_pad - rows), (0, kv_pad - kv_len)))
        ab = jnp.where(full, 0.0, _BIAS_MASKED).astype(jnp.float32)
    if key_valid is None and ab is None and kv_pad > kv_len and not causal:
        key_valid = jnp.ones((batch, kv_len), bool)  # only the padded keys need masking
    if key_valid is not None:
        kv_ids = jnp.pad(key_valid.astype(jnp.int32), ((0, 0), (0, kv_pad - kv_len)))
        segment_ids = _fa.SegmentIds(q=jnp.ones((batch, rows_pad), jnp.int32), kv=kv_ids)

    sizes = _fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1)
    out = _fa.flash_attention(qh, kh, vh, ab, segment_ids, causal=causal, sm_scale=head_dim**-0.5,
                              block_sizes=sizes)
    out = out[:, :, :rows]
    if fold:
        out = out.reshape(batch, kv_heads, group, q_len, head_dim).transpose(0, 3, 1, 2, 4)
        out = out.reshape(batch, q_len, heads, head_dim)
    else:
        out = out.transpose(0, 2, 1, 3)
    return out.astype(q.dtype)


class TpuKernels(Kernels):
    """The reference math with attention from the Pallas TPU flash-attention kernel (`attention` above); a
    decode step (one query over the cache) keeps the reference einsum, which reads the cache in place."""

    name = "tpu"

    def attention(self, q, k, v, mask=None, *, causal: bool = False):
        if q.shape[1] == 1:
            return super().attention(q, k, v, mask, causal=causal)
        return attention(q, k, v, mask, causal=causal)
