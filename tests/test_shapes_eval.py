"""The synthetic shapes dataset and the accuracy metric of `llava-jax eval`."""

import json
import os

import pytest
from files import file_tree

from llava_jax.train.data import load_dataset
from llava_jax.train.evaluate import evaluate, normalize_answer
from llava_jax.train.shapes import COLORS, SHAPES, make_shapes_dataset


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(str(tmp_path_factory.mktemp("shapes") / "ds"), train=12, test=4, seed=3,
                               progress=False)


def test_dataset_is_deterministic_from_the_seed(shapes, tmp_path):
    again = make_shapes_dataset(str(tmp_path / "again"), train=12, test=4, seed=3, progress=False)
    other = make_shapes_dataset(str(tmp_path / "other"), train=12, test=4, seed=4, progress=False)
    first = file_tree(shapes["image_folder"])
    assert len(first) == 12 + 4 + 3
    assert file_tree(again["image_folder"]) == first
    different = file_tree(other["image_folder"])
    assert different.keys() == first.keys() and different != first
    with pytest.raises(FileExistsError, match="--force"):
        make_shapes_dataset(str(tmp_path / "again"), train=2, test=1, seed=3, progress=False)


def test_dataset_loads_and_answers_are_one_word(shapes):
    folder = shapes["image_folder"]
    pretrain, skipped = load_dataset(shapes["pretrain"], folder, progress=False)
    finetune, _ = load_dataset(shapes["finetune"], folder, progress=False)
    test, _ = load_dataset(shapes["test"], folder, progress=False)
    assert skipped == [] and (len(pretrain), len(finetune), len(test)) == (12, 12, 4)
    assert {e.image for e in pretrain} == {e.image for e in finetune}
    assert not {e.image for e in test} & {e.image for e in pretrain}  # held out
    for example in pretrain:
        color, shape = example.conversations[1]["value"].split()[1:]
        assert color in COLORS and shape in SHAPES and example.conversations[0]["value"] == "<image>"
    answers = [t["value"] for e in finetune + test for t in e.conversations if t["from"] == "gpt"]
    assert set(answers) <= set(COLORS) | set(SHAPES)
    assert max(len(e.conversations) for e in finetune) == 4  # some conversations are multi-turn
    # the caption names what is drawn: the shape's colour is the most common non-white colour of the picture
    from PIL import Image

    for example in pretrain[:4]:
        color = example.conversations[1]["value"].split()[1]
        pixels = Image.open(example.image).getcolors(64 * 64)
        drawn = max((c for c in pixels if c[1] != (255, 255, 255)), key=lambda c: c[0])[1]
        assert drawn == COLORS[color]


def test_normalize_answer():
    assert normalize_answer("  Red.\n It is a circle") == "red"
    assert normalize_answer("CIRCLE!") == "circle"
    assert normalize_answer("dark  red") == "dark red" != normalize_answer("red")
    assert normalize_answer("\n\nblue") == "blue"


class StubModel:
    """A model whose `generate` answers from a table (question text per example image)."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def generate(self, prompts, images=None, **kwargs):
        self.calls.append((list(prompts), images, kwargs))
        return [self.answers[imgs[0]] for imgs in images]


def test_accuracy_is_one_when_right_and_zero_when_wrong(shapes):
    test, _ = load_dataset(shapes["test"], shapes["image_folder"], progress=False)
    truth = {e.image: e.conversations[1]["value"] for e in test}
    right = StubModel({k: v.upper() + ".\nextra text" for k, v in truth.items()})
    result = evaluate(right, test, template="llava_v1", batch_size=3, progress=False)
    assert (result["accuracy"], result["n"], result["correct"]) == (1.0, 4, 4)
    assert [len(c[0]) for c in right.calls] == [3, 1]  # batched
    prompts, images, kwargs = right.calls[0]
    assert prompts[0].startswith("<image>\nWhat") and images[0] == [test[0].image]
    assert kwargs["temperature"] == 0.0 and kwargs["template"] == "llava_v1"
    wrong = StubModel({k: ("square" if v != "square" else "circle") for k, v in truth.items()})
    assert evaluate(wrong, test, progress=False)["accuracy"] == 0.0
    half = StubModel({k: (v if i % 2 else "nope") for i, (k, v) in enumerate(truth.items())})
    result = evaluate(half, test, progress=False)
    assert (result["accuracy"], result["correct"]) == (0.5, 2)
    assert [p["correct"] for p in result["predictions"]] == [False, True, False, True]


def test_eval_command_on_the_tiny_model(shapes, tiny_model_dir, capsys):
    from llava_jax.cli import main

    code = main(["eval", "--model", str(tiny_model_dir), "--data", shapes["test"], "--image-folder",
                 shapes["image_folder"], "--json", "--max-new-tokens", "1", "--batch-size", "4", "--quiet"])  # one compile
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 4 and 0 <= result["accuracy"] <= 1 and result["accuracy"] == result["correct"] / 4


def test_make_dataset_command(tmp_path, capsys):
    from llava_jax.cli import main

    assert main(["make-dataset", "shapes", str(tmp_path / "d"), "--train", "2", "--test", "1", "--quiet"]) == 0
    assert "stage 1: --data" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "d")) == ["finetune.json", "images", "pretrain.json", "test.json"]
    with pytest.raises(SystemExit) as exit_info:
        main(["make-dataset", "shapes", str(tmp_path / "e"), "--train", "0"])
    assert exit_info.value.code == 2 and "--train: '0' must be >= 1" in capsys.readouterr().err
