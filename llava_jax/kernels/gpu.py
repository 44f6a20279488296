"""GPU attention: cuDNN flash attention via `jax.nn.dot_product_attention`, wrapped to the project contract.

    attention(q, k, v, mask=None, *, causal=False) -> out

q: (batch, q_len, heads, head_dim); k, v: (batch, kv_len, kv_heads, head_dim), heads a multiple of kv_heads
(query head h reads kv head h // (heads // kv_heads), as HF's `repeat_kv`; `jax.nn.dot_product_attention`
groups query heads the same way, natively, for both implementations). mask: None or bool broadcastable to
(batch, 1, q_len, kv_len), True = may attend. causal=True (only with q_len == kv_len, else ValueError): query
i additionally sees only keys <= i. Scale 1/sqrt(head_dim), fp32 softmax, output in q.dtype. A query row that
sees no key gets finite values (see "Fully masked rows" below), never NaN.

The cuDNN branch cannot run on CPU at all, and no GPU was available when this was written: only the XLA
branch (the same `jax.nn.dot_product_attention` call with implementation="xla") and the selection rules are
tested (tests/test_accelerator_kernels.py).

Implementation choice (`choose_implementation`, static: shapes, dtypes, the device):

* "cudnn" (cuDNN fused flash attention) when all hold:
  - the default backend is a CUDA GPU (cuDNN does not exist elsewhere);
  - q, k, v all float16 or all bfloat16 (cuDNN's non-fp8 flash attention takes no float32);
  - head_dim a multiple of 8 and <= 128, or <= 256 on compute capability >= 9.0 (Hopper and later);
    these are the checks of `jax._src.cudnn.fused_attention_stablehlo.check_is_flash_attention` in the
    installed jax (0.10), made here up front so an unsupported shape never raises at trace time.
* "xla" (`jax.nn.dot_product_attention(implementation="xla")`: an einsum, fp32 scores and softmax) otherwise:
  float32 inputs, other head sizes, CPU/TPU backends.
`implementation="cudnn" | "xla"` forces one (the tests force "xla" on CPU; forcing "cudnn" where it is not
supported raises jax's own error).

Masks. cuDNN's padding mask (`query_seq_lengths` / `key_value_seq_lengths`) describes right padding only (the
first n positions valid); this project left-pads prompts and its caches hold arbitrary valid slots, so it is
not used. Instead the bool mask goes to `dot_product_attention(mask=...)`, which cuDNN turns into an additive
bias in the input dtype (0 where allowed; jax's `get_large_negative_number`: -2**41 for bfloat16, -2**15 for
float16) and XLA into a `where` on the fp32 logits (-0.7 * float32 max). cuDNN requires the
bias's last two dims to be exactly (q_len, kv_len), so the mask is broadcast to (batch, 1, q_len, kv_len)
first (heads stay 1: the bias is shared by the heads). `causal=True` is passed as `is_causal=True` (cuDNN's
causal mask type, which also skips the blocks above the diagonal) on top of the bias. A decode step
(q_len == 1 over a cache with a validity mask) is the same call with a (batch, 1, 1, kv_len) mask.

Fully masked rows: both implementations mask with a finite large negative rather than -inf, so such a row's
softmax stays finite (XLA: uniform over its keys; cuDNN: the softmax of its logits, all shifted by the same
bias), never NaN. The cuDNN half of that is read from jax's source, not run: no GPU was available.
"""

import jax
import jax.numpy as jnp

from .reference import Kernels

_CUDNN_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def _cuda_compute_capability():
    """(major, minor) of the first CUDA device of the default backend, or None when it is not a CUDA GPU."""
    if jax.default_backend() != "gpu":
        return None
    device = jax.devices()[0]
    cc = getattr(device, "compute_capability", None)
    if cc is None:  # ROCm GPUs have no cuDNN
        return None
    return tuple(int(x) for x in str(cc).split(".")[:2])


def cudnn_supported(dtypes, head_dim, compute_capability) -> bool:
    """Whether cuDNN flash attention takes these inputs (see the module docstring for the rules).

    dtypes: the dtypes of q, k, v; compute_capability: (major, minor) of a CUDA GPU, or None for no CUDA GPU.
    """
    if compute_capability is None:
        return False
    dts = {jnp.dtype(d) for d in dtypes}
    if len(dts) != 1 or dts.pop() not in _CUDNN_DTYPES:
        return False
    max_dim = 256 if tuple(compute_capability) >= (9, 0) else 128
    return head_dim % 8 == 0 and head_dim <= max_dim


def choose_implementation(q, k, v) -> str:
    """"cudnn" when `cudnn_supported` on this process's default device, else "xla"."""
    ok = cudnn_supported((q.dtype, k.dtype, v.dtype), q.shape[-1], _cuda_compute_capability())
    return "cudnn" if ok else "xla"


def attention(q, k, v, mask=None, *, causal=False, implementation=None):
    """Contract attention (see the module docstring) via `jax.nn.dot_product_attention`.

    implementation: None (choose: cuDNN where supported, else XLA), "cudnn" or "xla" (forced).
    """
    batch, q_len, _, _ = q.shape
    kv_len = k.shape[1]
    if causal and q_len != kv_len:
        raise ValueError(f"causal attention needs q_len == kv_len, got {q_len} and {kv_len}")
    impl = implementation or choose_implementation(q, k, v)
    if mask is not None:
        mask = jnp.broadcast_to(jnp.asarray(mask, bool), (batch, 1, q_len, kv_len))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=impl)
    return out.astype(q.dtype)


class GpuKernels(Kernels):
    """The reference math with attention from `jax.nn.dot_product_attention` (cuDNN flash attention where
    `cudnn_supported`, else XLA's composition)."""

    name = "gpu"

    def attention(self, q, k, v, mask=None, *, causal: bool = False):
        return attention(q, k, v, mask, causal=causal)
