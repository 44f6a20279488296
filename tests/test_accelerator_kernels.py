"""The GPU (cuDNN / XLA) and TPU (Pallas flash attention) attention kernels vs a float64 reference, on CPU.

The GPU module runs its `jax.nn.dot_product_attention` call with implementation="xla" (cuDNN needs a CUDA
GPU); the TPU module runs the real Pallas kernel in the Pallas TPU interpreter (`interpret=True`). Shapes
are tiny: the interpreter is slow (seconds per call). Every case checks: finite everywhere (rows that see no key
included), and equality to the float64 reference on every row that sees at least one key.

Tolerance, float32 inputs: atol 2e-6 + rtol 2e-6. Outputs are convex combinations of N(0, 1) values
(|out| < 5); float32 scores, softmax and sums over <= 256 keys carry a few float32 ulps of error (measured max
over all cases here: 2.5e-7), so the bound is ~8x the noise and still fails for any masking, grouping or
scaling mistake (those move outputs by O(0.1-1)). bfloat16 inputs (GPU path only): atol 3e-2 (measured
6.8e-3), from the probabilities and the output being rounded to bfloat16 (2^-8 relative each), against a
float64 reference computed from the same rounded inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.kernels import gpu as kernels_gpu
from llava_jax.kernels import tpu as kernels_tpu

F32_TOL = {"atol": 2e-6, "rtol": 2e-6}


def reference(q, k, v, mask, causal):
    """float64 numpy attention (GQA as HF repeat_kv) and the (batch, q_len) bool 'row sees some key'."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, d = q.shape
    s_len, kvh = k.shape[1], k.shape[2]
    k = np.repeat(k, h // kvh, axis=2)
    v = np.repeat(v, h // kvh, axis=2)
    allowed = np.ones((b, 1, t, s_len), bool)
    if mask is not None:
        allowed = allowed & np.broadcast_to(np.asarray(mask), (b, 1, t, s_len))
    if causal:
        allowed = allowed & np.tril(np.ones((t, s_len), bool))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    s = np.where(allowed, s, -np.inf)
    seen = allowed.any(-1)[:, 0]  # (b, t)
    s = np.where(seen[:, None, :, None], s, 0.0)  # rows with no key: anything finite, never compared
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v), seen


def make_inputs(seed, b, t, s, h, kvh, d, mask_kind, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    shapes = [(b, t, h, d), (b, s, kvh, d), (b, s, kvh, d)]
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in shapes)
    if mask_kind is None:
        mask = None
    elif mask_kind == "leftpad":  # key validity (b, 1, 1, s): row i left-padded by i tokens
        mask = np.arange(s)[None, :] >= np.arange(b)[:, None]
        mask = mask[:, None, None, :]
    elif mask_kind == "cache":  # a decode cache's valid slots (b, 1, 1, s), first batch row: one valid slot
        mask = rng.random((b, 1, 1, s)) > 0.4
        mask[0] = False
        mask[0, ..., s // 2] = True
    elif mask_kind == "dense":  # (b, 1, t, s) arbitrary, with one query row that sees nothing
        mask = rng.random((b, 1, t, s)) > 0.4
        mask[0, 0, 0] = False
    elif mask_kind == "dense_b1":  # batch-broadcast 2-D-like mask (1, 1, t, s)
        mask = rng.random((1, 1, t, s)) > 0.3
    else:
        raise ValueError(mask_kind)
    arrays = [jnp.asarray(x, dtype) for x in (q, k, v)]
    return (*arrays, None if mask is None else jnp.asarray(mask))


def check(out, q, k, v, mask, causal, tol):
    assert out.shape == q.shape and out.dtype == q.dtype
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all()
    ref, seen = reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask, causal)
    assert seen.any()
    np.testing.assert_allclose(out[seen], ref[seen], **tol)


# (batch, q_len, kv_len, heads, kv_heads, head_dim, causal, mask kind)
GPU_CASES = {
    "mha_nomask": (2, 4, 4, 2, 2, 8, False, None),
    "gqa_causal_nomask": (1, 6, 6, 4, 2, 8, True, None),
    "gqa_causal_leftpad": (3, 6, 6, 4, 2, 8, True, "leftpad"),
    "gqa_causal_dense": (2, 5, 5, 6, 3, 8, True, "dense"),
    "gqa_dense_odd": (2, 5, 7, 6, 2, 8, False, "dense"),
    "mqa_mask_batch1": (2, 3, 5, 4, 1, 16, False, "dense_b1"),
    "decode_cache": (3, 1, 9, 4, 2, 8, False, "cache"),
}


@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_path_xla_matches_reference(case):
    b, t, s, h, kvh, d, causal, mask_kind = GPU_CASES[case]
    q, k, v, mask = make_inputs(0, b, t, s, h, kvh, d, mask_kind)
    fn = jax.jit(lambda q, k, v, m: kernels_gpu.attention(q, k, v, m, causal=causal, implementation="xla"))
    check(fn(q, k, v, mask), q, k, v, mask, causal, F32_TOL)


def test_gpu_path_bf16():
    q, k, v, mask = make_inputs(1, 2, 6, 6, 4, 2, 16, "leftpad", dtype=jnp.bfloat16)
    out = kernels_gpu.attention(q, k, v, mask, causal=True, implementation="xla")
    check(out, q, k, v, mask, True, {"atol": 3e-2, "rtol": 0})


def test_gpu_path_catches_wrong_group_order():
    """The check is sensitive: kv heads assigned by h % kv_heads (not h // group) must fail it."""
    q, k, v, mask = make_inputs(2, 1, 4, 4, 4, 2, 8, None)
    # head order (kv, g) -> (g, kv): query head h then reads kv head h % kv_heads
    swapped = q.reshape(1, 4, 2, 2, 8).transpose(0, 1, 3, 2, 4).reshape(q.shape)
    out = kernels_gpu.attention(swapped, k, v, implementation="xla")
    out = out.reshape(1, 4, 2, 2, 8).transpose(0, 1, 3, 2, 4).reshape(q.shape)
    with pytest.raises(AssertionError):
        check(out, q, k, v, None, False, F32_TOL)


def test_cudnn_support_rules():
    bf16, f16, f32 = jnp.bfloat16, jnp.float16, jnp.float32
    assert kernels_gpu.cudnn_supported((bf16,) * 3, 128, (8, 0))
    assert kernels_gpu.cudnn_supported((f16,) * 3, 64, (8, 6))
    assert not kernels_gpu.cudnn_supported((f32,) * 3, 128, (9, 0))  # no float32 in cuDNN flash attention
    assert not kernels_gpu.cudnn_supported((bf16, bf16, f16), 128, (9, 0))  # mixed dtypes
    assert not kernels_gpu.cudnn_supported((bf16,) * 3, 100, (9, 0))  # not a multiple of 8
    assert not kernels_gpu.cudnn_supported((bf16,) * 3, 256, (8, 0))  # > 128 before Hopper
    assert kernels_gpu.cudnn_supported((bf16,) * 3, 256, (9, 0))
    assert not kernels_gpu.cudnn_supported((bf16,) * 3, 128, None)  # no CUDA GPU
    q = jnp.zeros((1, 2, 2, 128), jnp.bfloat16)
    expected = "cudnn" if kernels_gpu._cuda_compute_capability() is not None else "xla"
    assert kernels_gpu.choose_implementation(q, q, q) == expected


def test_causal_needs_equal_lengths():
    q, k, v, _ = make_inputs(0, 1, 2, 3, 2, 2, 8, None)
    with pytest.raises(ValueError):
        kernels_gpu.attention(q, k, v, causal=True, implementation="xla")
    with pytest.raises(ValueError):
        kernels_tpu.attention(q, k, v, causal=True, interpret=True)


# TPU kernel in the Pallas interpreter: each case covers one code path of the wrapper.
TPU_CASES = {
    # bias from a dense mask, non-causal (query groups folded into rows), odd lengths, a row seeing nothing
    "dense_fold_gqa": (2, 3, 7, 4, 2, 16, False, "dense"),
    # bias from a dense mask together with the kernel's causal mask
    "dense_causal": (1, 5, 5, 2, 1, 8, True, "dense"),
    # decode: one query over a cache with valid slots (segment ids, folded group of 4 rows)
    "decode_cache": (2, 1, 9, 4, 1, 16, False, "cache"),
    # no mask, non-causal: segment ids only to hide the 128 - 9 padded keys
    "nomask_padded_keys": (1, 3, 9, 2, 2, 16, False, None),
    # segment ids from a key-validity mask, causal (kv heads repeated), odd length (130 -> 256 rows and keys):
    # two q blocks x two kv blocks of 128, i.e. the multi-step online softmax and causal block skipping
    # (the single-block variant of this path: test_tpu_kernel_interpret_bf16_under_jit)
    "multiblock_causal_leftpad_gqa": (2, 130, 130, 2, 1, 8, True, "leftpad"),
}


@pytest.mark.parametrize("case", list(TPU_CASES))
def test_tpu_kernel_interpret_matches_reference(case):
    b, t, s, h, kvh, d, causal, mask_kind = TPU_CASES[case]
    q, k, v, mask = make_inputs(3, b, t, s, h, kvh, d, mask_kind)
    out = kernels_tpu.attention(q, k, v, mask, causal=causal, interpret=True)
    check(out, q, k, v, mask, causal, F32_TOL)


def test_tpu_kernel_interpret_bf16_under_jit():
    """bfloat16 (the dtype a TPU runs), traced under jit as the model will: causal GQA with left padding."""
    q, k, v, mask = make_inputs(6, 2, 6, 6, 4, 2, 16, "leftpad", dtype=jnp.bfloat16)
    fn = jax.jit(lambda q, k, v, m: kernels_tpu.attention(q, k, v, m, causal=True, interpret=True))
    check(fn(q, k, v, mask), q, k, v, mask, True, {"atol": 3e-2, "rtol": 0})


def test_tpu_runs_the_pallas_kernel_and_documented_fallbacks():
    q, k, v, mask = make_inputs(4, 1, 2, 3, 2, 1, 16, "cache")

    def jaxpr(**kw):
        return str(jax.make_jaxpr(lambda q, k, v, m: kernels_tpu.attention(q, k, v, m, **kw))(q, k, v, mask))

    assert "pallas_call" in jaxpr(interpret=True)
    if jax.default_backend() != "tpu":
        assert "pallas_call" not in jaxpr(fallback=True)  # off TPU, fallback=True means the reference
        with pytest.raises(ValueError, match="interpret"):  # and without it, the kernel refuses to lower
            kernels_tpu.attention(q, k, v, mask)
    # head_dim neither <= 128 nor a multiple of 128: the einsum reference, on any backend
    assert not kernels_tpu.kernel_supported((1, 2, 2, 192), (1, 3, 1, 192))
    assert kernels_tpu.kernel_supported((1, 2, 2, 256), (1, 3, 1, 256))
    q2, k2, v2, _ = make_inputs(4, 1, 2, 3, 2, 1, 192, None)
    out = kernels_tpu.attention(q2, k2, v2, mask, interpret=True)
    check(out, q2, k2, v2, mask, False, F32_TOL)
    with pytest.raises(ValueError):
        kernels_tpu.attention(q, k, v, block_k=100, interpret=True)


def test_tpu_reference_matches():
    """The TPU module's own einsum fallback obeys the contract too (causal + left padding, GQA)."""
    q, k, v, mask = make_inputs(5, 3, 6, 6, 4, 2, 8, "leftpad")
    check(kernels_tpu.reference_attention(q, k, v, mask, causal=True), q, k, v, mask, True, F32_TOL)
