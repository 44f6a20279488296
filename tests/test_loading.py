"""Loading llava-hf safetensors: the param tree equals init's, dtypes on disk, sharded files, bad checkpoints."""

import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import llava_jax
from llava_jax.safetensors_io import CheckpointError

from builders import build_llava, save


@pytest.fixture(scope="module")
def hf_next():
    return build_llava("llava_next", "gqa", seed=3)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, hf_next):
    return save(hf_next, tmp_path_factory.mktemp("next") / "ckpt")


def tree_signature(tree):
    return jax.tree_util.tree_map(lambda x: (tuple(x.shape), str(x.dtype)), tree)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loaded_tree_equals_init_tree(ckpt, dtype):
    model = llava_jax.load(ckpt, dtype=dtype)
    init = llava_jax.init_params(model.config, dtype)
    assert jax.tree_util.tree_structure(model.params) == jax.tree_util.tree_structure(init)
    assert tree_signature(model.params) == tree_signature(init)
    assert "image_newline" in model.params
    # vision layers past the feature layer (-2 of 3) are not part of the tree
    assert model.params["vision_tower"]["layers"]["fc1"]["weight"].shape[0] == 2


def test_values_land_where_hf_has_them(ckpt, hf_next):
    p = llava_jax.load(ckpt).params
    sd = {k: v.numpy() for k, v in hf_next.state_dict().items()}
    np.testing.assert_array_equal(p["language_model"]["layers"]["k_proj"]["weight"][1],
                                  sd["model.language_model.layers.1.self_attn.k_proj.weight"])
    np.testing.assert_array_equal(p["vision_tower"]["layers"]["layer_norm2"]["scale"][0],
                                  sd["model.vision_tower.encoder.layers.0.layer_norm2.weight"])
    np.testing.assert_array_equal(p["image_newline"], sd["model.image_newline"])


@pytest.mark.parametrize("disk_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints(tmp_path, disk_dtype):
    hf = build_llava("llava", "mha", seed=5).to(disk_dtype)
    path = save(hf, tmp_path / "ckpt")
    model = llava_jax.load(path, dtype="float32")
    ref = hf.model.language_model.layers[0].mlp.up_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(model.params["language_model"]["layers"]["up_proj"]["weight"][0], ref)
    half = llava_jax.load(path, dtype="bfloat16")
    assert half.params["language_model"]["lm_head"]["weight"].dtype == jax.numpy.bfloat16


def test_sharded_checkpoint_loads_the_same(tmp_path, hf_next, ckpt):
    sharded = tmp_path / "sharded"
    hf_next.save_pretrained(sharded, max_shard_size="40KB")
    assert os.path.isfile(sharded / "model.safetensors.index.json")
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 2
    a, b = llava_jax.load(ckpt).params, llava_jax.load(str(sharded)).params
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def edited_copy(ckpt, dest, edit):
    shutil.copytree(ckpt, dest)
    tensors = load_file(os.path.join(dest, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
    return str(dest)


def test_missing_tensor_is_named(tmp_path, ckpt):
    path = edited_copy(ckpt, tmp_path / "c", lambda t: t.pop("language_model.model.layers.1.mlp.gate_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*language_model/layers/gate_proj/weight \(layers \[1\]\)"):
        llava_jax.load(path)


def test_unexpected_tensor_is_named(tmp_path, ckpt):
    def add(t):
        t["language_model.model.layers.0.self_attn.q_norm.weight"] = np.ones(4, np.float32)

    path = edited_copy(ckpt, tmp_path / "c", add)
    with pytest.raises(CheckpointError, match="unexpected tensor 'language_model.model.layers.0.self_attn.q_norm"):
        llava_jax.load(path)


def test_wrong_shape_is_named(tmp_path, ckpt):
    def shrink(t):
        t["multi_modal_projector.linear_2.weight"] = t["multi_modal_projector.linear_2.weight"][:, :-1].copy()

    path = edited_copy(ckpt, tmp_path / "c", shrink)
    with pytest.raises(CheckpointError, match=r"'multi_modal_projector.linear_2.weight' has shape \(64, 63\)"):
        llava_jax.load(path)


def test_truncated_file_and_missing_shard(tmp_path, ckpt, hf_next):
    trunc = tmp_path / "trunc"
    shutil.copytree(ckpt, trunc)
    f = trunc / "model.safetensors"
    os.truncate(f, os.path.getsize(f) - 100)
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        llava_jax.load(str(trunc))
    sharded = tmp_path / "sharded"
    hf_next.save_pretrained(sharded, max_shard_size="40KB")
    with open(sharded / "model.safetensors.index.json") as fh:
        victim = sorted(set(json.load(fh)["weight_map"].values()))[1]
    os.remove(sharded / victim)
    with pytest.raises(CheckpointError, match=f"missing: {victim}"):
        llava_jax.load(str(sharded))


def test_pickle_only_checkpoint_is_refused(tmp_path, ckpt):
    d = tmp_path / "bin"
    os.makedirs(d)
    shutil.copy(os.path.join(ckpt, "config.json"), d)
    (d / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="safetensors only.*st.save_file"):
        llava_jax.load(str(d))


def test_bfloat16_reader_matches_torch(tmp_path):
    t = torch.randn(3, 5).to(torch.bfloat16)
    from safetensors.torch import save_file as save_torch

    save_torch({"x": t}, str(tmp_path / "a.safetensors"))
    from llava_jax.safetensors_io import read_header

    (ref,) = read_header(str(tmp_path / "a.safetensors"))
    assert ref.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(ref.read().astype(np.float32), t.float().numpy())
