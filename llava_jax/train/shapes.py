"""A synthetic LLaVA-format dataset small enough for a tiny model to learn: coloured shapes on white.

`make_shapes_dataset(out)` draws pictures of one shape each (a few colours x a few shapes, random position
and size) and writes, in `out`:

    images/train-00000.png ...    the training pictures; images/test-00000.png ... the held-out ones
    pretrain.json                 stage 1 (`--stage pretrain`): caption pairs, "<image>" -> "a red circle"
    finetune.json                 stage 2 (`--stage finetune`): questions, "What color is the shape?" -> "red",
                                  "What shape is this?" -> "circle", sometimes both in one conversation
    test.json                     one question per held-out picture, for `llava-jax eval`

Image paths are relative to `out` (train with `--image-folder OUT`). Every answer is one word. The files
depend only on the seed and the counts.
"""

from __future__ import annotations

import json
import os

import numpy as np

COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
COLOR_QUESTION = "What color is the shape?"
SHAPE_QUESTION = "What shape is this?"
IMAGE_SIZE = 64
FILES = ("images", "pretrain.json", "finetune.json", "test.json")


def draw_shape(shape: str, color: tuple[int, int, int], rng: np.random.Generator, size: int = IMAGE_SIZE):
    """One PIL picture: `shape` in `color` on white, its size 30-60% of the picture, placed at random."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    side = int(rng.integers(int(0.3 * size), int(0.6 * size) + 1))
    x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
    box = (x, y, x + side - 1, y + side - 1)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([(x + side / 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)], fill=color)
    return image


def _question(kind: str, first: bool) -> dict:
    text = COLOR_QUESTION if kind == "color" else SHAPE_QUESTION
    return {"from": "human", "value": "<image>\n" + text if first else text}


def _qa(kinds, color: str, shape: str) -> list[dict]:
    turns = []
    for k, kind in enumerate(kinds):
        turns += [_question(kind, k == 0), {"from": "gpt", "value": color if kind == "color" else shape}]
    return turns


def _pictures(rng: np.random.Generator, count: int, prefix: str, images_dir: str, progress) -> list[tuple]:
    """(relative image path, colour, shape) of `count` new pictures written to `images_dir`."""
    out = []
    for i in progress(range(count), desc=f"drawing {prefix}", unit="image"):
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        name = f"{prefix}-{i:05d}.png"
        draw_shape(shape, COLORS[color], rng).save(os.path.join(images_dir, name))
        out.append((f"images/{name}", color, shape))
    return out


def _write_json(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")


def make_shapes_dataset(out: str, train: int = 1000, test: int = 200, seed: int = 0, force: bool = False,
                        progress: bool = True) -> dict[str, str]:
    """Write the shapes dataset into directory `out` (see the module docstring); returns {file kind: path}.

    The directory is built next to `out` and renamed into place (nothing half written is left on failure);
    an existing `out` is replaced only with `force` and only if it holds nothing but these files.
    """
    from tqdm import tqdm

    from convert.atomic import atomic_directory

    from ..errors import InputError

    if train < 1 or test < 1:
        raise InputError(f"--train and --test must be >= 1, got {train} and {test}")

    def bar(items, **kw):
        return tqdm(items, disable=not progress or None, **kw)

    def foreign(path: str) -> list[str]:
        return [n for n in os.listdir(path) if n not in FILES]

    rng = np.random.default_rng(seed)
    with atomic_directory(out, force, foreign) as tmp:
        images = os.path.join(tmp, "images")
        os.makedirs(images)
        pictures = _pictures(rng, train, "train", images, bar)
        held_out = _pictures(rng, test, "test", images, bar)
        pretrain, finetune = [], []
        for i, (path, color, shape) in enumerate(pictures):
            pretrain.append({"id": f"train-{i:05d}", "image": path, "conversations": [
                {"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"a {color} {shape}"}]})
            pick = int(rng.integers(4))  # color, shape, color then shape, shape then color
            kinds = [("color",), ("shape",), ("color", "shape"), ("shape", "color")][pick]
            finetune.append({"id": f"train-{i:05d}", "image": path, "conversations": _qa(kinds, color, shape)})
        tests = [{"id": f"test-{i:05d}", "image": path,
                  "conversations": _qa(("color",) if i % 2 == 0 else ("shape",), color, shape)}
                 for i, (path, color, shape) in enumerate(held_out)]
        for name, rows in (("pretrain.json", pretrain), ("finetune.json", finetune), ("test.json", tests)):
            _write_json(os.path.join(tmp, name), rows)
    out = os.path.abspath(out)
    return {"images": os.path.join(out, "images"), "image_folder": out,
            **{name.removesuffix(".json"): os.path.join(out, name) for name in FILES[1:]}}
