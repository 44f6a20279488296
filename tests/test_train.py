"""The trainer (llava_jax/train/trainer.py) on a tiny random-weight LLaVA-NeXT (56-pixel crops, 2+2 layers, the
real Mistral tokenizer): the collated batch computes HF's loss, one step program per shape bucket, a resumed
run repeats the uninterrupted one bit for bit, Ctrl-C saves, each stage trains only its parts, too-long rows
are refused / skipped / truncated, and the CLI writes a model `llava_jax.load` generates with."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

import llava_jax
from llava_jax import cli
from llava_jax.default_model import write_small_model
from llava_jax.errors import InputError
from llava_jax.train.collate import Collator, tokenize_examples
from llava_jax.train.data import DataError, load_dataset
from llava_jax.train.labels import IGNORE_INDEX
from llava_jax.train.trainer import METRICS_FILE, train

COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A LLaVA-NeXT checkpoint small enough to train in a test (16 features per crop, 56-pixel crops)."""
    return str(write_small_model(tmp_path_factory.mktemp("small") / "model"))


def write_data(folder, rows: int, long_answers=(), two_sizes=True) -> tuple[str, str]:
    """A LLaVA-format finetune JSON of colored rectangles (two image sizes: two AnyRes grids, unless not
    `two_sizes`) with their color as the answer; rows in `long_answers` get a long answer (another length
    bucket)."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    data = []
    for i in range(rows):
        color = list(COLORS)[i % 3]
        Image.new("RGB", (60, 40) if i % 2 and two_sizes else (40, 70), COLORS[color]).save(images / f"{i}.png")
        answer = " ".join([color] * 40) if i in long_answers else color
        data.append({"id": f"ex{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is this?"}, {"from": "gpt", "value": answer}]})
    (folder / "data.json").write_text(json.dumps(data))
    return str(folder / "data.json"), str(images)


def run(small_model, out, data, images, **kw):
    kw = {"stage": "finetune", "lr": 1e-3, "batch_size": 2, "progress": False, **kw}
    return train(model=small_model, data=data, image_folder=images, output=str(out), **kw)


def test_collated_batch_gives_the_hf_loss(small_model, tmp_path):
    """The trainer's batch (image placeholder expanded, right padding, crops and features padded to buckets,
    a dummy row) gives the loss `model.loss` computes from the same rows as HF-style left-padded inputs.
    Bound 1e-6 relative: the same fp32 math on other padding (a misplaced feature or label moves it by > 1e-2)."""
    data, images = write_data(tmp_path, 3)
    model = llava_jax.load(small_model, mesh=None)
    examples, _ = load_dataset(data, images)
    items, _ = tokenize_examples(model, examples, "mistral_instruct", 512, progress=False)
    batch = Collator(model, 4, 512)(items)
    assert batch.input_ids.shape[0] == 4  # three rows and a dummy row
    from llava_jax.train.loss import loss_fn

    ours = float(jax.jit(lambda p, b: loss_fn(model.network, p, b))(model.params, batch))

    rows = [r[m] for r, m in zip(np.asarray(batch.input_ids)[:3], np.asarray(batch.attention_mask)[:3], strict=True)]
    seq = max(map(len, rows))
    ids, mask = np.zeros((3, seq), np.int64), np.zeros((3, seq), np.int64)
    labels = np.full((3, seq), IGNORE_INDEX)
    processed = [model.processor.process_image(it.example.image) for it in items]
    for b, (r, it) in enumerate(zip(rows, items, strict=True)):
        ids[b, seq - len(r):], mask[b, seq - len(r):] = r, 1
        k = int(np.flatnonzero(it.input_ids < 0)[0])  # the image placeholder
        lab = np.concatenate([it.labels[:k], np.full(it.image_tokens, IGNORE_INDEX), it.labels[k + 1:]])
        labels[b, seq - len(r):] = lab
    px = np.zeros((3, max(len(p.crops) for p in processed), 3, 56, 56), np.float32)
    for i, p in enumerate(processed):
        px[i, : len(p.crops)] = p.crops
    ref = model.loss(ids, labels, px, [p.size for p in processed], mask)
    assert (labels != IGNORE_INDEX).sum() >= 6
    assert abs(ours - ref) < 1e-6 * ref


def test_resume_repeats_the_uninterrupted_run_exactly(small_model, tmp_path):
    """Ctrl-C (KeyboardInterrupt from the step hook) after step 2 saves; --resume then gives the same losses
    (metrics.jsonl) and the same final params as a run never interrupted, bit for bit. With gradient
    accumulation and a data order that crosses epoch boundaries (4 examples, batch 2, 8 micro-batches)."""
    data, images = write_data(tmp_path, 4, two_sizes=False)
    settings = dict(steps=4, grad_accum=2, warmup_ratio=0.0)  # warmup: lr 0 at step 1, step 2 equal to it
    whole = run(small_model, tmp_path / "whole", data, images, **settings)

    def stop_after_two(metrics):
        if metrics["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(small_model, tmp_path / "split", data, images, on_step=stop_after_two, **settings)
    resumed = run(small_model, tmp_path / "split", data, images, resume=True, **settings)
    assert resumed.steps == whole.steps == 4

    def losses(out):
        return [json.loads(line)["loss"] for line in (out / METRICS_FILE).read_text().splitlines()]

    assert losses(tmp_path / "split") == losses(tmp_path / "whole") == whole.losses
    assert len(set(whole.losses)) == 4  # the steps really differ (the comparison is not vacuous)
    a = llava_jax.load(str(tmp_path / "whole"), mesh=None).params
    b = llava_jax.load(str(tmp_path / "split"), mesh=None).params
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_resume_refuses_a_state_saved_in_the_earlier_param_layout(small_model, tmp_path):
    """A train state saved before Linear weights took torch's (out, in) layout (its record has no param_layout)
    is refused on --resume, naming the setting: saved as a flat list of arrays, its square weights would
    otherwise be read back transposed without any shape error."""
    data, images = write_data(tmp_path, 2, two_sizes=False)

    def stop_after_one(metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(small_model, tmp_path / "out", data, images, steps=2, on_step=stop_after_one)
    records = list((tmp_path / "out" / "checkpoints").glob("*/record/metadata"))  # Orbax's JSON item
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    assert record["settings"]["param_layout"] == "weight (out, in)"
    del record["settings"]["param_layout"]
    records[0].write_text(json.dumps(record))
    with pytest.raises(InputError, match=r"param_layout \('kernel \(in, out\)' -> 'weight \(out, in\)'\)"):
        run(small_model, tmp_path / "out", data, images, steps=2, resume=True)


def test_cli_pretrain_trains_the_projector_with_one_program_per_bucket(small_model, tmp_path, capsys):
    """`llava-jax train --stage pretrain` changes the projector and image_newline only, and the output loads and
    generates. An epoch of 8 rows in 4 batches, two of them holding a long row, compiles one step program per
    length bucket: 2."""
    data, images = write_data(tmp_path, 8, long_answers=(0, 3), two_sizes=False)
    out = tmp_path / "out"
    args = ["train", "--model", small_model, "--data", data, "--image-folder", images, "--output", str(out),
            "--stage", "pretrain", "--epochs", "1", "--batch-size", "2", "--lr", "1e-3", "--quiet"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "trained 4 steps" in printed and "(2 step programs compiled)" in printed
    lines = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4] and all(m["tokens_per_s"] > 0 for m in lines)
    base = llava_jax.load(small_model, mesh=None)
    model = llava_jax.load(str(out), mesh=None)
    for part in ("vision_tower", "language_model"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, base.params[part], model.params[part])
    for part in ("multi_modal_projector", "image_newline"):
        diff = jax.tree_util.tree_map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()),
                                      base.params[part], model.params[part])
        assert min(jax.tree_util.tree_leaves(diff)) > 0, part
    assert isinstance(model.generate("What color?", images=images + "/1.png", max_new_tokens=3), str)


def test_long_rows_are_refused_skipped_or_truncated(small_model, tmp_path):
    """Rows are about 75 tokens after image expansion, row 2 about 120 (its answer is 40 words)."""
    data, images = write_data(tmp_path, 4, long_answers=(2,), two_sizes=False)
    model = llava_jax.load(small_model, mesh=None)
    examples, _ = load_dataset(data, images)
    with pytest.raises(DataError, match="row 2 .*ex2.*exceed --max-length 100"):
        tokenize_examples(model, examples, "mistral_instruct", 100, progress=False)
    kept, skipped = tokenize_examples(model, examples, "mistral_instruct", 100, skip_bad=True, progress=False)
    assert [k.example.row for k in kept] == [0, 1, 3] and len(skipped) == 1 and "row 2" in skipped[0]
    # truncate: row 2 is cut to 100 tokens after expansion, the others kept whole
    items, _ = tokenize_examples(model, examples, "mistral_instruct", 100, truncate=True, progress=False)
    assert items[2].length > 100
    batch = Collator(model, 4, 100)(items)
    lengths = np.asarray(batch.attention_mask).sum(axis=1).tolist()
    assert lengths == [items[0].length, items[1].length, 100, items[3].length]
    placed = np.asarray(batch.feature_positions) < np.asarray(batch.input_ids).size
    assert placed.sum() == sum(it.image_tokens for it in items)  # every image token gets its feature


def test_cli_errors(small_model, tmp_path, capsys):
    data, images = write_data(tmp_path, 2)
    args = ["train", "--model", small_model, "--data", data, "--image-folder", images, "--output",
            str(tmp_path / "out"), "--stage", "finetune", "--quiet"]
    with pytest.raises(SystemExit) as e:
        cli.main(args + ["--steps", "0"])
    assert e.value.code == 2 and "--steps" in capsys.readouterr().err
    assert cli.main(args[:4] + [str(tmp_path / "missing.json")] + args[5:]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("llava-jax: error:") and "missing.json" in err
