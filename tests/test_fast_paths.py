"""The CPU fast paths change speed, never results: per-layer weight views in decode, uint16 views of 16-bit
stacks for the scanned programs, the padded one-row bf16 matmul, the one-query attention.

Tiny models from `llava-jax bench --make-checkpoint --shape tiny` (random weights, real structure).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llava_jax
from llava_jax.attention import MIN, _one_query_attention
from llava_jax.bench import make_checkpoint
from llava_jax.layers import bits_view, dense_fp32
from llava_jax.llama import unstack_layers


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("fast") / "tiny", "tiny"))


def prompt(model, seed=0, length=40):
    rng = np.random.default_rng(seed)
    return rng.integers(3, 30000, (1, length))


def test_views_share_memory(checkpoint):
    model = llava_jax.load(checkpoint, dtype="bfloat16")
    layers = model.params["language_model"]["layers"]
    unstacked = unstack_layers(model.params)["language_model"]["layers"]
    assert len(unstacked) == model.config.text.num_layers
    stacked = layers["down_proj"]["kernel"]
    row = stacked.nbytes // stacked.shape[0]
    for i, p in enumerate(unstacked):
        assert p["down_proj"]["kernel"].unsafe_buffer_pointer() == stacked.unsafe_buffer_pointer() + i * row
        np.testing.assert_array_equal(np.asarray(p["down_proj"]["kernel"]), np.asarray(stacked[i]))
    bits = bits_view(model.params)
    view = bits["language_model"]["layers"]["down_proj"]["kernel"]
    assert view.dtype == jnp.uint16 and view.unsafe_buffer_pointer() == stacked.unsafe_buffer_pointer()
    assert bits["language_model"]["embed_tokens"]["embedding"] is model.params["language_model"]["embed_tokens"][
        "embedding"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_views_and_bits_give_the_same_tokens(checkpoint, dtype, monkeypatch):
    """Generation with the fast paths equals generation with them off (the stacked, scanned programs)."""
    model = llava_jax.load(checkpoint, dtype=dtype)
    ids = prompt(model)
    fast = model.generate_ids(ids, max_new_tokens=12, stop_token_ids=[])
    assert isinstance(model.decoder.decode_params(model.params)["language_model"]["layers"], list)
    monkeypatch.setenv("LLAVA_JAX_UNSTACKED_DECODE", "0")
    plain = llava_jax.LlavaModel(model.config, model.params, model.dtype)
    plain.decoder.scan_params = lambda params: params  # no uint16 views either
    assert plain.generate_ids(ids, max_new_tokens=12, stop_token_ids=[]) == fast


def test_bf16_forward_is_close_to_fp32(checkpoint):
    """bf16 (uint16 views in the scans, fp32 accumulation) tracks fp32 within bf16 rounding."""
    ids = prompt(None, seed=1, length=48)
    ref = llava_jax.load(checkpoint, dtype="float32").forward(ids)
    out = llava_jax.load(checkpoint, dtype="bfloat16").forward(ids)
    err = np.abs(out - ref).max() / ref.std()
    assert err < 0.1, err


def test_padded_one_row_bf16_matmul_is_exact():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((1, 1, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((64, 48)), jnp.bfloat16)
    ref = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(jax.jit(dense_fp32)(x, w)), np.asarray(ref), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [1, 2, 4, 8])
def test_one_query_attention_matches_the_plain_formula(kv_heads):
    rng = np.random.default_rng(kv_heads)
    q = jnp.asarray(rng.standard_normal((2, 1, 8, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 40, kv_heads, 16)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 40, kv_heads, 16)), jnp.float32)
    mask = jnp.asarray(rng.random((2, 1, 1, 40)) > 0.3)
    qg = q.reshape(2, 1, kv_heads, 8 // kv_heads, 16)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k) * 16**-0.5
    probs = jax.nn.softmax(jnp.where(mask[:, :, None], scores, MIN), axis=-1)
    ref = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v).reshape(2, 1, 8, 16)
    np.testing.assert_allclose(np.asarray(_one_query_attention(q, k, v, mask)), np.asarray(ref), atol=1e-6)
