"""LLaVA-NeXT end-to-end fp32 logits parity against transformers' LlavaNextForConditionalGeneration.

Images of different sizes land on different pinpoints (1x2, 2x1, 2x2, 3x1 grids at this toy crop size of 56)
and exercise unpad in both directions. Bound as in test_parity_llava.py: max |diff| < 1e-4 on logits of order
one; both sides fp32, differing only in summation order.
"""

import numpy as np
import pytest
import torch

import llava_jax
from llava_jax.batch import ImageCrops, left_pad, make_batch, prompt_bucket

from builders import IMAGE_TOKEN, build_llava, save

BOUND = 1e-4
SIZES = [(40, 100), (150, 47), (120, 110), (30, 31)]  # (height, width)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = build_llava("llava_next", "gqa", seed=11)
    return hf, llava_jax.load(save(hf, tmp_path_factory.mktemp("next") / "ckpt"))


def test_llava_next_logits_match_transformers(models):
    hf, model = models
    plans = [model.plan_image(h, w) for h, w in SIZES]
    assert len({(p.rows, p.cols) for p in plans}) >= 3
    counts = [p.num_tokens for p in plans]
    rng = np.random.default_rng(12)
    # rows: image 0; left padding + images 1 and 2; image 3 then text; a text-only row
    texts = [rng.integers(0, IMAGE_TOKEN - 10, n) for n in (5, 3, 4, 6, 7, 9, 8)]
    img = lambda k: np.full(counts[k], IMAGE_TOKEN)  # noqa: E731
    rows = [
        np.concatenate([texts[0], img(0), texts[1]]),
        np.concatenate([texts[2], img(1), texts[3], img(2)]),
        np.concatenate([img(3), texts[4]]),
        texts[5],
    ]
    seq = max(map(len, rows))
    ids = np.zeros((len(rows), seq), np.int64)
    mask = np.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, seq - len(r):], mask[b, seq - len(r):] = r, 1
    max_crops = max(p.num_crops for p in plans)
    px = np.zeros((len(SIZES), max_crops, 3, 56, 56), np.float32)
    for i, p in enumerate(plans):
        px[i, : p.num_crops] = rng.standard_normal((p.num_crops, 3, 56, 56))
    sizes = np.array(SIZES)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), image_sizes=torch.tensor(sizes),
                 attention_mask=torch.tensor(mask)).logits.numpy()
    out = model.forward(ids, px, image_sizes=sizes, attention_mask=mask)
    valid = mask.astype(bool)
    assert 0.5 < ref[valid].std() < 5 and len(set(ref.argmax(-1)[valid].tolist())) > 10
    np.testing.assert_array_less(np.abs(out - ref)[valid], BOUND)
    np.testing.assert_array_equal(out.argmax(-1)[valid], ref.argmax(-1)[valid])


def test_vision_graph_compiles_once_per_pinpoint(models):
    """Fifty new image sizes after one warm-up image per pinpoint: no new vision compilation."""
    _, model = models
    rng = np.random.default_rng(13)
    engine = model.engine

    def encode(plan):
        image = ImageCrops.create(model.config, np.zeros((plan.num_crops, 3, 56, 56), np.float32), plan)
        tokens = [model.config.image_token_id] * image.num_features
        ids, mask = left_pad([tokens], prompt_bucket(500))  # one prompt bucket for every size here
        embeds = engine.embeddings(model.params, make_batch(ids, mask, [image], model.config.image_token_id))
        assert embeds.shape == (1, prompt_bucket(500), model.config.text.hidden_size)

    before = engine.insert_images._cache_size()  # programs of the other tests' prompt shapes
    seen = {}
    for h, w in [(56, 112), (112, 56), (112, 112), (56, 168), (168, 56), (30, 31)]:
        plan = model.plan_image(h, w)
        seen[(plan.rows, plan.cols)] = plan
        encode(plan)
    warm = engine.insert_images._cache_size()
    assert warm - before == len(seen) <= 5
    for _ in range(50):
        h, w = rng.integers(1, 500, 2)
        encode(model.plan_image(int(h), int(w)))
    assert engine.insert_images._cache_size() == warm


def test_pixel_values_with_too_few_crops(models):
    _, model = models
    with pytest.raises(llava_jax.InputError, match="needs 5 crops"):
        model.image_crops(np.zeros((1, 3, 3, 56, 56), np.float32), image_sizes=[[120, 110]])
