"""Image features stay on the device: from the vision programs to prefill and the logits, no array is read
back to the host.

JAX's transfer guard cannot show this on the CPU backend (a CPU "device" buffer is host memory: reading it is
no transfer, and the guard stays silent even for `np.asarray`), so the test makes every host read of a
jax.Array fail instead: `ArrayImpl._value` (behind `int()`, `.tolist()`, `jax.device_get`, printing) and
`np.asarray` / `np.array` of a jax.Array (numpy reads CPU arrays through the buffer protocol, not `_value`).
"""

import contextlib

import jax
import numpy as np
import pytest
from jax._src.array import ArrayImpl

import llava_jax
from llava_jax.batch import cache_bucket, left_pad, make_batch, prompt_bucket
from llava_jax.engine import stop_id_array
from llava_jax.sampling import make_sampler

from builders import IMAGE_TOKEN, build_llava, random_pixels, save

SIZES = [(40, 100), (150, 47)]


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads():
    def refuse(array):
        raise HostRead(f"a {array.shape} array was read back to the host")

    def guarded(convert):
        def convert_host_values_only(x, *args, **kwargs):
            if isinstance(x, jax.Array):
                refuse(x)
            return convert(x, *args, **kwargs)
        return convert_host_values_only

    value, asarray, array = ArrayImpl._value, np.asarray, np.array
    ArrayImpl._value = property(refuse)
    np.asarray, np.array = guarded(asarray), guarded(array)
    try:
        yield
    finally:
        ArrayImpl._value, np.asarray, np.array = value, asarray, array


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return llava_jax.load(save(build_llava("llava_next", "gqa", seed=41), tmp_path_factory.mktemp("dev") / "ckpt"))


def test_no_host_transfer_between_vision_and_prefill(model):
    images = model.image_crops(random_pixels([model.plan_image(*s).num_crops for s in SIZES], seed=42), SIZES)
    rng = np.random.default_rng(43)
    rows = [[*rng.integers(3, IMAGE_TOKEN - 10, 5), *[IMAGE_TOKEN] * images[0].num_features, 7],
            [*[IMAGE_TOKEN] * images[1].num_features, *rng.integers(3, IMAGE_TOKEN - 10, 3)]]
    bucket = prompt_bucket(max(map(len, rows)))
    ids, mask = left_pad(rows, bucket)
    batch = make_batch(ids, mask, images, IMAGE_TOKEN)
    engine, params = model.engine, model.params
    sampler, key, stops = engine.put_replicated((make_sampler(0.0), jax.random.PRNGKey(0), stop_id_array([2])))
    max_new = engine.put_replicated(np.int32(4))
    positions, attention_mask = engine.put_input("positions", batch.positions), engine.put_input(
        "attention_mask", batch.attention_mask)
    with no_host_reads():
        embeds = engine.embeddings(params, batch)
        logits = engine.logits(params, embeds, positions, attention_mask)
        state = engine.prefill(params, embeds, positions, attention_mask, sampler, key, stops, max_new,
                               cache_bucket(bucket + 4))
        with pytest.raises(HostRead):  # the guard is really on
            np.asarray(logits)
    assert int(state.step) == 1 and np.asarray(logits).shape == (2, bucket, model.config.text.vocab_size)
