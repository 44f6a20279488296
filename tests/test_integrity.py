"""Checksums: a converted checkpoint and the default-model cache carry them, `load` verifies them, and a
corrupted or missing file is reported in one line naming the tensor it holds."""

import json
import os
import shutil

import numpy as np
import pytest
from corrupt import flip_bit

import llava_jax
from convert.converter import convert
from llava_jax.errors import CheckpointError, ChecksumError
from llava_jax.integrity import MANIFEST_FILE, read_manifest, verify_manifest, write_manifest
from llava_jax.safetensors_io import read_header

LM_HEAD = "params/language_model.lm_head.weight"


@pytest.fixture(scope="module")
def converted(tiny_model_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("integrity") / "tiny")
    convert(str(tiny_model_dir), out)
    return out


@pytest.fixture
def copy(converted, tmp_path):
    dest = tmp_path / "copy"
    shutil.copytree(converted, dest)
    return dest


def flip_middle(path, nbytes=4096):
    """Invert `nbytes` bytes in the middle of a file (the corruption of the bug report)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2 - nbytes // 2)
        data = f.read(nbytes)
        f.seek(size // 2 - nbytes // 2)
        f.write(bytes(b ^ 0xFF for b in data))


def chunk_files(directory):
    return sorted(os.path.join(directory, f) for f in os.listdir(directory) if not f.startswith("."))


def test_every_file_is_listed_and_params_name_their_tensor(converted):
    manifest = read_manifest(converted)
    on_disk = {os.path.relpath(os.path.join(root, f), converted)
               for root, _, files in os.walk(converted) for f in files} - {MANIFEST_FILE}
    assert set(manifest["files"]) == on_disk
    owners = {part[3] for rel, entry in manifest["files"].items() if rel.startswith(LM_HEAD + "/")
              for part in entry["parts"]}
    assert owners == {"language_model/lm_head/weight"}
    assert verify_manifest(converted) is True


def test_corrupted_array_file_is_detected_and_named(converted, copy):
    flip_middle(chunk_files(copy / LM_HEAD)[0])
    with pytest.raises(ChecksumError, match=r"checksum mismatch in params/language_model\.lm_head\.weight/\S+ "
                                            r"\(tensor language_model/lm_head/weight\).*llava-jax-convert") as e:
        llava_jax.load(str(copy))
    assert "\n" not in str(e.value)
    # The check is what catches it: unverified, the corrupted values load silently.
    unchecked = llava_jax.load(str(copy), verify=False)
    good = llava_jax.load(converted)
    changed = np.asarray(unchecked.params["language_model"]["lm_head"]["weight"]) != np.asarray(
        good.params["language_model"]["lm_head"]["weight"])
    assert 0 < changed.sum() <= 4096 // 4 + 2  # the flipped float32 values, and nothing else


def test_verification_switches(converted, copy, monkeypatch):
    flip_middle(chunk_files(copy / LM_HEAD)[0])
    monkeypatch.setenv("LLAVA_JAX_VERIFY", "0")
    llava_jax.load(str(copy))  # documented switch: no hashing
    with pytest.raises(ChecksumError):
        llava_jax.load(str(copy), verify=True)  # the argument wins over the environment


def test_support_file_corruption_names_the_file(copy):
    flip_middle(copy / "tokenizer.model", 16)
    with pytest.raises(ChecksumError, match=r"mismatch in tokenizer\.model: the file is corrupted"):
        llava_jax.load(str(copy))


@pytest.mark.parametrize("verify", [True, False])
def test_deleted_array_file_is_one_line_naming_it(copy, verify):
    victim = chunk_files(copy / "params/language_model.layers.down_proj.weight")[-1]
    os.remove(victim)
    with pytest.raises(CheckpointError) as e:
        llava_jax.load(str(copy), verify=verify)
    message = str(e.value)
    assert "\n" not in message
    assert f"params/language_model.layers.down_proj.weight/{os.path.basename(victim)}" in message
    assert "(tensor language_model/layers/down_proj/weight) is missing" in message
    assert "convert it again with llava-jax-convert SRC OUT --force" in message


def test_deleted_manifest_is_refused(copy):
    (copy / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="checksums.json is missing"):
        llava_jax.load(str(copy))


def test_truncated_file_is_caught_without_hashing(copy):
    victim = chunk_files(copy / LM_HEAD)[0]
    os.truncate(victim, os.path.getsize(victim) - 1)
    with pytest.raises(ChecksumError, match=r"lm_head\.weight.*bytes.*corrupted or truncated"):
        llava_jax.load(str(copy), verify=False)


def test_default_model_cache_is_verified(tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_model_dir, cache)
    assert read_manifest(str(cache)) is not None
    ref = next(r for r in read_header(str(cache / "model.safetensors")) if r.name == "lm_head.weight")
    flip_bit(cache / "model.safetensors", (ref.start + ref.end) // 2)  # one bit inside lm_head's data
    with pytest.raises(ChecksumError, match=r"model\.safetensors \(tensor lm_head\.weight\).*delete .*cache"):
        llava_jax.load(str(cache))


def test_manifest_parts_split_large_files(tmp_path, monkeypatch):
    """A file bigger than a hashing part is hashed in parts; a change in any part is found."""
    monkeypatch.setattr("llava_jax.integrity.PART_BYTES", 1 << 20)
    data = np.random.default_rng(0).integers(0, 256, (1 << 20) + 5, np.uint8).tobytes()
    (tmp_path / "big.bin").write_bytes(data)
    manifest = write_manifest(str(tmp_path))
    assert len(manifest["files"]["big.bin"]["parts"]) == 2
    with open(tmp_path / "big.bin", "r+b") as f:
        f.seek(len(data) - 3)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ChecksumError, match="big.bin"):
        verify_manifest(str(tmp_path))
    assert json.loads((tmp_path / MANIFEST_FILE).read_text())["algorithm"] == "xxh3_128"


def test_cli_reports_corruption_and_no_verify_skips_it(copy, monkeypatch, capsys):
    from llava_jax import cli

    flip_middle(chunk_files(copy / LM_HEAD)[0])
    monkeypatch.setenv("LLAVA_JAX_VERIFY", "1")  # restored after the test (--no-verify sets it to 0)
    monkeypatch.setenv("LLAVA_JAX_COMPILATION_CACHE", "off")
    args = ["generate", "--model", str(copy), "--prompt", "Hi", "--max-new-tokens", "1", "--mesh", "none"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checksum mismatch in params/language_model.lm_head.weight" in err
    assert cli.main([*args, "--no-verify"]) == 0


def test_loading_never_imports_the_converter(converted):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = ("import sys, llava_jax; llava_jax.load(sys.argv[1]); "
              "assert not [m for m in sys.modules if m == 'convert' or m.startswith('convert.')]; print('OK')")
    done = subprocess.run([sys.executable, "-c", script, converted], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": repo})
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-2000:]
