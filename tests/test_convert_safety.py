"""The converter never deletes what is not its own, cleans up after interrupted runs, reports a full disk and
unreadable JSON in one line, honours the umask, and never reads outside the checkpoint directory."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
from files import file_tree

import llava_jax
from convert.atomic import DestinationError
from convert.converter import convert
from llava_jax import default_model
from llava_jax.config import ConfigError
from llava_jax.errors import CheckpointError
from llava_jax.integrity import verify_manifest
from llava_jax.random_checkpoint import write_random_checkpoint
from llava_jax.safetensors_io import INDEX_FILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The default model's weights as a sharded llava-hf checkpoint (index + 4 shards), no tokenizer."""
    path = tmp_path_factory.mktemp("sharded") / "src"
    write_random_checkpoint(path, default_model.RANDOM_CONFIG, "float32", seed=3, shard_bytes=10 << 20)
    assert (path / INDEX_FILE).is_file()
    return path



def leftovers(parent):
    return sorted(f for f in os.listdir(parent) if ".tmp-" in f or ".old-" in f)


# ---------------------------------------------------------------- --force never deletes foreign files


def test_force_refuses_a_conversion_with_foreign_entries_and_deletes_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    convert(str(tiny_model_dir), str(out))
    (out / "notes.txt").write_text("keep me")
    (out / "runs").mkdir()
    (out / "runs" / "log.txt").write_text("mine too")
    before = file_tree(out)
    with pytest.raises(DestinationError, match=r"holds entries that a conversion does not write \(notes\.txt, "
                                               r"runs\).*not replacing it even with --force"):
        convert(str(tiny_model_dir), str(out), force=True)
    assert file_tree(out) == before and leftovers(tmp_path) == []
    done = subprocess.run([sys.executable, "-m", "convert", str(tiny_model_dir), str(out), "--force", "--quiet"],
                          capture_output=True, text=True, env=env(), timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "notes.txt" in done.stderr
    assert file_tree(out) == before
    # a conversion with nothing added is replaced
    (out / "notes.txt").unlink()
    shutil.rmtree(out / "runs")
    convert(str(tiny_model_dir), str(out), force=True)
    assert verify_manifest(str(out)) and leftovers(tmp_path) == []


# ---------------------------------------------------------------- stale temporaries


KILLED = textwrap.dedent("""
    import sys, time
    from convert.converter import convert

    def progress(nbytes, tensors):
        print("writing", flush=True)
        time.sleep(60)  # killed here, mid-conversion

    convert(sys.argv[1], sys.argv[2], progress=progress)
""")


def test_stale_temporary_of_a_killed_conversion_is_removed(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(tiny_model_dir), str(out)], stdout=subprocess.PIPE,
                            text=True, env=env())
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
    stale = leftovers(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(".out.tmp-") and not out.exists()
    # a temporary of a conversion that is still running (it holds the lock) is left alone
    running = tmp_path / ".out.tmp-running"
    running.mkdir()
    fd = os.open(running, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        done = subprocess.run([sys.executable, "-m", "convert", str(tiny_model_dir), str(out), "--quiet"],
                              capture_output=True, text=True, env=env(), timeout=300)
    finally:
        os.close(fd)
    assert done.returncode == 0, done.stderr
    assert f"removed {tmp_path / stale[0]}, left by an interrupted conversion" in done.stderr
    assert f"left {running} alone" in done.stderr
    assert leftovers(tmp_path) == [".out.tmp-running"]
    assert verify_manifest(str(out))
    report = convert(str(tiny_model_dir), str(out), force=True)  # no lock held now: it is stale
    assert report.stale.removed == [str(running)] and leftovers(tmp_path) == []


# ---------------------------------------------------------------- a full disk


# Files may not grow past 1 MB: a write past it fails with EFBIG (SIGXFSZ ignored), as writes on a full disk fail.
SMALL_DISK = textwrap.dedent("""
    import os, resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    os.execv(sys.executable, [sys.executable, "-m", "convert", *sys.argv[1:]])
""")


def test_full_disk_is_one_line_and_leaves_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", SMALL_DISK, str(tiny_model_dir), str(out), "--quiet"],
                          capture_output=True, text=True, env=env(), timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("llava-jax-convert: error: no space left for") and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr and os.listdir(tmp_path) == []


# ---------------------------------------------------------------- umask


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_respect_the_umask(tiny_model_dir, tmp_path, umask):
    old = os.umask(umask)
    try:
        convert(str(tiny_model_dir), str(tmp_path / "out"))
        cache = default_model.random_model_dir(tmp_path / "cache")
        trained_cache = default_model.default_model_dir(tmp_path / "cache")
    finally:
        os.umask(old)
    for top in (tmp_path / "out", cache, trained_cache):
        for root, _dirs, files in os.walk(top):
            assert os.stat(root).st_mode & 0o777 == 0o777 & ~umask, root
            for f in files:
                if top != tmp_path / "out" and f.startswith("tokenizer"):
                    continue  # copied by the tokenizer helper
                assert os.stat(os.path.join(root, f)).st_mode & 0o777 == 0o666 & ~umask, f


# ---------------------------------------------------------------- bad JSON, bad headers, escaping shard paths


def test_invalid_json_is_named(sharded, tmp_path):
    bad_config = tmp_path / "bad-config"
    shutil.copytree(sharded, bad_config)
    (bad_config / "checksums.json").unlink()  # edited copies: their checksums no longer hold
    (bad_config / "config.json").write_text('{"model_type": "llava_next",')
    for call in (lambda: llava_jax.load(str(bad_config)), lambda: convert(str(bad_config), str(tmp_path / "o"))):
        with pytest.raises(ConfigError, match=r"config\.json: not a valid config\.json: .* line 1, column 29"):
            call()
    bad_index = tmp_path / "bad-index"
    shutil.copytree(sharded, bad_index)
    (bad_index / "checksums.json").unlink()
    (bad_index / INDEX_FILE).write_text("{'weight_map': {}}")
    for call in (lambda: llava_jax.load(str(bad_index)), lambda: convert(str(bad_index), str(tmp_path / "o"))):
        with pytest.raises(CheckpointError, match=r"index\.json: not a valid shard index"):
            call()
    done = subprocess.run([sys.executable, "-m", "convert", str(bad_config), str(tmp_path / "o"), "--quiet"],
                          capture_output=True, text=True, env=env(), timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "not a valid config.json" in done.stderr
    assert not (tmp_path / "o").exists()


def test_header_without_dtype(sharded, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(sharded, bad)
    (bad / "checksums.json").unlink()
    shard = bad / "model-00001-of-00004.safetensors"
    data = bytearray(shard.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    del header[name]["dtype"]
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (n - len(raw))  # same length: the data offsets stay right
    shard.write_bytes(bytes(data[:8]) + raw + bytes(data[8 + n:]))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' has no 'dtype' field"):
        llava_jax.load(str(bad))


@pytest.mark.parametrize("escape", ["../other/model.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_weight_map_may_not_leave_the_directory(sharded, tmp_path, escape):
    src = tmp_path / "ckpt"
    shutil.copytree(sharded, src)
    (src / "checksums.json").unlink()
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(src / "model-00004-of-00004.safetensors", other / "model.safetensors")  # a readable target
    index = json.loads((src / INDEX_FILE).read_text())
    victim = next(iter(index["weight_map"]))
    index["weight_map"][victim] = escape
    (src / INDEX_FILE).write_text(json.dumps(index))
    for call in (lambda: llava_jax.load(str(src)), lambda: convert(str(src), str(tmp_path / "out"))):
        with pytest.raises(CheckpointError, match=f"'{victim}' is mapped to '{escape}', a path outside the "
                                                  "checkpoint directory: refusing"):
            call()
