"""LLaVA-format training data: good rows load, every kind of bad row is a DataError naming file, row and id,
and with skip_bad is left out and reported."""

import json

import numpy as np
import pytest
from PIL import Image

from llava_jax.errors import InputError
from llava_jax.train.data import DataError, Example, load_dataset

Q = {"from": "human", "value": "<image>\nWhat color is the shape?"}
A = {"from": "gpt", "value": "red"}


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(images / "sub" / "ok.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (images / "notes.txt").write_text("hello")
    png = (images / "sub" / "ok.png").read_bytes()
    (images / "corrupt.png").write_bytes(png[:40] + bytes(b ^ 0xFF for b in png[40:60]) + png[60:])
    return tmp_path


def write(tmp_path, rows, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(rows) if not isinstance(rows, str) else rows)
    return str(path)


GOOD = [
    {"id": "a", "image": "sub/ok.png", "conversations": [Q, A]},
    {"id": 7, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye"}]},
    {"image": "sub/ok.png", "conversations": [{"from": "human", "value": "Look <image>"}, A]},  # no id
]


def test_good_rows_load(folder):
    examples, skipped = load_dataset(write(folder, GOOD), str(folder / "images"), progress=False)
    assert skipped == []
    assert [e.row for e in examples] == [0, 1, 2] and [e.id for e in examples] == ["a", "7", ""]
    assert examples[0].image == str(folder / "images" / "sub" / "ok.png") and examples[1].image is None
    assert examples[1].conversations[3] == {"from": "gpt", "value": "Bye"}
    assert isinstance(examples[0], Example) and isinstance(examples[0].conversations, tuple)
    # text-only data needs no image folder
    examples, _ = load_dataset(write(folder, GOOD[1:2]), None, progress=False)
    assert examples[0].image is None


BAD_ROWS = [  # (row, what the message must say)
    ({"id": "m", "image": "sub/missing.png", "conversations": [Q, A]}, "image file not found.*missing.png"),
    ({"id": "b", "image": "broken.png", "conversations": [Q, A]}, "broken.png is not a readable image"),
    ({"id": "c", "image": "corrupt.png", "conversations": [Q, A]}, "corrupt.png is not a readable image"),
    ({"id": "t", "image": "notes.txt", "conversations": [Q, A]}, "notes.txt is not a readable image"),
    ({"id": "d", "image": "sub", "conversations": [Q, A]}, "image file not found"),
    (["not", "a", "dict"], "not an object but a JSON list"),
    ({"id": "n"}, "'conversations' must be a non-empty list"),
    ({"id": "s", "conversations": "hello"}, "'conversations' must be a non-empty list"),
    ({"id": "e", "conversations": []}, "'conversations' must be a non-empty list"),
    ({"id": "x", "conversations": [Q, "gpt: red"]}, "turn 1 is not an object"),
    ({"id": "u", "conversations": [Q, {"from": "assistant", "value": "red"}]}, "turn 1 has 'from': 'assistant'"),
    ({"id": "v", "conversations": [Q, {"from": "gpt", "value": 3}]}, "turn 1 has no text"),
    ({"id": "g", "conversations": [A, Q]}, "turn 0 is from 'gpt'.*alternate"),
    ({"id": "h", "conversations": [Q, Q, A]}, "turn 1 is from 'human'.*alternate"),
    ({"id": "q", "conversations": [Q]}, "no 'gpt' answer"),
    ({"id": "i", "image": ["sub/ok.png"], "conversations": [Q, A]}, "'image' must be a relative file path"),
    ({"id": "j", "image": None, "conversations": [Q, A]}, "'image' must be a relative file path"),
    ({"id": "k", "image": "sub/ok.png", "conversations": [{"from": "human", "value": "no marker"}, A]},
     "needs <image> in exactly one message, found it in 0"),
    ({"id": "l", "image": "sub/ok.png", "conversations": [Q, A, Q, A]}, "found it in 2"),
    ({"id": ["z"], "conversations": [Q, A]}, "'id' must be a string or an integer"),
]


@pytest.mark.parametrize("bad,message", BAD_ROWS, ids=[m.split()[0] + str(i) for i, (_, m) in enumerate(BAD_ROWS)])
def test_each_bad_row_is_named_and_skippable(folder, bad, message):
    path = write(folder, [GOOD[0], bad, GOOD[1]])
    with pytest.raises(DataError, match=message) as info:
        load_dataset(path, str(folder / "images"), progress=False)
    text = str(info.value)
    assert text.startswith(f"{path}: row 1") and "\n" not in text
    if isinstance(bad, dict) and isinstance(bad.get("id"), str):
        assert f"(id {bad['id']!r})" in text
    assert isinstance(info.value, InputError)  # the CLI prints it as one line, exit 2
    examples, skipped = load_dataset(path, str(folder / "images"), skip_bad=True, progress=False)
    assert [e.row for e in examples] == [0, 2]
    assert len(skipped) == 1 and skipped[0].startswith(f"{path}: row 1") and "--skip-bad" not in skipped[0]


def test_image_rows_need_an_image_folder(folder):
    with pytest.raises(DataError, match="row 0 \\(id 'a'\\): the row has an image but no image folder"):
        load_dataset(write(folder, GOOD[:1]), None, progress=False)
    with pytest.raises(DataError, match="image folder not found"):
        load_dataset(write(folder, GOOD[:1]), str(folder / "nope"), progress=False)


@pytest.mark.parametrize("content,message", [
    ("[]", "the dataset is empty"),
    ("{\"id\": 1}", "expected a JSON array, got a JSON object"),
    ("[{\"id\": 1,", "not a valid LLaVA-format JSON file: .* at line 1"),
    (b"\xff\xfe[]", "not UTF-8"),
])
def test_bad_files(folder, content, message):
    path = folder / "data.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message) as info:
        load_dataset(str(path), None, progress=False)
    assert str(path) in str(info.value)


def test_missing_file_and_all_rows_bad(folder):
    with pytest.raises(DataError, match="training data file not found"):
        load_dataset(str(folder / "none.json"), None, progress=False)
    path = write(folder, [{"id": "1"}, 5])
    with pytest.raises(DataError, match="none of its 2 rows is usable.*row 0"):
        load_dataset(path, None, skip_bad=True, progress=False)
