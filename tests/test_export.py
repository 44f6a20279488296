"""Export back to PyTorch: original transformers model -> llava_jax.load -> export -> from_pretrained.

Bound: the exported checkpoint's logits (transformers) against llava-jax's and against the original model's,
max |diff| < 1e-4 as in test_parity_llava.py (both sides fp32, differing only in summation order; a wrong
transpose, a swapped name or a missing tensor moves logits by far more). The exported tensors themselves must
equal the original's bit for bit (fp32 in, fp32 out: nothing may be rounded on the way).
"""

import json
import os

import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

import llava_jax
from llava_jax import export as export_mod
from llava_jax.export import export_checkpoint, export_hf_state_dict
from llava_jax.weights import canonical_name

from builders import (
    IMAGE_TOKEN,
    build_llava,
    image_rows,
    original_config,
    original_state,
    random_pixels,
    save,
)

BOUND = 1e-4
CLASSES = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}


def _inputs(model, kind, seed):
    """Two left-padded rows with one image each, and a text-only row."""
    if kind == "llava":
        counts, px, sizes = [16, 16], random_pixels([1, 1], seed=seed)[:, 0], None
    else:
        sizes = np.array([(40, 100), (120, 110)])
        plans = [model.plan_image(h, w) for h, w in sizes]
        counts, px = [p.num_tokens for p in plans], random_pixels([p.num_crops for p in plans], seed=seed)
    ids, mask = image_rows([[4, ("img", 0), 6], [("img", 1), 3], [9]], counts, seed=seed)
    return ids, mask, px, sizes


def _torch_logits(hf, ids, mask, px, sizes):
    kw = {} if sizes is None else {"image_sizes": torch.tensor(sizes)}
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(px),
                  **kw).logits.numpy()


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_round_trip_gives_the_same_logits(tmp_path, kind):
    original = build_llava(kind, "gqa", seed=5)
    model = llava_jax.load(save(original, tmp_path / "ckpt"))
    out = export_checkpoint(model, str(tmp_path / "exported"), progress=False)
    exported = CLASSES[kind].from_pretrained(out).eval()

    # every tensor of the original that LLaVA uses is there, bit for bit, under the name save_pretrained writes
    written = exported.state_dict()
    for name, value in original.state_dict().items():
        canon = canonical_name(name, "hf")
        if canon.startswith("vision.encoder.layers.2.") or canon.startswith("vision.post_layernorm."):
            continue  # past the feature layer (-2 of 3 layers): never computed, not kept (module docstring)
        np.testing.assert_array_equal(written[name].numpy(), value.numpy(), err_msg=name)
    assert exported.config.vision_config.num_hidden_layers == 2 and exported.config.vision_feature_layer == 2

    ids, mask, px, sizes = _inputs(model, kind, seed=6)
    ref = _torch_logits(original, ids, mask, px, sizes)
    got = _torch_logits(exported, ids, mask, px, sizes)
    ours = model.forward(ids, px, image_sizes=sizes, attention_mask=mask)
    valid = mask.astype(bool)
    assert 0.5 < ref[valid].std() < 5 and len(set(ref.argmax(-1)[valid].tolist())) > 10  # a meaningful check
    np.testing.assert_array_less(np.abs(got - ref)[valid], BOUND)
    np.testing.assert_array_less(np.abs(got - ours)[valid], BOUND)
    # and llava-jax reads its own export back into the same params
    from safetensors.numpy import load_file

    on_disk = load_file(os.path.join(out, "model.safetensors"))
    again = llava_jax.load(out)
    for name, value in export_hf_state_dict(again.params, again.config).items():
        np.testing.assert_array_equal(value, on_disk[name], err_msg=name)


def test_state_dict_names_are_save_pretrained_names_and_layout_is_torch(tmp_path):
    original = build_llava("llava_next", "mha", seed=7)
    save(original, tmp_path / "ckpt")
    from safetensors.numpy import load_file

    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    model = llava_jax.load(str(tmp_path / "ckpt"))
    state = export_hf_state_dict(model.params, model.config)
    kept = {n for n in saved if not n.startswith(("vision_tower.encoder.layers.2.", "vision_tower.post_layernorm."))}
    assert set(state) == kept
    for name in kept:
        np.testing.assert_array_equal(state[name], saved[name], err_msg=name)


def test_gradient_trees_export_by_name(tmp_path):
    """A tree shaped like the params (here params scaled by 2, as a gradient tree would be) exports too."""
    import jax

    model = llava_jax.load(save(build_llava("llava", "mha", seed=8), tmp_path / "ckpt"))
    doubled = jax.tree_util.tree_map(lambda p: 2 * p, model.params)
    plain = export_hf_state_dict(model.params, model.config)
    scaled = export_hf_state_dict(doubled, model.config)
    assert set(plain) == set(scaled)
    for name in plain:
        np.testing.assert_array_equal(scaled[name], 2 * plain[name], err_msg=name)


def test_bfloat16_export_and_tokenizer_files(tmp_path, tiny_model_dir):
    out = export_checkpoint(str(tiny_model_dir), str(tmp_path / "bf16"), dtype="bfloat16", progress=False)
    names = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "tokenizer.model", "tokenizer_config.json"} <= names
    assert "checksums.json" not in names  # the source's manifest describes the source's files, not these
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["dtype"] == "bfloat16" and config["text_config"]["model_type"] == "mistral"
    hf = LlavaNextForConditionalGeneration.from_pretrained(out)
    assert next(hf.parameters()).dtype == torch.bfloat16
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok("a red circle")["input_ids"] == llava_jax.load(str(tiny_model_dir)).tokenizer("a red circle")["input_ids"]


def test_failed_export_leaves_nothing_and_existing_output_needs_force(tmp_path, monkeypatch):
    model = llava_jax.load(save(build_llava("llava", "mha", seed=9), tmp_path / "ckpt"))
    out = tmp_path / "exported"

    def broken(path, tensors, metadata=None, on_tensor=None):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(export_mod, "write_safetensors", broken)
    with pytest.raises(OSError, match="No space"):
        export_checkpoint(model, str(out), progress=False)
    assert os.listdir(tmp_path) == ["ckpt"]  # no destination, no temporary directory left behind
    monkeypatch.undo()
    export_checkpoint(model, str(out), progress=False)
    with pytest.raises(FileExistsError, match="--force"):
        export_checkpoint(model, str(out), progress=False)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        export_checkpoint(model, str(out), progress=False, force=True)
    assert (out / "notes.txt").exists()


def test_original_layout_models_are_refused(tmp_path):
    hf = build_llava("llava", "mha", seed=10)
    ckpt = tmp_path / "orig"
    ckpt.mkdir()
    from safetensors.numpy import save_file

    save_file(original_state(hf, with_vision=True), str(ckpt / "model.safetensors"))
    save(hf.model.vision_tower, tmp_path / "clip")
    (ckpt / "config.json").write_text(json.dumps(original_config(hf, str(tmp_path / "clip"))))
    model = llava_jax.load(str(ckpt))
    assert model.config.image_token_id == -200
    assert set(export_hf_state_dict(model.params, model.config)) >= {"multi_modal_projector.linear_2.weight"}
    with pytest.raises(llava_jax.CheckpointError, match="original LLaVA checkpoint.*not supported"):
        export_checkpoint(model, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_export(tmp_path, capsys):
    from llava_jax.cli import main

    src = save(build_llava("llava", "mha", seed=12), tmp_path / "ckpt")
    assert main(["export", src, str(tmp_path / "out"), "--quiet"]) == 0
    assert "wrote the llava-hf checkpoint" in capsys.readouterr().out
    assert LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "out")).config.image_token_id == IMAGE_TOKEN
    capsys.readouterr()  # transformers' loading bar
    assert main(["export", src, str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llava-jax: error: ") and "--force" in err and err.count("\n") == 1
