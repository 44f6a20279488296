"""Loading straight into the stacked param arrays: bitwise the same params as the per-tensor path, for
safetensors sources (tiled transposing casts, panels, threads) and converted checkpoints (chunk files read
without Orbax; corruption found while reading them: tests/test_integrity.py); peak memory of a load in a fresh
process."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from corrupt import flip_bit

from llava_jax import checkpoint, direct_read
from llava_jax.config import load_config
from llava_jax.model import abstract_params
from llava_jax.safetensors_io import iter_tensors
from llava_jax.weights import assemble_params, load_safetensors_params

from builders import build_llava, save

DTYPES = ["float32", "bfloat16", "float16"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same random LLaVA-NeXT saved in fp16 (as llava-hf publishes) and in fp32."""
    hf = build_llava("llava_next", "gqa", seed=11)
    root = tmp_path_factory.mktemp("direct")
    return {"float16": save(hf.to(torch.float16), root / "f16"), "float32": save(hf.to(torch.float32), root / "f32")}


def assert_bitwise_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert (x.dtype, x.shape) == (y.dtype, y.shape), jax.tree_util.keystr(path)
        assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


def per_tensor_params(path, dtype):
    """The reference: every tensor read whole, transformed and cast by numpy, one at a time (`assemble_params`)."""
    config = load_config(path)
    items = [(ref.name, "hf", ref.read) for ref in iter_tensors(path)]
    return assemble_params(items, config, abstract_params(config, dtype), np.dtype(jax.numpy.dtype(dtype)))


# (dtype on disk, target dtype, panels): every target from fp16 (what llava-hf publishes), fp32 sources too; "small"
# panels cut this toy model's tensors into many panels with ragged edges, as large models' are.
@pytest.mark.parametrize("disk, dtype, panels", [("float16", "float32", "small"), ("float16", "bfloat16", "small"),
                                                ("float16", "float16", "default"), ("float32", "bfloat16", "default"),
                                                ("float32", "float32", "small")])
def test_safetensors_direct_read_is_bitwise_the_per_tensor_path(sources, disk, dtype, panels, monkeypatch):
    if panels == "small":
        monkeypatch.setattr(direct_read, "PANEL_BYTES", 100)
    path = sources[disk]
    config = load_config(path)
    params = load_safetensors_params([(path, "hf")], config, abstract_params(config, dtype),
                                     np.dtype(jax.numpy.dtype(dtype)))
    assert_bitwise_equal(params, per_tensor_params(path, dtype))


def convert_small_chunks(src, out, dtype):
    """Convert with 512-byte chunks: params split into several chunk files, some cut short at the edges."""
    from convert import converter
    from convert.writer import save_params

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(converter, "save_params", functools.partial(save_params, chunk_bytes=512))
        converter.convert(src, out, dtype=dtype)
    return out


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    return {stored: convert_small_chunks(sources["float16"], str(root / stored), stored)
            for stored in ("float32", "bfloat16")}


def orbax_params(path, dtype):
    """The reference: Orbax's restore (what `restore_params` does for meshes), onto the one device."""
    abstract = abstract_params(load_config(path), dtype)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return checkpoint.restore_params(path, abstract, jax.tree_util.tree_map(lambda _: device, abstract))


@pytest.mark.parametrize("stored, dtype", [("float32", "float32"), ("float32", "bfloat16"), ("bfloat16", "float32")])
def test_converted_plain_read_is_bitwise_orbax_restore(converted, stored, dtype):
    path = converted[stored]
    chunked = os.listdir(os.path.join(path, "params", "language_model.embed_tokens.embedding"))
    assert len(chunked) > 3  # the small chunks did split the params
    params = checkpoint.restore_params(path, abstract_params(load_config(path), dtype))
    assert_bitwise_equal(params, orbax_params(path, dtype))


PEAK_SCRIPT = """
import json, sys, numpy as np, jax
import llava_jax
from llava_jax.bench.measure import timed_load
model, out = timed_load(lambda: jax.block_until_ready(llava_jax.load(sys.argv[1], dtype=sys.argv[2], mesh=None)))
out["param_bytes"] = sum(x.nbytes for x in jax.tree_util.tree_leaves(model.params))
layers = model.params["language_model"]["layers"]
out["layer_bytes"] = sum(x.nbytes // x.shape[0] for x in jax.tree_util.tree_leaves(layers))
print(json.dumps(out))
"""


def test_peak_memory_of_a_load_is_the_model_plus_a_layer(tmp_path):
    """In a fresh process, loading a 0.07 B-param fp16 checkpoint as fp32 raises the peak RSS by at most the
    params plus one decoder layer plus 64 MB (allocator and tracing noise of a process that has
    imported jax: a second copy of the weights, or of one stacked param (over 40 MB here), does not fit)."""
    from llava_jax.bench.checkpoints import checkpoint_config
    from llava_jax.random_checkpoint import write_random_checkpoint

    path = tmp_path / "ckpt"
    config = checkpoint_config("tiny")
    config["text_config"].update(hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                                 num_attention_heads=8, num_key_value_heads=8)
    write_random_checkpoint(path, config, "float16")
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), "float32"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    rise = out["load_peak_rss_rise_gb"] * 1e9
    assert out["param_bytes"] > 100e6
    assert rise <= out["param_bytes"] + out["layer_bytes"] + 64e6, out


def test_unused_tensors_are_hashed_too(tiny_model_dir, tmp_path):
    """Loading hashes the tensors it reads as it reads them, and reads the ones it skips (CLIP's last layer,
    `post_layernorm`) only to hash them: a flipped byte in one of those is still caught."""
    import shutil

    from llava_jax.errors import ChecksumError
    from llava_jax.safetensors_io import read_header
    from llava_jax.weights import map_name

    cache = tmp_path / "cache"
    shutil.copytree(tiny_model_dir, cache)
    config = load_config(str(cache))
    unused = next(r for r in read_header(str(cache / "model.safetensors")) if map_name(r.name, "hf", config) is None)
    flip_bit(cache / "model.safetensors", unused.start)
    import llava_jax

    with pytest.raises(ChecksumError, match=rf"model\.safetensors \(tensor {unused.name}\)"):
        llava_jax.load(str(cache))
    llava_jax.load(str(cache), verify=False)
