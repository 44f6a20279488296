"""The training loss and its gradients equal HF's: `LlavaModel.loss_and_grad` (llava_jax/train/loss.py, the loss
the trainer uses) against torch autograd through transformers' LlavaForConditionalGeneration /
LlavaNextForConditionalGeneration called with `labels`, on tiny random-weight models with GQA and left padding:
LLaVA-1.5 with vision_feature_select_strategy "full" (CLS kept), LLaVA-NeXT with "default" (CLS dropped) and
images on two different AnyRes grids (LLaVA-NeXT refuses "full", as transformers does).
Every parameter's gradient is compared, by its llava-hf name (`export_hf_state_dict`), and one step of the
trainer's optimizer (clipping + AdamW) equals torch's `clip_grad_norm_` + `torch.optim.AdamW` on the same
gradients.

Bounds: the loss within 1e-5 relative; each gradient within 1e-4 of its largest magnitude. Both sides are fp32
and differ in summation order only (measured: loss 8e-8 relative; projector gradients 4e-7 to 1.4e-6, the earlier
network-only version of this test 4e-7 to 2.2e-6 over all tensors); a wrong mask, a missing
shift or a wrong normalization of the loss moves gradients by more than 1e-2.
"""

import jax
import numpy as np
import pytest
import torch

import llava_jax
from llava_jax.export import export_hf_state_dict
from llava_jax.train.optim import OptimConfig, make_optimizer, merge_params, split_params, trainable_mask
from llava_jax.weights import canonical_name

from builders import IMAGE_TOKEN, build_llava, image_rows, random_pixels, save

NEXT_SIZES = [(40, 100), (120, 110)]


def _labels(ids, mask):
    labels = np.where((mask == 1) & (ids != IMAGE_TOKEN), ids, -100)
    # A left-padded row's first token is "predicted" by a padding query that sees no key (its logits are
    # implementation-defined garbage on both sides): no label there.
    first = mask.argmax(axis=1)
    labels[np.arange(len(ids)), first] = -100
    return labels


def _case(kind, strategy, tmp_path):
    hf = build_llava(kind, "gqa", strategy=strategy, seed=21)
    model = llava_jax.load(save(hf, tmp_path / "ckpt"), kernels="reference")
    if kind == "llava":
        n = model.config.tokens_per_crop
        ids, mask = image_rows([[4, ("img", 0), 9], [("img", 1), 6]], [n, n], seed=22)
        px = np.random.default_rng(23).standard_normal((2, 3, 56, 56)).astype(np.float32)
        sizes = None
    else:
        plans = [model.plan_image(h, w) for h, w in NEXT_SIZES]
        assert len({(p.rows, p.cols) for p in plans}) == 2
        ids, mask = image_rows([[4, ("img", 0), 9], [("img", 1), 6]], [p.num_tokens for p in plans], seed=22)
        px, sizes = random_pixels([p.num_crops for p in plans], seed=23), NEXT_SIZES
    assert (mask == 0).any()  # left padding is exercised
    return hf, model, ids, mask, _labels(ids, mask), px, sizes


def _torch_grads(hf, ids, mask, labels, px, sizes):
    hf.zero_grad()
    extra = {} if sizes is None else {"image_sizes": torch.tensor(sizes)}
    out = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), attention_mask=torch.tensor(mask),
             labels=torch.tensor(labels), **extra)
    out.loss.backward()
    return out.loss.item(), {canonical_name(n, "hf"): p.grad.numpy().copy()
                             for n, p in hf.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def computed(tmp_path_factory):
    """Per (kind, strategy): the case, torch's loss and gradients, and `loss_and_grad`'s (computed once)."""
    cache = {}

    def get(kind, strategy):
        if (kind, strategy) not in cache:
            case = _case(kind, strategy, tmp_path_factory.mktemp(kind))
            hf, model, ids, mask, labels, px, sizes = case
            cache[kind, strategy] = (case, _torch_grads(hf, ids, mask, labels, px, sizes),
                                     model.loss_and_grad(ids, labels, px, sizes, mask))
        return cache[kind, strategy]

    return get


@pytest.mark.parametrize("kind,strategy", [("llava", "full"), ("llava_next", "default")])
def test_loss_and_grad_match_torch_autograd(kind, strategy, computed):
    (hf, model, ids, mask, labels, px, sizes), (ref_loss, ref_grads), (loss, grads) = computed(kind, strategy)
    assert abs(loss - ref_loss) < 1e-5 * ref_loss
    if kind == "llava_next":  # `loss` (its own forward-only program: one more compile) once
        assert abs(model.loss(ids, labels, px, sizes, mask) - ref_loss) < 1e-5 * ref_loss
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(model.params)

    ours = {canonical_name(n, "hf"): v for n, v in export_hf_state_dict(grads, model.config).items()}
    # every tensor that receives a gradient in torch is compared (CLIP's last layer and post_layernorm never
    # influence LLaVA's output: torch gives them no gradient and llava-jax does not hold them)
    assert set(ref_grads) <= set(ours), sorted(set(ref_grads) - set(ours))
    for name, ref in ref_grads.items():
        if name.endswith("k_proj.bias"):
            # softmax is invariant to adding one constant to every score of a query, so the key bias has a zero
            # gradient in exact math; both sides hold rounding noise: check it is noise, relative to the weight's
            weight = ref_grads[name.replace(".bias", ".weight")]
            assert np.abs(np.asarray(ours[name])).max() < 1e-5 * np.abs(weight).max(), name
            assert np.abs(ref).max() < 1e-5 * np.abs(weight).max(), name
            continue
        assert np.abs(ref).max() > 0, name  # every compared tensor really receives a gradient
        err = np.abs(np.asarray(ours[name]) - ref).max() / np.abs(ref).max()
        assert err < 1e-4, (name, err)


def test_optimizer_step_matches_torch_adamw(computed):
    """Two optimizer steps of the trainer's optax chain (clip to norm 1.0, AdamW with decay on all but biases and
    norm scales; stage `finetune`: projector + language model) equal torch's `clip_grad_norm_` +
    `torch.optim.AdamW` with a cosine `LambdaLR` on the same gradients (ours, exported to torch layout), scaled
    up so that clipping is active. Bound: 1e-6 of the tensor's largest param (fp32 elementwise math in another
    order; a wrong bias correction, decay mask, schedule or clip moves params by > 1e-4)."""
    (hf, model, *_), _, (_, grads) = computed("llava", "full")
    cfg = OptimConfig(lr=1e-2, total_steps=10, warmup_ratio=0.0, weight_decay=0.1)
    params = model.params
    trainable, frozen = split_params(params, trainable_mask(params, "finetune"))
    tx = make_optimizer(cfg, trainable)
    state = tx.init(trainable)
    update = jax.jit(tx.update)
    named = dict(hf.named_parameters())
    torch_trainable = [n for n in named if not n.startswith("model.vision_tower.")]
    is_no_decay = lambda n: n.endswith("bias") or "norm" in n  # noqa: E731
    topt = torch.optim.AdamW([{"params": [named[n] for n in torch_trainable if not is_no_decay(n)], "weight_decay": 0.1},
                              {"params": [named[n] for n in torch_trainable if is_no_decay(n)], "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(topt, lambda s: 0.5 * (1 + np.cos(np.pi * s / 10)))
    exported = {canonical_name(n, "hf"): v for n, v in export_hf_state_dict(grads, model.config).items()}
    for step in range(2):
        scale = 10.0 * (step + 1)  # a global norm well above 1: clipping matters
        for n in torch_trainable:
            named[n].grad = torch.tensor(np.asarray(exported[canonical_name(n, "hf")]) * scale)
        torch.nn.utils.clip_grad_norm_([named[n] for n in torch_trainable], 1.0)
        topt.step()
        sched.step()
        step_grads = split_params(jax.tree_util.tree_map(lambda g, s=scale: g * s, grads),
                                  trainable_mask(params, "finetune"))[0]
        updates, state = update(step_grads, state, trainable)
        trainable = jax.tree_util.tree_map(lambda p, u: p + u, trainable, updates)

    ours = {canonical_name(n, "hf"): v for n, v in
            export_hf_state_dict(merge_params(trainable, frozen), model.config).items()}
    for n in torch_trainable:
        ref = named[n].detach().numpy()
        err = np.abs(np.asarray(ours[canonical_name(n, "hf")]) - ref).max() / np.abs(ref).max()
        assert err < 1e-6, (n, err)
