"""The recipe of the shipped default model: `llava-jax make-default OUT [--seed S]` (or `make_default(OUT)`).

From a seed, on one CPU, with llava-jax's own trainer:

1. the starting point (`write_base_model`): random weights of `default_model.SHAPES_CONFIG` (`random_checkpoint`,
   the seed) but a 2-D sine-cosine position embedding in the vision tower, and the real Mistral tokenizer;
2. the synthetic shapes dataset (`shapes.py`: `DATA` pictures, the seed);
3. stage 1 (`pretrain`: the projector, on captions) then stage 2 (`finetune`: projector, language model and
   vision tower, on one-word questions), with the settings in `STAGES`;
4. the result written as a llava-hf checkpoint in fp16 (`model.safetensors`, `config.json`), its checksums
   (`checksums.json`, what `load` verifies), and `recipe.json`: the settings, the held-out accuracy of the fp16
   weights, and every optimizer step's loss (exact, as float hex) as a fingerprint of the run.

The same seed on the same software gives the same bytes (the data order, the initial weights and the pictures
are functions of the seed; XLA's CPU programs are deterministic for given XLA flags: the `llava-jax` command's
and the test suite's, `xla_flags.py`; other flags change the last bits of some sums, and so every later step).
`recipe.json` also holds a digest of each stage's fp32 params (`params_digest`). `llava_jax/assets/default-model/`
is the output of `llava-jax make-default llava_jax/assets/default-model --force` (seed 0); the test suite replays
stage 1 and the first stage 2 steps against it, `make-default OUT --check` the whole run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ..errors import InputError

DATA = {"train": 2000, "test": 100}
STAGES = {
    "pretrain": dict(lr=1e-3, steps=30, batch_size=8),
    "finetune": dict(lr=1e-3, steps=4000, batch_size=8, warmup_ratio=0.05, train_vision_tower=True, vision_lr=1e-3),
}
RECIPE_FILE = "recipe.json"
OUTPUT_FILES = ("config.json", "model.safetensors", "checksums.json", RECIPE_FILE)
DTYPE = "float16"


def shell_commands(seed: int = 0) -> str:
    """The recipe as `llava-jax` commands joined by `&&` (the README's fine-tuning demonstration): the same
    steps from the same seed, except that it evaluates the fp32 result rather than the fp16 export."""

    def flags(settings: dict) -> str:
        return " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v:g}" if isinstance(v, float)
                                                       else f" {v}") for k, v in settings.items())

    seed_flag = f" --seed {seed}" if seed else ""
    return " && ".join([
        f"llava-jax make-default base --base-only{seed_flag}",
        f"llava-jax make-dataset shapes data --train {DATA['train']} --test {DATA['test']}{seed_flag}",
        "llava-jax train --model base --data data/pretrain.json --image-folder data --output stage1 --stage pretrain "
        + flags(STAGES["pretrain"]) + seed_flag,
        "llava-jax train --model stage1 --data data/finetune.json --image-folder data --output stage2 "
        "--stage finetune " + flags(STAGES["finetune"]) + seed_flag,
        "llava-jax eval --model stage2 --data data/test.json --image-folder data --max-new-tokens 4 --json"])


def sincos_position_embedding(grid: int, dim: int):
    """(1 + grid * grid, dim) 2-D sine-cosine position embedding (MAE's): the first half of the features encodes
    the patch's row, the second its column, each as sines and cosines of geometric frequencies; zeros for CLS."""
    import numpy as np

    quarter = dim // 4
    freqs = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")

    def encode(pos):
        angles = pos.reshape(-1, 1) * freqs
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([encode(rows), encode(cols)], axis=1)
    return np.concatenate([np.zeros((1, dim)), table]).astype(np.float32)


def write_base_model(path: str | os.PathLike, seed: int = 0, config: dict | None = None) -> Path:
    """The recipe's starting point: random weights of `config` (default `SHAPES_CONFIG`) from `seed`, with the
    Mistral tokenizer; the vision tower's position embedding is the 2-D sine-cosine table instead of noise.

    Why: with random position embeddings a vision tower trained from scratch has no notion of which patches are
    neighbours, and in a few hundred steps it learns colours but not shapes (held-out shape answers stay near
    chance); with the 2-D table it sees the layout from the first step (as MAE initializes its ViTs)."""
    from safetensors.numpy import load_file

    from ..default_model import SHAPES_CONFIG
    from ..export import write_safetensors
    from ..integrity import write_manifest
    from ..prompt import mistral_tokenizer_dir
    from ..random_checkpoint import write_random_checkpoint
    from ..safetensors_io import file_parts

    config = config or SHAPES_CONFIG
    path = Path(path)
    mistral_tokenizer_dir(path)
    write_random_checkpoint(path, config, "float32", seed)
    weights = path / "model.safetensors"
    tensors = load_file(str(weights))
    name = "model.vision_tower.vision_model.embeddings.position_embedding.weight"
    vision = config["vision_config"]
    tensors[name] = sincos_position_embedding(vision["image_size"] // vision["patch_size"], vision["hidden_size"])
    write_safetensors(str(weights), tensors)
    write_manifest(str(path), lambda rel, size: file_parts(str(path / rel)) if rel.endswith(".safetensors")
                   else [(0, size, None)])
    return path


def params_digest(params) -> str:
    """One xxh3-128 digest of every param's bytes, in tree order (equal digests: bit-identical params)."""
    import jax
    import numpy as np

    from ..integrity import new_hasher

    h = new_hasher()
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()


class _StopAfter:
    """on_step hook: records each step's exact loss; stops the run (KeyboardInterrupt) after `limit` steps."""

    def __init__(self, limit: int | None):
        self.limit, self.losses = limit, []

    def __call__(self, line: dict) -> None:
        self.losses.append(float(line["loss"]).hex())
        if self.limit is not None and line["step"] >= self.limit:
            raise KeyboardInterrupt


def make_default(out: str | os.PathLike, seed: int = 0, *, work: str | os.PathLike | None = None,
                 force: bool = False, stop_after: int | None = None, progress: bool = True) -> dict:
    """Run the recipe (module docstring) and write its result into `out`; returns the recipe record.

    work: directory for the base model, the dataset and the stages' outputs (default: a temporary one, removed
    at the end). stop_after: stop stage 2 after this many optimizer steps and write nothing into `out` (the
    record then holds the losses so far: the reproduction test compares them with the shipped ones).
    """
    import tempfile

    import llava_jax

    from ..export import export_checkpoint
    from ..integrity import write_manifest
    from ..safetensors_io import file_parts
    from .data import load_dataset
    from .evaluate import evaluate
    from .shapes import make_shapes_dataset
    from .trainer import TrainConfig, train

    out = Path(out)
    if stop_after is None and out.exists():
        foreign = sorted(set(os.listdir(out)) - set(OUTPUT_FILES))
        if not force or foreign:
            raise InputError(f"{out} exists" + (f" and holds other files ({', '.join(foreign)})" if foreign else
                                                ": pass --force to replace it"))
    started = time.monotonic()
    own_work = work is None
    work = Path(tempfile.mkdtemp(prefix="llava-jax-make-default-") if own_work else work)
    record = {"seed": seed, "data": DATA, "stages": STAGES, "dtype": DTYPE, "losses": {}}
    try:
        base = write_base_model(work / "base", seed)
        data = make_shapes_dataset(str(work / "data"), **DATA, seed=seed, force=True, progress=progress)
        previous = str(base)
        for stage, settings in STAGES.items():
            hook = _StopAfter(stop_after if stage == "finetune" else None)
            output = str(work / stage)
            shutil.rmtree(output, ignore_errors=True)
            try:
                train(TrainConfig(stage=stage, model=previous, data=data[stage], image_folder=data["image_folder"],
                                  output=output, seed=seed, progress=progress, **settings), on_step=hook)
            except KeyboardInterrupt:
                if stop_after is None:
                    raise
                record["losses"][stage] = hook.losses
                return record
            record["losses"][stage] = hook.losses
            record[f"{stage}_params"] = params_digest(llava_jax.load(output, mesh=None).params)
            previous = output
        export = work / "export"
        export_checkpoint(previous, str(export), dtype=DTYPE, force=True, progress=progress)
        examples, _ = load_dataset(data["test"], data["image_folder"])
        result = evaluate(llava_jax.load(str(export), mesh=None), examples, max_new_tokens=4, batch_size=8,
                          progress=progress)
        record.update(accuracy=result["accuracy"], correct=result["correct"], n=result["n"],
                      seconds=round(time.monotonic() - started, 1))
        staged = work / "out"
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copyfile(export / name, staged / name)
        write_manifest(str(staged), lambda rel, size: file_parts(str(staged / rel)) if rel.endswith(".safetensors")
                       else [(0, size, None)])
        (staged / RECIPE_FILE).write_text(json.dumps(record, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), out)
        return record
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
