"""Samplers on fixed logits: greedy, temperature, top-k and top-p keep exactly the tokens they should."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.sampling import Greedy, Sampling, Temperature, TopK, TopP, make_sampler, top_k_mask, top_p_mask

LOGITS = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15]], jnp.float32))  # probabilities, shuffled order


def draws(sampler, n=4000, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    return np.asarray(jax.vmap(lambda k: sampler(LOGITS, k))(keys))[:, 0]


def test_greedy_is_argmax():
    assert int(Greedy()(LOGITS, None)[0]) == 1
    assert set(draws(make_sampler(0.0), 50)) == {1}


def test_top_p_keeps_the_nucleus_only():
    # sorted: 0.4 (1), 0.3 (3), 0.15 (4), 0.1 (2), 0.05 (0). p=0.65: 0.4 < 0.65, 0.7 >= 0.65 -> {1, 3}
    assert np.asarray(top_p_mask(LOGITS, 0.65))[0].tolist() == [False, True, False, True, False]
    # p=0.71: the first two tokens reach 0.7 < 0.71, so the third (0.15) joins the nucleus
    assert np.asarray(top_p_mask(LOGITS, 0.71))[0].tolist() == [False, True, False, True, True]
    seen = draws(TopP(jnp.float32(0.65), jnp.float32(1.0)))
    assert set(seen) == {1, 3}
    # renormalized over the nucleus: 0.4 / 0.7 = 0.571
    assert abs(np.mean(seen == 1) - 0.4 / 0.7) < 0.03


def test_top_k_and_temperature():
    assert np.asarray(top_k_mask(LOGITS, 2))[0].tolist() == [False, True, False, True, False]
    assert set(draws(TopK(jnp.int32(2), jnp.float32(1.0)))) == {1, 3}
    seen = draws(Temperature(jnp.float32(1.0)))
    freq = np.bincount(seen, minlength=5) / len(seen)
    np.testing.assert_allclose(freq, np.exp(np.asarray(LOGITS[0])), atol=0.03)
    cold = draws(Temperature(jnp.float32(0.05)), 200)
    assert np.mean(cold == 1) > 0.99


def test_combined_sampler_matches_the_single_ones():
    assert set(draws(make_sampler(1.0, top_k=2))) == {1, 3}
    assert set(draws(make_sampler(1.0, top_p=0.65))) == {1, 3}
    assert set(draws(make_sampler(1.0, top_k=1))) == {1}
    # same key, same draw: the combined sampler at k=0, p=1 is plain temperature sampling
    key = jax.random.PRNGKey(3)
    s = Sampling(jnp.float32(0.8), jnp.int32(0), jnp.float32(1.0))
    assert int(s(LOGITS, key)[0]) == int(Temperature(jnp.float32(0.8))(LOGITS, key)[0])


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(temperature=1, top_p=0), dict(temperature=1, top_k=0)])
def test_bad_sampling_arguments(kw):
    with pytest.raises(ValueError):
        make_sampler(**kw)
