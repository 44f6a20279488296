"""The sampler on fixed logits: greedy, temperature, top-k and top-p keep exactly the tokens they should, and
bad settings are refused with a message naming them."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.errors import InputError, SamplingError
from llava_jax.sampling import Sampling, make_sampler, top_k_mask, top_p_mask

LOGITS = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15]], jnp.float32))  # probabilities, shuffled order


def draws(sampler, n=4000, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    return np.asarray(jax.vmap(lambda k: sampler(LOGITS, k))(keys))[:, 0]


def test_greedy_is_argmax():
    assert set(draws(make_sampler(0.0), 50)) == {1}
    # temperature 0 ignores the cuts: still the argmax
    assert set(draws(make_sampler(0.0, top_k=3, top_p=0.5), 50)) == {1}


def test_top_p_keeps_the_nucleus_only():
    # sorted: 0.4 (1), 0.3 (3), 0.15 (4), 0.1 (2), 0.05 (0). p=0.65: 0.4 < 0.65, 0.7 >= 0.65 -> {1, 3}
    assert np.asarray(top_p_mask(LOGITS, 0.65))[0].tolist() == [False, True, False, True, False]
    # p=0.71: the first two tokens reach 0.7 < 0.71, so the third (0.15) joins the nucleus
    assert np.asarray(top_p_mask(LOGITS, 0.71))[0].tolist() == [False, True, False, True, True]
    seen = draws(make_sampler(1.0, top_p=0.65))
    assert set(seen) == {1, 3}
    # renormalized over the nucleus: 0.4 / 0.7 = 0.571; 4000 draws: 3 standard errors ~ 0.024
    assert abs(np.mean(seen == 1) - 0.4 / 0.7) < 0.03


def test_top_k_and_temperature():
    assert np.asarray(top_k_mask(LOGITS, 2))[0].tolist() == [False, True, False, True, False]
    assert np.asarray(top_k_mask(LOGITS, 99))[0].tolist() == [True] * 5  # k past the vocabulary keeps all
    assert set(draws(make_sampler(1.0, top_k=2))) == {1, 3}
    assert set(draws(make_sampler(1.0, top_k=1))) == {1}
    seen = draws(make_sampler(1.0))
    freq = np.bincount(seen, minlength=5) / len(seen)
    # 4000 draws: 3 standard errors of the largest frequency (0.4) ~ 0.023
    np.testing.assert_allclose(freq, np.exp(np.asarray(LOGITS[0])), atol=0.03)
    cold = draws(make_sampler(0.05), 200)
    assert np.mean(cold == 1) > 0.99


def test_plain_temperature_sampling_is_categorical_of_scaled_logits():
    """At k = 0, p = 1 the sampler is exactly `categorical(logits / T)`: the same key gives the same draw."""
    s = Sampling(jnp.float32(0.8), jnp.int32(0), jnp.float32(1.0))
    for seed in range(20):
        key = jax.random.PRNGKey(seed)
        assert int(s(LOGITS, key)[0]) == int(jax.random.categorical(key, LOGITS / 0.8, axis=-1)[0])


BAD = [
    (dict(temperature=-1), "temperature must be a finite number >= 0"),
    (dict(temperature=math.nan), "temperature must be a finite number >= 0"),
    (dict(temperature=math.inf), "temperature must be a finite number >= 0"),
    (dict(temperature="0.7"), "temperature must be a finite number"),
    (dict(temperature=1, top_p=0), r"top_p must be a number in \(0, 1\]"),
    (dict(temperature=1, top_p=1.5), r"top_p must be a number in \(0, 1\]"),
    (dict(temperature=1, top_p=math.nan), r"top_p must be a number in \(0, 1\]"),
    (dict(temperature=1, top_k=0), "top_k must be an integer >= 1"),
    (dict(temperature=1, top_k=-3), "top_k must be an integer >= 1"),
    (dict(temperature=1, top_k=2.5), "top_k must be an integer >= 1, got 2.5"),
    (dict(temperature=1, top_k=True), "top_k must be an integer >= 1, got True"),
]


@pytest.mark.parametrize("kw, message", BAD)
def test_bad_sampling_arguments(kw, message):
    with pytest.raises(SamplingError, match=message):
        make_sampler(**kw)
    assert issubclass(SamplingError, InputError)
