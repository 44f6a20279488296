"""LLaVA-format training data: a JSON list of rows and the folder their images are in.

A row, as the original's `LazySupervisedDataset` reads it:

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",       # image: optional, relative path
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

`load_dataset` checks every row before training starts (the original finds a bad row only when it reaches
it, hours in): the row's shape, the turns (human/gpt alternating from human, at least one answer), the
`<image>` marker of an image row, and that its image file exists and is an image PIL can open (`verify`,
which reads the headers and, for PNG, checks the data; a truncated JPEG is only found when it is decoded).
Each problem is a `DataError` naming the file, the row index and the row's id; with `skip_bad` such rows are
left out and reported instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import InputError
from ..jsonfile import read_json
from ..prompt import IMAGE_MARKER

ROLES = ("human", "gpt")


class DataError(InputError):
    """Training data that cannot be used: a bad row (the message names the file, row index and id), or a
    file that is not a usable LLaVA-format JSON list."""


@dataclass(frozen=True)
class Example:
    """One usable row: its index in the JSON list, its id, its image's absolute path (None for a text-only
    row) and its turns ({"from": "human"|"gpt", "value": str}, alternating from human)."""

    row: int
    id: str
    image: str | None
    conversations: tuple[dict, ...]


class _BadRow(Exception):
    """A row's problem, raised while checking it; becomes a DataError naming the row."""


def _row_id(row) -> str:
    value = row.get("id") if isinstance(row, dict) else None
    return str(value) if isinstance(value, str | int) and not isinstance(value, bool) else ""


def check_conversations(conversations) -> tuple[dict, ...]:
    """The turns of a row, checked: a non-empty list of {"from": "human"|"gpt", "value": str} that alternates
    human/gpt from human and holds at least one answer. Raises `_BadRow` saying what is wrong."""
    if not isinstance(conversations, list) or not conversations:
        raise _BadRow("'conversations' must be a non-empty list of turns, got "
                      + (repr(conversations)[:60] if conversations is not None else "none"))
    turns = []
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise _BadRow(f"turn {k} is not an object: {turn!r:.60}")
        speaker, value = turn.get("from"), turn.get("value")
        if speaker not in ROLES:
            raise _BadRow(f"turn {k} has 'from': {speaker!r}; expected 'human' or 'gpt'")
        if not isinstance(value, str):
            raise _BadRow(f"turn {k} has no text ('value' must be a string, got {type(value).__name__})")
        if speaker != ROLES[k % 2]:
            raise _BadRow(f"turn {k} is from {speaker!r}: turns must alternate human/gpt, starting with human")
        turns.append({"from": speaker, "value": value})
    if len(turns) < 2:
        raise _BadRow("the conversation has no 'gpt' answer to train on")
    return tuple(turns)


def check_image_file(path: str) -> None:
    """Raise `_BadRow` unless `path` is a file PIL opens and verifies as an image."""
    from PIL import Image

    if not os.path.isfile(path):
        raise _BadRow(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            image.verify()
            width, height = image.size
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, DecompressionBombError ...
        raise _BadRow(f"image file {path} is not a readable image ({type(e).__name__}: {e})") from e
    if not width or not height:
        raise _BadRow(f"image file {path} is empty ({width}x{height})")


def _example(index: int, row, image_folder: str | None) -> Example:
    if not isinstance(row, dict):
        raise _BadRow(f"not an object but a JSON {type(row).__name__}")
    if "id" in row and _row_id(row) == "":
        raise _BadRow(f"'id' must be a string or an integer, got {row['id']!r:.60}")
    turns = check_conversations(row.get("conversations"))
    markers = sum(IMAGE_MARKER in t["value"] for t in turns)
    image = None
    if "image" in row:  # the original tests the key: "image": null is an image row with no file
        name = row["image"]
        if not isinstance(name, str) or not name:
            raise _BadRow(f"'image' must be a relative file path (one image per row), got {name!r:.60}")
        if markers != 1:
            raise _BadRow(f"an image row needs {IMAGE_MARKER} in exactly one message, found it in {markers}")
        if image_folder is None:
            raise _BadRow("the row has an image but no image folder was given")
        image = os.path.abspath(os.path.join(image_folder, name))
        check_image_file(image)
    return Example(index, _row_id(row), image, turns)


def load_dataset(json_path: str, image_folder: str | None, *, skip_bad: bool = False,
                 progress: bool = True) -> tuple[list[Example], list[str]]:
    """Read and check a LLaVA-format JSON file: (examples, skipped).

    image_folder: the directory the rows' `image` paths are relative to (None: text-only data).
    skip_bad: leave out bad rows, each reported in `skipped` as a one-line message; otherwise the first bad row
    raises `DataError` (naming the file, row index and id). A file that is missing, not JSON, not a list, empty,
    or (with skip_bad) has no good row at all is a `DataError` either way. progress: a progress bar while
    checking the rows.
    """
    from tqdm import tqdm

    if not os.path.isfile(json_path):
        raise DataError(f"training data file not found: {json_path}")
    if image_folder is not None and not os.path.isdir(image_folder):
        raise DataError(f"image folder not found: {image_folder}")
    rows = read_json(json_path, DataError, "LLaVA-format JSON file", kind=list)
    if not rows:
        raise DataError(f"{json_path}: the dataset is empty (a JSON list with no rows)")
    examples, skipped = [], []
    for index, row in enumerate(tqdm(rows, desc="checking data", unit="row", disable=not progress or None)):
        try:
            examples.append(_example(index, row, image_folder))
        except _BadRow as e:
            row_id = _row_id(row)
            message = f"{json_path}: row {index} (id {row_id!r}): {e}" if row_id else f"{json_path}: row {index}: {e}"
            if not skip_bad:
                raise DataError(message + " (skip bad rows with --skip-bad)") from None
            skipped.append(message)
    if not examples:
        raise DataError(f"{json_path}: none of its {len(rows)} rows is usable (first problem: {skipped[0]})")
    return examples, skipped
