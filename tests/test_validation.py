"""Boundary checks: token batches of `forward` / `generate_ids` and generation settings of `generate` / chat
are refused with an `InputError` naming the problem, instead of failing deep inside or running wrongly."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llava_jax.errors import InputError, SamplingError, TokenError
from llava_jax.sampling import Sampling, make_sampler
from llava_jax.validation import check_token_batch, validate_sampling


def ids(*rows):
    return np.array(rows, np.int64)


BAD_BATCHES = [
    (ids([1, 10**6, 3]), None, r"input_ids\[0, 1\] = 1000000 is not a token id: ids must be in \[0, 32064\)"),
    (ids([1, 2], [3, -5]), None, r"input_ids\[1, 1\] = -5 is not a token id"),
    (np.zeros((0, 4), np.int64), None, r"at least one row of at least one token, got shape \(0, 4\)"),
    (np.zeros((2, 0), np.int64), None, r"at least one row of at least one token, got shape \(2, 0\)"),
    (np.zeros((4,), np.int64), None, r"must be \(batch, seq\), got shape \(4,\)"),
    (np.array([[1.0, 2.0]]), None, "input_ids must be integers, got dtype float64"),
    (ids([1, 2, 3]), np.ones((1, 2)), r"attention_mask shape \(1, 2\) != input_ids shape \(1, 3\)"),
    (ids([1, 2, 3]), np.array([[0, 2, 1]]), "attention_mask must hold only 0"),
    (ids([1, 2], [3, 4]), np.array([[1, 1], [0, 0]]), "row 1 of attention_mask has no real token"),
    (np.ones((1, 8193), np.int64), None, "input_ids has 8193 positions; the model's context is 8192 tokens"),
]


@pytest.mark.parametrize("input_ids, mask, message", BAD_BATCHES)
def test_bad_token_batches_are_refused(tiny_model, input_ids, mask, message):
    with pytest.raises(TokenError, match=message):
        tiny_model.forward(input_ids, attention_mask=mask)
    with pytest.raises(TokenError, match=message):
        tiny_model.generate_ids(input_ids, attention_mask=mask, max_new_tokens=2)


def test_image_token_ids_are_allowed(tiny_model):
    config = tiny_model.config
    assert config.image_token_id == 32000 < config.text.vocab_size
    out, mask = check_token_batch([[1, config.image_token_id, 5]], None, config)
    assert out.dtype == np.int32 and mask.all()
    original = config.replace(image_token_id=-200)  # original checkpoints: outside the vocabulary
    check_token_batch([[1, -200, 5]], [[1, 1, 1]], original)
    with pytest.raises(TokenError, match="-201 is not a token id"):
        check_token_batch([[1, -201, 5]], None, original)


BAD_SETTINGS = [
    (dict(temperature=math.nan), "temperature must be a finite number >= 0"),
    (dict(temperature=math.inf), "temperature must be a finite number >= 0"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0, temperature=1.0), r"top_p must be a number in \(0, 1\]"),
    (dict(top_k=2.5, temperature=1.0), "top_k must be an integer >= 1"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 1, got 2.5"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
    (dict(stop=""), "stop strings must not be empty"),
    (dict(stop=["ok", ""]), "stop strings must not be empty"),
    (dict(stop=[3]), "stop must be a string or a list of strings"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(seed=2**64), "seed must be an integer"),
]


@pytest.mark.parametrize("kw, message", BAD_SETTINGS)
def test_bad_generation_settings_are_refused(tiny_model, kw, message):
    with pytest.raises(SamplingError, match=message):
        tiny_model.generate("Hi", **kw)
    with pytest.raises(SamplingError, match=message):
        tiny_model.chat(**kw).ask("Hi")
    if "stop" not in kw:
        with pytest.raises(SamplingError, match=message):
            tiny_model.generate_ids([[1, 5, 6]], **kw)


# ---------------------------------------------------------------- property: any value, a sampler or our error

ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3), st.lists(st.text(max_size=2), max_size=2), st.just(np.float32(0.5)), st.just(np.int64(3)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(temperature=ANY_VALUE, top_p=ANY_VALUE, top_k=ANY_VALUE, max_new_tokens=ANY_VALUE, stop=ANY_VALUE,
       seed=ANY_VALUE)
def test_any_sampling_values_give_a_sampler_or_a_sampling_error(temperature, top_p, top_k, max_new_tokens, stop,
                                                                  seed):
    try:
        validate_sampling(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                          stop=stop, seed=seed)
        sampler = make_sampler(temperature, top_k, top_p)
    except SamplingError as e:
        assert str(e) and isinstance(e, InputError)
        return
    assert isinstance(sampler, Sampling)
    t, k, p = float(sampler.temperature), int(sampler.k), float(sampler.p)
    assert math.isfinite(t) and t >= 0 and k >= 0 and 0 < p <= 1


def test_top_p_that_rounds_to_zero_in_float32_is_refused():
    """Found by the property test above: 1.3e-233 is in (0, 1] as a Python float but 0 as the sampler's float32."""
    with pytest.raises(SamplingError, match=r"top_p must be a number in \(0, 1\]"):
        validate_sampling(top_p=1.300560862568318e-233)
    validate_sampling(top_p=1e-45)  # float32's smallest subnormal stays positive
