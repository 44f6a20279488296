"""Sharded training (llava_jax/train/sharded.py): parity of meshes with one device, the layout of params and
optimizer state, bytes per device, a train state moved across meshes, and the per-process batch shares.

The multi-device tests run `train_sharding_worker.py` in one subprocess with 8 simulated CPU devices (XLA_FLAGS
must be set before jax is imported, which this process already did): 3 optimizer steps of the trainer's step
program (batch 8, stage finetune) on one device and on meshes 1x8, 2x4, 4x2, 8x1 and 2x4 with FSDP.

Bounds (fp32 both sides, the same weights and batches; sharding changes only the order of reductions: partial
sums over devices, all-reduced gradients):
- loss and gradient norm of every step: relative difference < 1e-5. Observed <= 1.4e-7 (one or two ulps of a
  loss of ~14), so 1e-5 leaves a ~70x margin, while a layout error (a head split wrongly, a row counted on two
  devices, a gradient summed twice over `data`) changes them by 1e-3 or more.
- params after 3 steps: max |diff| < 1e-4 while the steps moved them by > 1e-3 (lr 1e-3). AdamW divides each
  gradient element by its own RMS, so an element whose gradient is at the level of the reduction noise gets a
  step of up to lr whichever way the noise goes: params do not agree to the ulp as losses do. Observed <= 2e-5;
  an update applied to the wrong shard or missing on one moves elements by ~lr = 1e-3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import AbstractMesh
from test_train import write_data

from llava_jax import cli
from llava_jax.config import LlavaConfig, TextConfig
from llava_jax.errors import InputError
from llava_jax.sharding import ShardingRules
from llava_jax.train import trainer
from llava_jax.train.sharded import (
    TrainSharding,
    combine_shares,
    localize_share,
    process_share,
    share_rows,
    share_sizes,
)

HERE = Path(__file__).parent
MESHES = ["data=1,model=8", "data=2,model=4", "data=4,model=2", "data=8,model=1"]
FSDP = "fsdp data=2,model=4"
STEP_RTOL, PARAM_ATOL = 1e-5, 1e-4


@pytest.fixture(scope="module", autouse=True)
def worker(tmp_path_factory):
    """The 8-device worker, started when the module starts: the in-process tests (first in this file) run while
    it compiles."""
    out = tmp_path_factory.mktemp("train_sharding") / "out.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    log = open(out.with_suffix(".log"), "w")  # a file, not a pipe: nobody reads it until the worker ends
    proc = subprocess.Popen([sys.executable, str(HERE / "train_sharding_worker.py"), str(out)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def results(worker):
    proc, out = worker
    try:
        proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.returncode != 0:
        log = out.with_suffix(".log").read_text()
        pytest.fail(f"train sharding worker failed with code {proc.returncode}:\n{log[-4000:]}")
    return json.loads(out.read_text())


# ---- in-process: the per-process split of a batch, options and errors ------------------------------------------
def test_process_share():
    # data axis over processes: process p holds data block p (of 4 processes, 8 rows: 2 rows each)
    assert [process_share(8, 4, p, 4) for p in range(4)] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    # data=8 over 2 processes: each holds 4 data blocks, one share of 4 rows
    assert [process_share(8, 8, p, 2) for p in range(2)] == [(0, 2), (1, 2)]
    # model axis across processes (data=2 over 4 processes): processes 0,1 read share 0, 2,3 share 1
    assert [process_share(8, 2, p, 4) for p in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert process_share(8, 4, 0, 1) == (0, 1)
    with pytest.raises(InputError, match="data axis .3. and the process count .2."):
        process_share(6, 3, 0, 2)
    with pytest.raises(InputError, match="--batch-size 6 does not split into 4"):
        process_share(6, 4, 0, 4)
    rows = list("abcdef")
    assert share_rows(rows, 1, 2, 8) == (["e", "f"], True)  # a short last batch: share 1 gets what is left
    assert share_rows(rows[:3], 1, 2, 8) == (["a"], False)  # nothing left for share 1: a filler row


def batch_contents(batch, tokens_per_crop: int) -> list:
    """What each row of a `LossBatch` feeds the model, position by position: (token, position id, the image
    feature placed there: its crop's pixels and its row in the crop, or "newline"), and its supervised targets
    ((column, target id) of weight 1). Padding (columns past the mask, dropped features, weight-0 targets) is left
    out, so batches padded differently compare equal when the model sees the same thing."""
    ids, mask, pos = (np.asarray(x) for x in (batch.input_ids, batch.attention_mask, batch.positions))
    rows, seq = ids.shape
    crops = np.asarray(batch.crops)
    placed = {}
    for index, where in zip(np.asarray(batch.feature_index), np.asarray(batch.feature_positions), strict=True):
        if where < rows * seq:  # the network drops positions past the end
            placed[int(where)] = "newline" if index < 0 else (crops[index // tokens_per_crop].tobytes(),
                                                              int(index % tokens_per_crop))
    targets = [[] for _ in range(rows)]
    for where, tid, w in zip(np.asarray(batch.target_positions), np.asarray(batch.target_ids),
                             np.asarray(batch.target_weight), strict=True):
        if w:
            targets[where // seq].append((int(where % seq), int(tid)))
    return [([(int(ids[r, c]), int(pos[r, c]), placed.get(r * seq + c)) for c in range(seq) if mask[r, c]],
             sorted(targets[r])) for r in range(rows)]


def test_shares_make_the_batch_one_host_would(small_model, tmp_path):
    """Two processes' shares (each collated from its own rows only, padded to the agreed sizes, indices moved)
    put together feed the model what the batch one host collates from all rows feeds it: the same tokens,
    positions, image features (pixels and row in the crop) and targets at the same places, row by row. Every
    image feature and every target is placed (none lost to padding). A filler share (no rows left for it) has
    no target weight."""
    import llava_jax
    from llava_jax.train.collate import Collator, tokenize_examples
    from llava_jax.train.data import load_dataset

    data, images = write_data(tmp_path, 4, long_answers=(3,))  # two image sizes (AnyRes grids), one longer row
    model = llava_jax.load(small_model, mesh=None)
    items, _ = tokenize_examples(model, load_dataset(data, images)[0], "mistral_instruct", 512, progress=False)
    tpc = model.config.tokens_per_crop

    def split(rows):
        parts = []
        for share in range(2):
            mine, real = share_rows(rows, share, 2, 4)
            parts.append((Collator.for_examples(model, items, 2, 512)(mine), real))
        # what agree_sizes all-gathers, grown as if another process had longer rows and more images: every
        # share is then widened and its flat indices re-laid for the longer rows
        sizes = np.max([share_sizes(b) for b, _ in parts], axis=0) + np.array([32, 2, 16, 8])
        return combine_shares([localize_share(b, sizes, s, 2, 1, tpc, real) for s, (b, real) in enumerate(parts)])

    rows = [items[i] for i in (0, 2, 1, 3)]  # share 0: two 40x70 images, share 1: two 60x40 ones and the long row
    whole = batch_contents(Collator.for_examples(model, items, 4, 512)(rows), tpc)
    shared = split(rows)
    got = batch_contents(shared, tpc)
    assert got == whole
    features = sum(1 for row, _ in whole for *_, f in row if f is not None)
    assert features == sum(it.image_tokens for it in items) and all(targets for _, targets in whole)
    filled = split(items[:2])  # share 1 has no row: a filler whose targets weigh 0 (the loss is a weighted mean)
    weight = np.asarray(filled.target_weight)
    assert weight[: len(weight) // 2].sum() > 0 and weight[len(weight) // 2:].sum() == 0


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    from llava_jax.default_model import write_small_model

    return str(write_small_model(tmp_path_factory.mktemp("small") / "model"))


def test_batch_must_split_over_data():
    config = LlavaConfig(text=TextConfig(num_heads=8, num_kv_heads=8))
    placement = TrainSharding(ShardingRules.create(AbstractMesh((4, 2), ("data", "model")), config))
    placement.check_batch_size(8)
    with pytest.raises(InputError, match="--batch-size 6 does not split over the mesh's data axis of 4"):
        placement.check_batch_size(6)
    with pytest.raises(InputError, match="--fsdp needs --mesh"):
        trainer.TrainConfig(stage="finetune", data="d", image_folder="i", output="o", fsdp=True)


def test_cli_mesh_options(monkeypatch, tmp_path):
    seen = {}

    def fake_train(config):
        seen["config"] = config
        return trainer.TrainResult(str(tmp_path), 0)

    monkeypatch.setattr(trainer, "train", fake_train)
    base = ["train", "--data", "d.json", "--image-folder", "img", "--output", str(tmp_path), "--stage", "finetune",
            "--quiet"]
    assert cli.main(base + ["--mesh", "data=2,model=4", "--fsdp"]) == 0
    assert seen["config"].mesh == "data=2,model=4" and seen["config"].fsdp
    assert cli.main(base) == 0
    assert seen["config"].mesh == "auto" and not seen["config"].fsdp


# ---- 8 simulated devices (the worker) ---------------------------------------------------------------------------
def assert_steps_match(got, ref):
    assert len(got) == len(ref) == 3
    for (loss, norm), (ref_loss, ref_norm) in zip(got, ref, strict=True):
        assert abs(loss - ref_loss) < STEP_RTOL * ref_loss, (loss, ref_loss)
        assert abs(norm - ref_norm) < STEP_RTOL * ref_norm, (norm, ref_norm)


@pytest.mark.parametrize("mesh", MESHES + [FSDP])
def test_three_steps_on_a_mesh_match_one_device(results, mesh):
    assert results["devices"] == 8
    got = results["meshes"][mesh]
    assert_steps_match(got["steps"], results["ref_steps"])
    assert results["ref_steps"][0][0] > results["ref_steps"][2][0]  # the steps train: the loss goes down
    assert results["moved"] > 1e-3  # the params moved: the param comparison is not vacuous
    assert got["param_diff"] < PARAM_ATOL, got["param_diff"]
    assert got["donated"]  # the step consumed the train state's buffers


def expected_specs(mesh: str) -> dict:
    """The rule table's layout of some params of the worker's model (8 heads, 4 kv heads, 8 vision heads)."""
    model = int(mesh.split("model=")[1])
    m = "model" if model > 1 else None
    kv = m if model <= 4 else None  # 4 kv heads: replicated on model=8
    return {"language_model/layers/q_proj/weight": [None, m, None],
            "language_model/layers/k_proj/weight": [None, kv, None],
            "language_model/layers/down_proj/weight": [None, None, m],
            "language_model/embed_tokens/embedding": [m, None], "language_model/lm_head/weight": [m, None],
            "language_model/layers/input_layernorm/scale": [None, None],
            "vision_tower/layers/fc1/weight": [None, m, None],  # frozen params are placed by the table too
            "multi_modal_projector/linear_1/weight": [m, None]}


@pytest.mark.parametrize("mesh", MESHES)
def test_params_and_optimizer_state_follow_the_rule_table(results, mesh):
    got = results["meshes"][mesh]
    for name, spec in expected_specs(mesh).items():
        assert got["specs"][name] == spec, name
    model_split = any("'model'" in s for s in got["opt_specs"])
    assert model_split == (mesh != "data=8,model=1")  # the moments are split like their params
    assert not any("'data'" in s for s in got["opt_specs"])  # without FSDP nothing is split over data


def test_fsdp_splits_params_and_optimizer_state_over_data(results):
    got = results["meshes"][FSDP]
    assert got["specs"]["language_model/layers/q_proj/weight"] == [None, "model", "data"]
    assert got["specs"]["language_model/embed_tokens/embedding"] == ["model", "data"]
    assert "(None, 'model', 'data')" in got["opt_specs"] and "('model', 'data')" in got["opt_specs"]


def test_bytes_per_device_shrink_as_the_mesh_grows(results):
    """Params + optimizer state per device: data parallelism alone holds everything on every device; each
    doubling of the model axis about halves it; FSDP splits what is left over data."""
    b = {m: results["meshes"][m]["bytes_per_device"] for m in MESHES + [FSDP]}
    assert b["data=8,model=1"] == results["ref_bytes"]
    assert b["data=1,model=8"] < b["data=2,model=4"] < b["data=4,model=2"] < b["data=8,model=1"]
    assert b["data=4,model=2"] < 0.55 * b["data=8,model=1"]
    assert b["data=1,model=8"] < 0.15 * b["data=8,model=1"]
    assert b[FSDP] < 0.55 * b["data=2,model=4"]


def test_train_state_moves_across_meshes(results):
    """Saved on 2x4 after step 1, restored onto 4x2 for step 2, saved, restored onto one device for step 3:
    the same losses and params as the unbroken single-device run (bounds above)."""
    got = results["resume"]
    assert_steps_match(got["steps"], results["ref_steps"])
    assert got["param_diff"] < PARAM_ATOL
