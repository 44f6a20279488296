"""The backend seam: every kernel set computes the reference math.

`xla_cpu` (the CPU default) against `reference` (the plain math), op by op and end to end: the same tokens and
logits within fp32 reduction-order noise. Its zero-copy views share the weights' memory. The GPU and TPU sets
are tested in test_accelerator_kernels.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llava_jax
from llava_jax.bench import make_checkpoint
from llava_jax.kernels import KernelsError, default_kernels, get_kernels, resolve_kernels
from llava_jax.kernels.xla_cpu import bits_view, unstack_layers

REF, CPU = get_kernels("reference"), get_kernels("xla_cpu")
F32_BOUND = 2e-6  # fp32 outputs of order one, only the summation order differs (measured below 5e-7)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("kernels") / "tiny", "tiny"))


def rand(rng, *shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def test_kernel_set_names():
    assert default_kernels() == "xla_cpu"  # this machine's backend is the CPU
    assert resolve_kernels("auto") == resolve_kernels(None) == "xla_cpu"
    with pytest.raises(KernelsError, match="unknown kernels 'cuda'"):
        resolve_kernels("cuda")


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_project(shape, dtype):
    """Fused (a prompt: several tokens a row), separate (a decode step of several rows) and padded one-row
    (16-bit) matmuls against (out, in) weights equal separate fp32-accumulated ones, and x @ weight.T."""
    rng = np.random.default_rng(shape[1])
    x = rand(rng, *shape, 64, dtype=dtype)
    weights = [(rand(rng, n, 64, dtype=dtype), None if n == 16 else rand(rng, n, dtype=dtype)) for n in (48, 16, 32)]
    w, b = (np.asarray(a, np.float64) for a in weights[0])
    np.testing.assert_allclose(np.asarray(REF.project(x, weights)[0]), np.asarray(x, np.float64) @ w.T + b,
                               rtol=1e-5, atol=1e-5)  # fp32 accumulation of 64 terms against float64
    for got, want in zip(jax.jit(CPU.project)(x, weights), REF.project(x, weights), strict=True):
        assert got.dtype == jnp.float32 and got.shape == (*shape, want.shape[-1])
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


ATTENTION_CASES = {
    # name: (q_len, kv_len, heads, kv_heads, causal, mask kind)
    "prompt causal, left padding, GQA, 3 blocks": (300, 300, 4, 2, True, "left_pad"),
    "prompt causal, left padding keys far larger": (200, 200, 4, 2, True, "left_pad_loud"),
    "prompt causal, no mask, odd length": (131, 131, 4, 1, True, None),
    "prompt causal, a query x key mask": (150, 150, 4, 2, True, "full"),
    "vision: no mask": (17, 17, 4, 4, False, None),
    "decode, 1 kv head": (1, 40, 8, 1, False, "random"),
    "decode, 8 kv heads (block-diagonal)": (1, 40, 8, 8, False, "random"),
    "decode, 16 kv heads (plain)": (1, 40, 16, 16, False, "random"),
    "chunk of 3 over a cache": (3, 40, 4, 2, False, "random"),
}


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention(case):
    q_len, kv_len, heads, kv_heads, causal, mask_kind = ATTENTION_CASES[case]
    rng = np.random.default_rng(len(case))
    q, k, v = rand(rng, 2, q_len, heads, 16), rand(rng, 2, kv_len, kv_heads, 16), rand(rng, 2, kv_len, kv_heads, 16)
    mask = None
    if mask_kind in ("left_pad", "left_pad_loud"):
        mask = jnp.asarray(np.arange(kv_len)[None, None, None, :] >= np.array([0, 37])[:, None, None, None])
    if mask_kind == "left_pad_loud":  # padding keys whose scores dwarf the real ones: masked, they weigh nothing
        k = k.at[1, :37].multiply(1e4)
    elif mask_kind == "random":
        mask = jnp.asarray(rng.random((2, 1, 1, kv_len)) > 0.3)
    elif mask_kind == "full":  # (batch, 1, q_len, kv_len): the general path
        mask = jnp.asarray(rng.random((2, 1, q_len, kv_len)) > 0.2) | jnp.eye(q_len, kv_len, dtype=bool)
    got = np.asarray(jax.jit(lambda *a: CPU.attention(*a, causal=causal))(q, k, v, mask))
    want = np.asarray(REF.attention(q, k, v, mask, causal=causal))
    assert np.isfinite(got).all()
    if mask_kind in ("left_pad", "left_pad_loud"):  # query rows of padding see no key: never read
        got, want = got[1, 37:], want[1, 37:]
    np.testing.assert_allclose(got, want, atol=F32_BOUND)


def test_write_cache_16bit_is_exact():
    rng = np.random.default_rng(3)
    cache = {n: rand(rng, 2, 24, 2, 8, dtype=jnp.bfloat16) for n in "kv"}
    k, v = rand(rng, 2, 1, 2, 8, dtype=jnp.bfloat16), rand(rng, 2, 1, 2, 8, dtype=jnp.bfloat16)
    for got, want in zip(jax.jit(CPU.write_cache)(cache, k, v, 5)[:2], REF.write_cache(cache, k, v, 5)[:2],
                         strict=True):
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))


def test_views_share_memory(checkpoint):
    model = llava_jax.load(checkpoint, dtype="bfloat16")
    stacked = model.params["language_model"]["layers"]["down_proj"]["weight"]
    unstacked = unstack_layers(model.params)["language_model"]["layers"]
    assert len(unstacked) == model.config.text.num_layers
    row = stacked.nbytes // stacked.shape[0]
    for i, p in enumerate(unstacked):
        assert p["down_proj"]["weight"].unsafe_buffer_pointer() == stacked.unsafe_buffer_pointer() + i * row
        np.testing.assert_array_equal(np.asarray(p["down_proj"]["weight"]), np.asarray(stacked[i]))
    bits = bits_view(model.params)
    view = bits["language_model"]["layers"]["down_proj"]["weight"]
    assert view.dtype == jnp.uint16 and view.unsafe_buffer_pointer() == stacked.unsafe_buffer_pointer()
    embedding = model.params["language_model"]["embed_tokens"]["embedding"]
    assert bits["language_model"]["embed_tokens"]["embedding"] is embedding


def prompt(seed=0, length=40):
    return np.random.default_rng(seed).integers(3, 30000, (2, length))


def test_fp32_xla_cpu_equals_reference(checkpoint):
    """End to end (tokens through the decode loop with per-layer views, logits through the scans): fp32
    logits within reduction-order noise and identical greedy tokens."""
    fast = llava_jax.load(checkpoint, kernels="xla_cpu")
    plain = llava_jax.LlavaModel(fast.config, fast.params, fast.dtype, kernels="reference")
    ids = prompt()
    logits = fast.forward(ids)
    assert 0.5 < logits.std() < 50
    np.testing.assert_allclose(logits, plain.forward(ids), atol=1e-4 * logits.std())
    tokens = fast.generate_ids(ids, max_new_tokens=12, stop_token_ids=[])
    assert tokens == plain.generate_ids(ids, max_new_tokens=12, stop_token_ids=[])
    assert isinstance(fast.engine.params_for(fast.params, "decode")["language_model"]["layers"], list)


def test_decode_step_of_several_rows(checkpoint):
    """A decode step of several rows (the server's slots), each at its own cache index, on the per-layer views
    of `prepare("decode")`, gives the logits of the reference set within fp32 reduction-order noise."""
    from llava_jax.llama import init_cache

    fast = llava_jax.load(checkpoint, kernels="xla_cpu")
    plain = llava_jax.LlavaModel(fast.config, fast.params, fast.dtype, kernels="reference")

    rng, cfg, rows, length = np.random.default_rng(4), fast.config.text, 3, 16
    cache = {n: rand(rng, *c.shape) for n, c in init_cache(cfg, rows, length).items()}
    args = (jnp.asarray([5, 900, 31000]), jnp.asarray([7, 3, 12]), jnp.asarray(rng.random((rows, length)) > 0.3),
            cache, jnp.asarray([7, 3, 12]))
    logits = {}
    for name, model in [("reference", plain), ("xla_cpu", fast)]:
        program_params = model.engine.params_for(model.params, "decode")
        logits[name] = np.asarray(jax.jit(model.engine.next_logits)(program_params, *args)[0])
    assert 0.5 < logits["reference"].std() < 50
    # fp32, only the summation order differs: measured 1.3e-6 of the logits' std; 1e-4 as in the end-to-end test
    # above, while a wrong layout, row or cache index moves logits by O(std)
    np.testing.assert_allclose(logits["xla_cpu"], logits["reference"], atol=1e-4 * logits["reference"].std())


def test_bf16_tracks_fp32(checkpoint):
    """bf16 (uint16 views in the scans, fp32 accumulation), both kernel sets, tracks fp32 within bf16
    rounding: 8 bits of mantissa over a few layers gives errors of a few percent of the logits' spread."""
    ids = prompt(seed=1, length=48)
    ref = llava_jax.load(checkpoint, dtype="float32").forward(ids)
    for kernels in ("xla_cpu", "reference"):
        out = llava_jax.load(checkpoint, dtype="bfloat16", kernels=kernels).forward(ids)
        assert np.abs(out - ref).max() / ref.std() < 0.1, kernels


@pytest.mark.parametrize("kernels", ["reference", "xla_cpu"])
def test_write_cache_one_slot_per_row(kernels):
    """A (batch,) write index (continuous batching: each row at its own length) writes row b at slot index[b],
    in a per-layer cache and, for xla_cpu's unrolled decode, in the stacked cache."""
    from llava_jax.kernels.xla_cpu import StackedCacheSlot

    K = get_kernels(kernels)
    rng = np.random.default_rng(4)
    cache = {n: rand(rng, 3, 10, 2, 4) for n in "kv"}
    k, v = rand(rng, 3, 1, 2, 4), rand(rng, 3, 1, 2, 4)
    index = jnp.array([0, 7, 3])
    keys, values, _ = jax.jit(K.write_cache)(cache, k, v, index)
    want = np.array(cache["k"])
    want[np.arange(3), np.array(index)] = np.asarray(k)[:, 0]
    np.testing.assert_array_equal(np.asarray(keys), want)
    if kernels == "xla_cpu":
        stack = {n: jnp.stack([cache[n], cache[n] + 1]) for n in "kv"}
        keys, stacked = jax.jit(lambda s, k, v, i: (lambda out: (out[0], out[2].stack))(
            K.write_cache(StackedCacheSlot(s, 1), k, v, i)))(stack, k, v, index)
        np.testing.assert_array_equal(np.asarray(stacked["k"][0]), np.asarray(cache["k"]))  # layer 0 untouched
        want1 = np.array(cache["k"] + 1)
        want1[np.arange(3), np.array(index)] = np.asarray(k)[:, 0]
        np.testing.assert_array_equal(np.asarray(keys), want1)
