"""The weight converter: round trips for both layouts and both model families, sharded sources, bad input,
atomic output, the CLI, and loading a converted checkpoint without torch."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import CLIPVisionModel

import llava_jax
from convert.atomic import DestinationError
from convert.converter import convert
from llava_jax.checkpoint import CONFIG_FILE, INFO_FILE, stored_params
from llava_jax.config import load_config
from llava_jax.image import anyres_plan
from llava_jax.safetensors_io import CheckpointError, TensorRef

from builders import build_llava, original_config, original_state, save

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_FILES = {"tokenizer_config.json": "{}", "special_tokens_map.json": "{}", "chat_template.jinja": "{{ x }}",
                   "preprocessor_config.json": '{"crop_size": 56}'}


# ---------------------------------------------------------------- fixtures: HF and original checkpoints


def write_dir(path, tensors: dict, config: dict) -> str:
    os.makedirs(path)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


@pytest.fixture(scope="module")
def models():
    return {"llava": build_llava("llava", "mha", seed=11), "llava_next": build_llava("llava_next", "gqa", seed=12)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory, models):
    """{(layout, kind): (source dir, vision_tower or None)}; original 1.5 refers to a separate CLIP dir."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for kind, hf in models.items():
        path = save(hf, root / f"hf-{kind}")
        for fname, text in TOKENIZER_FILES.items():
            (root / f"hf-{kind}" / fname).write_text(text)
        out[("hf", kind)] = (path, None)
    clip = CLIPVisionModel(models["llava"].config.vision_config)
    clip.load_state_dict(models["llava"].model.vision_tower.state_dict())
    clip.save_pretrained(root / "clip")
    (root / "clip" / "preprocessor_config.json").write_text(TOKENIZER_FILES["preprocessor_config.json"])
    out[("original", "llava")] = (write_dir(root / "orig-llava", original_state(models["llava"], False),
                                            original_config(models["llava"], str(root / "clip"))), None)
    out[("original", "llava_next")] = (write_dir(root / "orig-next", original_state(models["llava_next"], True),
                                                 original_config(models["llava_next"], str(root / "clip"))), None)
    out["clip"] = str(root / "clip")
    return out


def model_inputs(config):
    rng = np.random.default_rng(0)
    size = config.vision.image_size
    if config.model_type == "llava":
        pixels, sizes, tokens = rng.standard_normal((1, 3, size, size)), None, config.tokens_per_crop
    else:
        plan = anyres_plan(60, 90, config.image_grid_pinpoints, config.semantics, crop_size=size,
                           patch_size=config.vision.patch_size)
        pixels, sizes, tokens = rng.standard_normal((1, plan.num_crops, 3, size, size)), [[60, 90]], plan.num_tokens
    ids = np.concatenate([[1, 5, 7], np.full(tokens, config.image_token_id), [9, 11, 3]])[None]
    return dict(input_ids=ids, pixel_values=pixels.astype(np.float32), image_sizes=sizes)


def assert_same_tree(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)

    def same(path, x, y):
        x, y = np.asarray(x), np.asarray(y)
        assert (x.shape, x.dtype) == (y.shape, y.dtype), jax.tree_util.keystr(path)
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))

    jax.tree_util.tree_map_with_path(same, a, b)


def signature(tree):
    return jax.tree_util.tree_map(lambda x: (tuple(x.shape), str(x.dtype)), tree)


def leftovers(parent) -> list[str]:
    return [f for f in os.listdir(parent) if ".tmp-" in f or ".old-" in f or f.endswith(".partial_save")]


# ---------------------------------------------------------------- round trips


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for key in [("hf", "llava"), ("hf", "llava_next"), ("original", "llava"), ("original", "llava_next")]:
        src, tower = sources[key]
        out[key] = str(root / f"{key[0]}-{key[1]}")
        convert(src, out[key], vision_tower=tower)
    return out


@pytest.mark.parametrize("layout", ["hf", "original"])
@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_round_trip_same_params_and_logits(sources, converted, layout, kind):
    src, out = sources[(layout, kind)][0], converted[(layout, kind)]
    direct, loaded = llava_jax.load(src), llava_jax.load(out)
    assert loaded.config == direct.config
    assert_same_tree(loaded.params, direct.params)
    assert signature(loaded.params) == signature(llava_jax.abstract_params(loaded.config))  # init's tree
    if layout == "original":  # the same weights as the llava-hf checkpoint they were renamed from
        assert_same_tree(loaded.params, llava_jax.load(sources[("hf", kind)][0]).params)
    assert_same_logits(loaded, direct)


def assert_same_logits(loaded, direct):
    """The loaded model's logits equal those with the directly loaded params, through one compiled program
    (the direct params are committed to the device like Orbax's restored ones, so nothing recompiles)."""
    inputs = model_inputs(loaded.config)
    got = loaded.forward(**inputs)
    loaded.params = jax.device_put(direct.params, jax.devices()[0])
    np.testing.assert_array_equal(loaded.forward(**inputs), got)
    assert np.abs(got).max() > 0.1 and np.isfinite(got).all()


def test_converted_directory_contents(sources, converted):
    out = converted[("hf", "llava_next")]
    files = set(os.listdir(out))
    assert {CONFIG_FILE, INFO_FILE, "params", "config.json", "generation_config.json"} <= files
    assert set(TOKENIZER_FILES) <= files
    assert load_config(out) == load_config(sources[("hf", "llava_next")][0])
    with open(os.path.join(out, INFO_FILE)) as f:
        info = json.load(f)
    # CLIP's last layer (past the feature layer -2 of 3) and post_layernorm, and nothing else, are skipped
    skipped = info["skipped_unused_tensors"]
    assert len(skipped) == 16 + 2 and all(".layers.2." in n or ".post_layernorm." in n for n in skipped)
    assert info["source_dtypes"] == {"float32": info["tensors"]}
    # original 1.5: the image processor comes from the separate CLIP tower's directory
    assert "preprocessor_config.json" not in os.listdir(sources[("original", "llava")][0])
    assert "preprocessor_config.json" in os.listdir(converted[("original", "llava")])


def test_bfloat16_conversion(sources, tmp_path):
    src = sources[("hf", "llava")][0]
    out = str(tmp_path / "bf16")
    convert(src, out, dtype="bfloat16")
    assert {dt for _, dt in stored_params(out).values()} == {np.dtype(ml_dtypes.bfloat16)}
    f32 = llava_jax.load(out, "float32").params
    rounded = jax.tree_util.tree_map(
        lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), llava_jax.load(src).params)
    assert_same_tree(f32, rounded)  # exactly the bf16 rounding of the fp32 source
    direct, loaded = llava_jax.load(src, "bfloat16"), llava_jax.load(out, "bfloat16")
    assert_same_tree(loaded.params, direct.params)
    assert_same_logits(loaded, direct)


def test_half_precision_source_keeps_its_dtype(models, tmp_path):
    src = save(build_llava("llava", "mha", seed=5).to(torch.float16), tmp_path / "fp16")
    out = str(tmp_path / "out")
    convert(src, out)
    assert {dt for _, dt in stored_params(out).values()} == {np.dtype(np.float16)}
    assert_same_tree(llava_jax.load(out, "float16").params, llava_jax.load(src, "float16").params)


def test_sharded_source_converts_the_same(models, converted, tmp_path):
    sharded = tmp_path / "sharded"
    models["llava_next"].save_pretrained(sharded, max_shard_size="40KB")
    assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 2
    convert(str(sharded), str(tmp_path / "out"))
    assert stored_params(str(tmp_path / "out")) == stored_params(converted[("hf", "llava_next")])
    assert_same_tree(llava_jax.load(str(tmp_path / "out")).params,
                     llava_jax.load(converted[("hf", "llava_next")]).params)


# ---------------------------------------------------------------- original 1.5 and its vision tower


def test_original_15_vision_tower(sources, models, tmp_path):
    hf = models["llava"]
    src = write_dir(tmp_path / "orig", original_state(hf, False),
                    original_config(hf, "openai/clip-vit-large-patch14-336"))
    with pytest.raises(CheckpointError, match="holds no vision tower.*--vision-tower DIR"):
        convert(src, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out") and not leftovers(tmp_path)
    convert(src, str(tmp_path / "out"), vision_tower=sources["clip"])
    assert_same_tree(llava_jax.load(str(tmp_path / "out")).params,
                     llava_jax.load(sources[("original", "llava")][0]).params)
    with pytest.raises(CheckpointError, match="already holds a vision tower"):
        convert(sources[("original", "llava_next")][0], str(tmp_path / "o2"), vision_tower=sources["clip"])
    with pytest.raises(CheckpointError, match="for original LLaVA checkpoints"):
        convert(sources[("hf", "llava")][0], str(tmp_path / "o3"), vision_tower=sources["clip"])


def test_layout_mismatch(sources, tmp_path):
    src = sources[("hf", "llava")][0]
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'language_model\.\S+' for the original layout"):
        convert(src, str(tmp_path / "out"), layout="original")
    mixed = tmp_path / "mixed"
    shutil.copytree(sources[("original", "llava_next")][0], mixed)
    shutil.copy(os.path.join(src, "config.json"), mixed / "config.json")  # an hf config over original tensors
    with pytest.raises(CheckpointError, match="hf-layout config but the tensor names are original-layout"):
        convert(str(mixed), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out") and not leftovers(tmp_path)


# ---------------------------------------------------------------- bad input: clear errors, nothing written


def edited(src, dest, edit):
    shutil.copytree(src, dest)
    tensors = load_file(os.path.join(dest, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})


def truncate(src, dest):
    shutil.copytree(src, dest)
    f = os.path.join(dest, "model.safetensors")
    os.truncate(f, os.path.getsize(f) - 100)


def missing_shard(models, dest):
    models["llava_next"].save_pretrained(dest, max_shard_size="40KB")
    with open(os.path.join(dest, "model.safetensors.index.json")) as fh:
        os.remove(os.path.join(dest, sorted(set(json.load(fh)["weight_map"].values()))[1]))


def pickles_only(src, dest):
    os.makedirs(dest)
    shutil.copy(os.path.join(src, "config.json"), dest)
    (dest / "pytorch_model.bin").write_bytes(b"not unpickled")


def shrink(t):
    t["multi_modal_projector.linear_2.weight"] = t["multi_modal_projector.linear_2.weight"][:, :-1].copy()


def add_unknown(t):
    t["language_model.model.layers.0.self_attn.q_norm.weight"] = np.ones(4, np.float32)


BAD = {
    "missing shard": (lambda src, models, d: missing_shard(models, d), r"shard\(s\) listed in .* are missing"),
    "truncated": (lambda src, models, d: truncate(src, d), "truncated safetensors file"),
    "wrong shape": (lambda src, models, d: edited(src, d, shrink),
                    r"'multi_modal_projector.linear_2.weight' has shape \(64, 63\)"),
    "unknown tensor": (lambda src, models, d: edited(src, d, add_unknown),
                       "unexpected tensor 'language_model.model.layers.0.self_attn.q_norm.weight'"),
    "missing tensor": (lambda src, models, d: edited(src, d, lambda t: t.pop("language_model.model.norm.weight")),
                       "missing parameter.*language_model/norm/scale"),
    "pickle": (lambda src, models, d: pickles_only(src, d), "safetensors only.*st.save_file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gives_clear_error_and_no_output(sources, models, tmp_path, case):
    make, message = BAD[case]
    bad = tmp_path / "bad"
    make(sources[("hf", "llava")][0], models, bad)
    with pytest.raises(CheckpointError, match=message):
        convert(str(bad), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out") and not leftovers(tmp_path)


def test_existing_output_needs_force(sources, converted, tmp_path):
    src = sources[("hf", "llava")][0]
    out = tmp_path / "out"
    shutil.copytree(converted[("hf", "llava_next")], out)  # an earlier conversion of another model
    before = stored_params(str(out))
    with pytest.raises(DestinationError, match="already exists; pass --force"):
        convert(src, str(out))
    assert stored_params(str(out)) == before
    convert(src, str(out), force=True)
    assert stored_params(str(out)) == stored_params(converted[("hf", "llava")])
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(DestinationError, match=r"holds entries that a conversion does not write \(notes\.txt\)"):
        convert(src, str(precious), force=True)
    with pytest.raises(DestinationError, match="is or contains the input"):
        convert(src, os.path.dirname(src), force=True)
    assert (precious / "notes.txt").read_text() == "keep me" and not leftovers(tmp_path)


def test_failure_midway_leaves_no_partial_output(sources, converted, tmp_path, monkeypatch):
    src = sources[("hf", "llava_next")][0]
    out = tmp_path / "out"
    shutil.copytree(converted[("hf", "llava")], out)
    before = stored_params(str(out))
    calls, real = [], TensorRef.memmap

    def failing(self):
        calls.append(self.name)
        if len(calls) == 20:
            raise OSError("simulated read error midway")
        return real(self)

    monkeypatch.setattr(TensorRef, "memmap", failing)
    with pytest.raises(OSError, match="simulated read error midway"):
        convert(src, str(out), force=True)
    assert len(calls) == 20
    assert stored_params(str(out)) == before  # the old output is untouched
    assert sorted(os.listdir(tmp_path)) == ["out"] and not leftovers(tmp_path)
    monkeypatch.setattr(TensorRef, "memmap", real)
    with pytest.raises(OSError, match="simulated"):
        convert(src, str(tmp_path / "new"), progress=lambda nbytes, n: (_ for _ in ()).throw(OSError("simulated")))
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ---------------------------------------------------------------- the CLI and loading without torch


def run(args, **kw):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env, timeout=120, **kw)


def test_cli(sources, tmp_path):
    src, out = sources[("original", "llava_next")][0], str(tmp_path / "out")
    done = run([sys.executable, "-m", "convert", src, out, "--dtype", "bfloat16"])
    assert done.returncode == 0, done.stderr
    assert "converting" in done.stderr and "tensors" in done.stderr and f"wrote {out}" in done.stderr
    assert {dt for _, dt in stored_params(out).values()} == {np.dtype(ml_dtypes.bfloat16)}
    script = os.path.join(os.path.dirname(sys.executable), "llava-jax-convert")  # the console script
    again = run([script, src, out, "--quiet"])
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "llava-jax-convert: error:" in again.stderr and "already exists; pass --force" in again.stderr
    assert sorted(os.listdir(tmp_path)) == ["out"]


NO_TORCH = textwrap.dedent("""
    import importlib.abc, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")

    sys.meta_path.insert(0, NoTorch())
    try:
        import torch  # noqa: F401
        raise SystemExit("torch import was not blocked")
    except ModuleNotFoundError:
        pass
    import numpy as np
    import llava_jax

    model = llava_jax.load(sys.argv[1])
    inputs = dict(np.load(sys.argv[2], allow_pickle=True))
    sizes = inputs.pop("image_sizes")
    logits = model.forward(**inputs, image_sizes=None if sizes.shape == () else sizes)
    np.testing.assert_array_equal(logits, np.load(sys.argv[3]))
    assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
    print("OK without torch")
""")


def test_converted_checkpoint_loads_without_torch(converted, tmp_path):
    out = converted[("hf", "llava_next")]
    model = llava_jax.load(out)
    inputs = model_inputs(model.config)
    np.savez(tmp_path / "inputs.npz", **{k: np.asarray(v) for k, v in inputs.items()})
    np.save(tmp_path / "logits.npy", model.forward(**inputs))
    (tmp_path / "no_torch.py").write_text(NO_TORCH)
    done = run([sys.executable, str(tmp_path / "no_torch.py"), out, str(tmp_path / "inputs.npz"),
                str(tmp_path / "logits.npy")])
    assert done.returncode == 0 and "OK without torch" in done.stdout, done.stderr[-3000:]


def test_checkpoint_converted_with_transposed_kernels_is_refused(tiny_model_dir, tmp_path):
    """A directory converted before Linear weights took torch's (out, in) layout holds them transposed, as
    `kernel`s: loading it says so and names the remedy (its square weights would fit their new shapes: read as
    they are, they would be silently wrong)."""
    from convert.writer import save_params
    from llava_jax.integrity import write_manifest

    out = tmp_path / "old"
    convert(str(tiny_model_dir), str(out))
    params = llava_jax.load(str(out), mesh=None).params

    def earlier_layout(tree):
        return {("kernel" if k == "weight" else k): earlier_layout(v) if isinstance(v, dict)
                else np.asarray(v).swapaxes(-1, -2) if k == "weight" else np.asarray(v) for k, v in tree.items()}

    shutil.rmtree(out / "params")
    save_params(str(out / "params"), earlier_layout(params))
    write_manifest(str(out))  # a consistent checkpoint of the earlier format, checksums included
    with pytest.raises(CheckpointError, match=r"converted by an earlier llava-jax, which stored Linear weights "
                                              r"transposed, as \(in, out\) 'kernel's; convert it again"):
        llava_jax.load(str(out))
