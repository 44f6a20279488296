"""The network is differentiable math: `jax.grad` of a cross-entropy loss through the whole LLaVA-NeXT forward
(vision tower, projector, image_newline packing, decoder) equals torch autograd through HF's
LlavaNextForConditionalGeneration with `labels`, on a tiny random-weight model with GQA, left padding and
images on two different AnyRes grids.

Bounds: the loss within 1e-5 relative; each gradient within 1e-4 of its largest magnitude. Both sides are fp32
and differ in summation order only (measured: loss 8e-8, gradients 4e-7 to 2.2e-6); a wrong mask, a missing shift or a wrong
normalization of the loss moves gradients by more than 1e-2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import llava_jax
from llava_jax.batch import make_batch

from builders import IMAGE_TOKEN, build_llava, save

SIZES = [(40, 100), (120, 110)]


def cross_entropy(logits, labels):
    """Mean next-token cross-entropy over the labels that are not -100, as HF computes it."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    valid = labels != -100
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.sum(valid)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    hf = build_llava("llava_next", "gqa", seed=21)
    model = llava_jax.load(save(hf, tmp_path_factory.mktemp("grad") / "ckpt"), kernels="reference")
    plans = [model.plan_image(h, w) for h, w in SIZES]
    assert len({(p.rows, p.cols) for p in plans}) == 2
    rng = np.random.default_rng(22)
    text = lambda n: rng.integers(3, IMAGE_TOKEN - 10, n)  # noqa: E731
    rows = [np.concatenate([text(4), np.full(plans[0].num_tokens, IMAGE_TOKEN), text(9)]),
            np.concatenate([np.full(plans[1].num_tokens, IMAGE_TOKEN), text(6)])]
    seq = max(map(len, rows))
    ids = np.zeros((2, seq), np.int64)
    mask = np.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, seq - len(r):], mask[b, seq - len(r):] = r, 1
    labels = np.where((mask == 1) & (ids != IMAGE_TOKEN), ids, -100)
    # A left-padded row's first token is "predicted" by a padding query that sees no key (its logits are
    # implementation-defined garbage on both sides): no label there.
    labels[np.arange(2), seq - np.array([len(r) for r in rows])] = -100
    px = np.zeros((2, max(p.num_crops for p in plans), 3, 56, 56), np.float32)
    for i, p in enumerate(plans):
        px[i, : p.num_crops] = rng.standard_normal((p.num_crops, 3, 56, 56))
    return hf, model, ids, mask, labels, px


def test_grad_matches_torch_autograd(case):
    hf, model, ids, mask, labels, px = case
    hf.zero_grad()
    out = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), image_sizes=torch.tensor(SIZES),
             attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    out.loss.backward()
    torch_grads = {n: p.grad.numpy() for n, p in hf.named_parameters() if p.grad is not None}

    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)  # HF's forward: 0..seq-1
    batch = make_batch(ids, mask, model.image_crops(px, SIZES), IMAGE_TOKEN, positions=positions)
    crops, index, where = batch.stacked_images(model.config.tokens_per_crop)

    def loss_fn(params):
        logits = model.network.apply({"params": params}, batch.input_ids, batch.attention_mask, batch.positions,
                                     crops, index, where)
        return cross_entropy(logits, jnp.asarray(labels))

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(model.params)
    assert abs(float(loss) - out.loss.item()) < 1e-5 * out.loss.item()

    lm, vt = grads["language_model"], grads["vision_tower"]
    pairs = {  # llava-hf name -> our gradient in torch layout
        "lm_head.weight": lm["lm_head"]["kernel"].T,
        "model.language_model.embed_tokens.weight": lm["embed_tokens"]["embedding"],
        "model.language_model.norm.weight": lm["norm"]["scale"],
        "model.image_newline": grads["image_newline"],
        "model.multi_modal_projector.linear_1.weight": grads["multi_modal_projector"]["linear_1"]["kernel"].T,
        "model.multi_modal_projector.linear_2.bias": grads["multi_modal_projector"]["linear_2"]["bias"],
        "model.vision_tower.embeddings.class_embedding": vt["class_embedding"],
        "model.vision_tower.embeddings.position_embedding.weight": vt["position_embedding"],
        "model.vision_tower.pre_layrnorm.weight": vt["pre_layrnorm"]["scale"],
    }
    for i in range(model.config.text.num_layers):
        layer = lm["layers"]
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            pairs[f"model.language_model.layers.{i}.{proj}.weight"] = layer[proj.split(".")[1]]["kernel"][i].T
        pairs[f"model.language_model.layers.{i}.input_layernorm.weight"] = layer["input_layernorm"]["scale"][i]
    for i in range(model.config.vision_layers_used):
        layer = vt["layers"]
        for name, ours in [("self_attn.v_proj.weight", layer["v_proj"]["kernel"][i].T),
                           ("self_attn.q_proj.bias", layer["q_proj"]["bias"][i]),
                           ("mlp.fc1.weight", layer["fc1"]["kernel"][i].T),
                           ("layer_norm2.bias", layer["layer_norm2"]["bias"][i])]:
            pairs[f"model.vision_tower.encoder.layers.{i}.{name}"] = ours
    for name, ours in pairs.items():
        ref = torch_grads[name]
        assert np.abs(ref).max() > 0, name  # every compared tensor really receives a gradient
        err = np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max()
        assert err < 1e-4, (name, err)
