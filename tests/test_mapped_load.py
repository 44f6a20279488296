"""Loading a converted checkpoint by memory-mapping its chunk files (`file_mapping`, `zarr_read.map_array`):
the params are the files' pages (no copy), equal to what reading gives, safe to write into, and a short or
corrupted chunk is still an error naming it, never a crash."""

import hashlib
import os
import shutil
import sys

import jax
import numpy as np
import pytest

import llava_jax
from convert.converter import convert
from convert.writer import row_block_chunks
from llava_jax import file_mapping
from llava_jax.errors import CheckpointError, ChecksumError
from llava_jax.zarr_read import map_array, mapped_chunks, open_array

pytestmark = pytest.mark.skipif(not file_mapping.supported(), reason="no memory mapping on this platform")
PAGE = file_mapping.PAGE


@pytest.fixture(scope="module")
def converted(tiny_model_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mapped") / "tiny-fp32")
    convert(str(tiny_model_dir), out, dtype="float32")  # stored in the dtype `load` gives by default
    return out


def file_backed(array: jax.Array) -> str:
    """The file whose mapping holds `array`'s buffer ("" for anonymous memory), from /proc/self/maps."""
    pointer = array.unsafe_buffer_pointer()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= pointer < end:
                return fields[5] if len(fields) > 5 else ""
    return ""


def leaves(params) -> dict:
    return {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/maps is Linux's")
def test_params_are_the_chunk_files_and_equal_a_read(converted, monkeypatch):
    model = llava_jax.load(converted)
    mapped = {k: file_backed(v) for k, v in leaves(model.params).items()}
    params_dir = os.path.join(converted, "params")
    # Every param whose chunks are whole pages is mapped; the small stacked norms and biases (a 64-float layer
    # is 256 bytes) are read. The big ones must be among the mapped: they are what the mapping is for.
    assert mapped["['language_model']['lm_head']['weight']"].startswith(params_dir)
    assert mapped["['language_model']['layers']['gate_proj']['weight']"].startswith(params_dir)
    assert not mapped["['language_model']['layers']['input_layernorm']['scale']"].startswith(params_dir)
    assert sum(f.startswith(params_dir) for f in mapped.values()) >= 20

    monkeypatch.setattr(file_mapping, "supported", lambda: False)  # the reading path, for comparison
    read = llava_jax.load(converted)
    assert not any(file_backed(v).startswith(params_dir) for v in leaves(read.params).values())
    for key, value in leaves(read.params).items():
        np.testing.assert_array_equal(np.asarray(leaves(model.params)[key]), np.asarray(value), err_msg=key)


def test_mapped_params_outlive_the_loader(converted):
    """The device arrays alone keep the mappings alive: once the loader's host arrays are collected, a program
    still reads every param's values."""
    import gc

    model = llava_jax.load(converted)
    want = {k: np.array(v) for k, v in leaves(model.params).items()}  # copies, made while the loader's arrays live
    gc.collect()
    got = jax.jit(lambda p: jax.tree_util.tree_map(lambda x: x * 1, p))(model.params)  # new buffers, read by XLA
    for key, value in leaves(got).items():
        np.testing.assert_array_equal(np.asarray(value), want[key], err_msg=key)


def test_writing_into_a_mapped_param_leaves_the_file_alone(converted, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    model = llava_jax.load(str(copy))
    kernel = model.params["language_model"]["lm_head"]["weight"]
    assert sys.platform != "linux" or file_backed(kernel).startswith(str(copy))
    zeroed = jax.jit(lambda x: x * 0, donate_argnums=0)(kernel)  # XLA may write into the donated buffer
    assert not np.asarray(zeroed).any()
    llava_jax.load(str(copy), verify=True)  # every chunk still hashes as written


def test_corrupted_mapped_chunk_is_named(converted, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    chunk = copy / "params" / "language_model.layers.down_proj.weight" / "1.0.0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"down_proj\.weight/1\.0\.0 \(tensor language_model/layers/down_proj/"
                                            r"weight\)"):
        llava_jax.load(str(copy))


def test_short_chunk_is_an_error_not_a_fault(converted, tmp_path):
    """A chunk file shorter than its chunk (a truncated copy) must never be mapped: reading past its end would
    kill the process with SIGBUS. `load` catches it from the manifest; the mapping checks sizes itself too."""
    copy = tmp_path / "copy"
    shutil.copytree(converted, copy)
    array = open_array(str(copy / "params" / "language_model.lm_head.weight"))
    victim = copy / "params" / "language_model.lm_head.weight" / "0.0"
    os.truncate(victim, os.path.getsize(victim) - PAGE)
    with pytest.raises(CheckpointError, match=r"lm_head\.weight/0\.0 has \d+ bytes.*corrupted or truncated"):
        map_array(array, mapped_chunks(array))
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        llava_jax.load(str(copy), verify=False)


def test_map_files_lays_files_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    sizes = [2 * PAGE, PAGE, 1000]  # the last may end inside a page
    blobs = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    paths = []
    for i, blob in enumerate(blobs):
        paths.append(str(tmp_path / f"{i}"))
        blob.tofile(paths[-1])
    flat = file_mapping.map_files(list(zip(paths, sizes, strict=True)))
    np.testing.assert_array_equal(flat, np.concatenate(blobs))
    digest = hashlib.sha256(open(paths[0], "rb").read()).hexdigest()
    flat[:10] = 0  # private: the process's own copy of the page
    assert hashlib.sha256(open(paths[0], "rb").read()).hexdigest() == digest
    os.remove(paths[1])  # an unlinked file stays mapped (what replacing a checkpoint directory does to its files)
    np.testing.assert_array_equal(flat[2 * PAGE : 3 * PAGE], blobs[1])
    with pytest.raises(ValueError, match="whole number of pages"):
        file_mapping.map_files([(paths[2], 1000), (paths[0], 2 * PAGE)])


@pytest.mark.parametrize("shape, itemsize, stacked, want", [
    ((22, 2048, 5632), 4, True, (1, 744, 5632)),  # 16 MiB / 22528 B rows = 744.7 rows; every 2 rows are whole pages
    ((22, 2048, 5632), 2, True, (1, 1488, 5632)),
    ((2048, 32064), 4, False, (128, 32064)),  # 130.8 rows; 16 rows are whole pages
    ((22, 2048), 4, True, (1, 2048)),  # a layer's norm scale: one row
    ((32064, 2048), 2, False, (4096, 2048)),
])
def test_row_block_chunks(shape, itemsize, stacked, want):
    chunks = row_block_chunks(shape, itemsize, 16 << 20, stacked)
    assert chunks == want
    assert np.prod(chunks) * itemsize <= 16 << 20
