"""LoRA (llava_jax/train/lora.py): the adapted forward, gradients against torch + peft, the trainable count
against peft's, the merged export in transformers, saved adapters, a LoRA training run, and bad flags.

The parity model is a tiny random-weight LLaVA-1.5 (GQA Mistral text model) built with transformers; peft wraps
the same model with adapters on the language model's q/k/v/o/gate/up/down (the original's
`find_all_linear_names`) and the projector trainable, as the original's LoRA runs. Both sides get the same
adapters with a nonzero B (a fresh B is zero: A's gradient would be zero and prove nothing).

Bounds (both sides fp32, differing in summation order only; a wrong scale, a transposed or misplaced adapter
moves the compared numbers by more than 1e-2):
- logits: max |diff| < 1e-4, as test_export.py / test_parity_llava.py;
- gradients: each tensor within 1e-4 of its largest magnitude, as test_grad.py;
- the forward against a model whose kernels hold W + (alpha/r) A B (computed in float64 here): 1e-4.
"""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_train import write_data

import llava_jax
from llava_jax import cli
from llava_jax.default_model import write_small_model
from llava_jax.linear import add_low_rank
from llava_jax.train.lora import (
    DEFAULT_TARGETS,
    LoraConfig,
    add_adapters,
    apply_adapter,
    count_params,
    for_network,
    load_adapter,
    save_adapter,
    trainable_mask,
    trainable_split,
)
from llava_jax.train.loss import cross_entropy, hf_inputs_batch, target_logits
from llava_jax.train.optim import merge_params, split_params

from builders import IMAGE_TOKEN, build_llava, image_rows, random_pixels, save

BOUND = 1e-4
CFG = LoraConfig(r=4, alpha=8.0, dropout=0.0)  # scale 2: a wrong scale shows


def _random_b(params, seed):
    """Adapters with a nonzero B (~ N(0, 0.1^2)): the adapted model differs from the base by O(1) logits."""
    layers = dict(params["language_model"]["layers"])
    rng = np.random.default_rng(seed)
    for name in CFG.targets:
        b = layers[name]["lora_b"]
        layers[name] = {**layers[name], "lora_b": jnp.asarray(0.1 * rng.standard_normal(b.shape), b.dtype)}
    return {**params, "language_model": {**params["language_model"], "layers": layers}}


def _labels(ids, mask):
    labels = np.where((mask == 1) & (ids != IMAGE_TOKEN), ids, -100)
    labels[np.arange(len(ids)), mask.argmax(axis=1)] = -100  # a left-padded row's first token: no label
    return labels


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The HF model, its llava-jax load with adapters (random B), the peft model with the same adapters, inputs."""
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    tmp = tmp_path_factory.mktemp("lora")
    hf = build_llava("llava", "gqa", seed=31)
    base_dir = save(hf, tmp / "ckpt")
    model = llava_jax.load(base_dir, mesh=None)
    params = _random_b(add_adapters(model.params, CFG, seed=1), seed=2)

    targets = r".*language_model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(DEFAULT_TARGETS) + ")"
    peft = get_peft_model(hf, PeftConfig(r=CFG.r, lora_alpha=CFG.alpha, lora_dropout=0.0, target_modules=targets))
    for p in peft.base_model.model.model.multi_modal_projector.parameters():
        p.requires_grad_(True)  # trained fully, as in the original's LoRA runs
    layers = params["language_model"]["layers"]
    with torch.no_grad():
        for name, p in peft.named_parameters():
            m = re.search(r"layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])\.", name)
            if m:
                layer, target, which = int(m[1]), m[2], m[3]
                p.copy_(torch.from_numpy(np.asarray(layers[target][f"lora_{which.lower()}"][layer]).T.copy()))
    peft.eval()

    ids, mask = image_rows([[4, ("img", 0), 9], [("img", 1), 6]], [16, 16], seed=32)
    px = random_pixels([1, 1], seed=33)[:, 0]
    assert (mask == 0).any()  # left padding is exercised
    labels = _labels(ids, mask)
    batch = hf_inputs_batch(model, ids, labels, px, None, mask)

    def loss_and_logits(trainable, frozen):
        logits = target_logits(model.network.bind({"params": for_network(merge_params(trainable, frozen), CFG)}),
                               batch)
        return cross_entropy(logits, batch.target_ids, batch.target_weight), logits

    # one compiled program (loss, logits at the supervised positions, gradients) for every test of the module
    program = jax.jit(jax.value_and_grad(loss_and_logits, has_aux=True))

    def run(p):
        (loss, logits), grads = program(*split_params(p, trainable_mask(p)))
        return float(loss), np.asarray(logits)[: int(batch.target_weight.sum())], grads

    return dict(tmp=tmp, base_dir=base_dir, model=model, params=params, peft=peft, ids=ids, mask=mask, px=px,
                labels=labels, targets=np.asarray(batch.target_positions)[: int(batch.target_weight.sum())], run=run)


def _with_layers(params, update):
    layers = params["language_model"]["layers"]
    return {**params, "language_model": {**params["language_model"], "layers": {**layers, **update}}}


def test_forward_is_base_plus_scaled_low_rank_update(case):
    """Logits through the adapters equal the logits of a model whose weights are W + (alpha/r) (A B).T (computed
    here in float64) and differ from the base model's (the adapters do something)."""
    params, run = case["params"], case["run"]
    _, ours, _ = run(params)
    # the same param tree with B = 0 computes the base model, and with W + (alpha/r) (A B).T in the weights the update
    base, updated = {}, {}
    for name in CFG.targets:
        entry = params["language_model"]["layers"][name]
        delta = np.einsum("lir,lro->loi", np.float64(entry["lora_a"]), np.float64(entry["lora_b"]))  # (A B).T
        weight = jnp.asarray(np.float64(entry["weight"]) + CFG.alpha / CFG.r * delta, jnp.float32)
        base[name] = {**entry, "lora_b": jnp.zeros_like(entry["lora_b"])}
        updated[name] = {**base[name], "weight": weight}
    _, expected, _ = run(_with_layers(params, updated))
    _, plain, _ = run(_with_layers(params, base))
    assert np.abs(plain - expected).max() > 0.1
    np.testing.assert_array_less(np.abs(ours - expected), BOUND)


def test_dropout_acts_on_the_adapter_input_only():
    """With identity adapters the low-rank term is dropout(x) itself: each entry 0 or x / (1 - p), about a
    fraction p zeroed (p = 0.25 on 4096 entries: 5 sigma is +-0.034), another key another mask."""
    x = jnp.asarray(np.random.default_rng(0).uniform(1, 2, (16, 256)), jnp.float32)
    eye = jnp.eye(256)
    adapter = {"a": eye, "b": eye, "dropout": {"key": jax.random.PRNGKey(3), "rate": jnp.float32(0.25)}}
    dropout = jax.jit(lambda adapter: add_low_rank(x, [jnp.zeros_like(x)], [adapter])[0])
    out = np.asarray(dropout(adapter))
    dropped = out == 0
    np.testing.assert_allclose(out[~dropped], np.asarray(x)[~dropped] / 0.75, rtol=1e-6)
    assert abs(dropped.mean() - 0.25) < 0.034
    other = np.asarray(dropout(adapter | {"dropout": {"key": jax.random.PRNGKey(4), "rate": jnp.float32(0.25)}}))
    assert (other == 0).mean() > 0.1 and ((other == 0) != dropped).any()


def test_gradients_and_trainable_count_match_peft(case):
    """Every trainable tensor's gradient (the adapters of every layer and map, the projector) equals torch's
    through peft, by name; the trainable parameter count equals peft's; the loss too (1e-5 relative)."""
    params, peft, ids, mask, px, labels = (case[k] for k in ("params", "peft", "ids", "mask", "px", "labels"))
    loss, _, grads = case["run"](params)
    trainable = trainable_split(params)

    peft.zero_grad()
    out = peft(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(px),
               labels=torch.tensor(labels))
    out.loss.backward()
    assert abs(float(loss) - out.loss.item()) < 1e-5 * abs(out.loss.item())
    assert count_params(trainable) == peft.get_nb_trainable_parameters()[0]

    compared = 0
    for name, p in peft.named_parameters():
        if not p.requires_grad:
            continue
        if m := re.search(r"layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])\.", name):
            ours = np.asarray(grads["language_model"]["layers"][m[2]][f"lora_{m[3].lower()}"][int(m[1])]).T
        else:
            m = re.search(r"multi_modal_projector\.(linear_\d)\.(weight|bias)$", name)
            assert m, name  # nothing else trains
            ours = np.asarray(grads["multi_modal_projector"][m[1]][m[2]])  # torch's layout
        ref = p.grad.numpy()
        assert np.abs(ref).max() > 0, name  # a nonzero B makes every adapter's gradient nonzero
        np.testing.assert_array_less(np.abs(ours - ref), BOUND * np.abs(ref).max(), err_msg=name)
        compared += ref.size
    assert compared == count_params(trainable)  # every trainable scalar was compared


def test_saved_adapter_merged_export_loads_in_transformers(case):
    """save_adapter -> `llava-jax export BASE OUT --adapter DIR` (merge) -> transformers: logits equal
    llava-jax's LoRA forward and peft's; loading the adapter gives back the same params."""
    from transformers import LlavaForConditionalGeneration

    model, params, peft, ids, mask, px, tmp = (case[k] for k in ("model", "params", "peft", "ids", "mask", "px",
                                                                 "tmp"))
    _, ours, _ = case["run"](params)
    adapter = save_adapter(str(tmp / "adapter"), trainable_split(params), CFG)
    loaded, cfg = load_adapter(adapter, model.params)
    assert cfg == CFG
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(loaded),
                            strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))

    assert cli.main(["export", case["base_dir"], str(tmp / "exported"), "--adapter", adapter, "--quiet"]) == 0
    exported = LlavaForConditionalGeneration.from_pretrained(str(tmp / "exported")).eval()
    with torch.no_grad():
        kw = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(px))
        got = exported(**kw).logits.numpy()
        ref = peft(**kw).logits.numpy()
    valid = mask.astype(bool)
    np.testing.assert_array_less(np.abs(got - ref)[valid], BOUND)  # every position: against peft
    flat = got.reshape(-1, got.shape[-1])[case["targets"]]  # the positions llava-jax computed
    assert len(flat) >= 8
    np.testing.assert_array_less(np.abs(flat - ours), BOUND)


def test_lora_run_trains_only_adapters_and_projector(tmp_path, capsys):
    """`llava-jax train --lora-r 2 --lora-targets q_proj,v_proj,down_proj`: the trainable count is the adapters'
    plus the projector's (printed); the written model differs from the base only in the targeted kernels (by
    the merged adapters) and the projector, bit for bit elsewhere; OUT/adapter on the base gives that model; and
    a run resumed from the step-1 checkpoint repeats step 2 bit for bit (its dropout masks included)."""
    base_dir = str(write_small_model(tmp_path / "base"))
    data, images = write_data(tmp_path, 4, two_sizes=False)  # one batch shape: one step program
    out = tmp_path / "out"
    targets = ("q_proj", "v_proj", "down_proj")
    flags = ["train", "--model", base_dir, "--data", data, "--image-folder", images, "--output", str(out),
             "--stage", "finetune", "--steps", "2", "--batch-size", "2", "--lr", "1e-2", "--lora-r", "2",
             "--lora-alpha", "4", "--lora-dropout", "0.1", "--lora-targets", ",".join(targets), "--quiet"]
    assert cli.main([*flags, "--save-every", "1"]) == 0
    printed = capsys.readouterr().out

    base = llava_jax.load(base_dir, mesh=None)
    layers = base.params["language_model"]["layers"]
    expected = sum(layers[t]["weight"].shape[0] * 2 * sum(layers[t]["weight"].shape[1:]) for t in targets)
    expected += count_params(base.params["multi_modal_projector"]) + base.params["image_newline"].size
    assert f"({expected:,} of " in printed

    trained = llava_jax.load(str(out), mesh=None)
    changed = set()
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(base.params),
                            jax.tree_util.tree_leaves(trained.params), strict=True):
        name = "/".join(str(k.key) for k in path)
        if not np.array_equal(np.asarray(a), np.asarray(b)):
            changed.add(name)
    assert changed == {f"language_model/layers/{t}/weight" for t in targets} | {
        "multi_modal_projector/linear_1/weight", "multi_modal_projector/linear_1/bias",
        "multi_modal_projector/linear_2/weight", "multi_modal_projector/linear_2/bias", "image_newline"}

    again = apply_adapter(base, str(out / "adapter"))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(trained.params),
                            jax.tree_util.tree_leaves(again.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["targets"] == list(targets)

    def steps():
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(m["step"], m["loss"], m["grad_norm"]) for m in lines]

    whole = steps()
    shutil.rmtree(out / "checkpoints" / "2")  # back to the state after step 1
    assert cli.main([*flags, "--resume"]) == 0
    assert steps() == whole
    resumed = llava_jax.load(str(out), mesh=None)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(trained.params),
                            jax.tree_util.tree_leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("flags, message", [
    (["--lora-r", "0"], "--lora-r must be an integer >= 1, got 0"),
    (["--lora-r", "4", "--lora-targets", "q_proj,lm_head"], "--lora-targets: unknown 'lm_head'"),
    (["--lora-r", "4", "--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
    (["--lora-r", "4", "--lora-alpha", "0"], "--lora-alpha must be a positive number"),
    (["--lora-r", "4", "--stage", "pretrain"], "--lora-r needs --stage finetune"),
])
def test_bad_lora_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    code = cli.main(["train", "--model", str(tmp_path), "--data", str(tmp_path / "d.json"), "--image-folder", str(tmp_path),
                     "--output", str(tmp_path / "o"), "--stage", "finetune", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("llava-jax: error: ") and message in err and "\n" not in err
