"""The KV-cache interface: a prefill that writes the cache, then one-token steps, equals one full pass."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import llava_jax
from llava_jax.llama import init_cache
from llava_jax.network import LlavaNetwork

from builders import IMAGE_TOKEN, build_llava, save


def test_prefill_then_steps_equal_full_forward(tmp_path):
    model = llava_jax.load(save(build_llava("llava", "gqa", seed=8), tmp_path / "ckpt"))
    apply = functools.partial(model.network.apply, {"params": model.params})
    rng = np.random.default_rng(9)
    batch, prompt, steps, cache_len = 2, 14, 5, 24
    ids = rng.integers(0, IMAGE_TOKEN, (batch, prompt + steps))
    mask = np.ones_like(ids, bool)
    mask[1, :3] = False  # left padding
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # generate-style positions

    full = model.forward(ids, attention_mask=mask, position_ids=positions)

    @jax.jit
    def prefill(tokens, pos, prompt_mask, cache):
        hidden, cache = apply(apply(tokens, method=LlavaNetwork.embed), pos, prompt_mask, cache,
                              method=LlavaNetwork.prefill)
        return apply(hidden, method=LlavaNetwork.logits), cache

    @jax.jit
    def step(tokens, pos, kv_mask, cache, index):
        hidden, cache = apply(apply(tokens, method=LlavaNetwork.embed), pos, kv_mask, cache, index,
                              method=LlavaNetwork.decode_step)
        return apply(hidden, method=LlavaNetwork.logits), cache

    kv_mask = np.zeros((batch, cache_len), bool)
    kv_mask[:, :prompt] = mask[:, :prompt]
    cache = init_cache(model.config.text, batch, cache_len)
    logits, cache = prefill(ids[:, :prompt], positions[:, :prompt], mask[:, :prompt], cache)
    got = [np.asarray(logits)]
    for t in range(prompt, prompt + steps):
        kv_mask[:, t] = True
        logits, cache = step(ids[:, t : t + 1], positions[:, t : t + 1], kv_mask, cache, jnp.int32(t))
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    # Same fp32 arithmetic, other shapes (a 24-slot cache vs 19): only summation order differs.
    np.testing.assert_array_less(np.abs(got - full)[mask], 1e-5)
    assert step._cache_size() == 1  # one step program for every position: the write index is traced
