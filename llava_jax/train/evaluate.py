"""Question-answering accuracy: each example's first question answered greedily, compared with its first answer.

Answers and references are normalized before the exact-match comparison (`normalize_answer`): cut at the first
newline, lower-cased, runs of whitespace made one space, punctuation and whitespace stripped from both ends.
So "Red." and "red\\nIt is a circle" match "red"; "dark red" does not.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

from ..errors import InputError
from .data import Example
from .labels import move_image_to_front

_STRIP = string.punctuation + string.whitespace


def normalize_answer(text: str) -> str:
    """The text compared for exact match (see the module docstring)."""
    first_line = text.strip().split("\n", 1)[0]
    return " ".join(first_line.lower().split()).strip(_STRIP)


def question_and_reference(example: Example, template: str = "") -> tuple[str, str]:
    """The first human turn (its `<image>` moved to the front, as in training) and the first gpt answer."""
    turns = example.conversations
    if len(turns) < 2:
        raise InputError(f"row {example.row} (id {example.id!r}) has no answer to compare with")
    first = move_image_to_front(turns[:1], template) if example.image is not None else turns[:1]
    return first[0]["value"], turns[1]["value"]


def evaluate(model, examples: Sequence[Example], *, template: str | None = None, max_new_tokens: int = 16,
             batch_size: int = 8, progress: bool = True) -> dict:
    """Greedy answers of `model` (`model.generate`, `batch_size` questions a call) to the first question of
    each example, scored by exact match after `normalize_answer`.

    template: the conversation template (default: the model's). Returns {"accuracy": correct / n, "n",
    "correct", "predictions": [{"id", "question", "answer", "reference", "correct"}, ...]}.
    """
    from tqdm import tqdm

    if not examples:
        raise InputError("no examples to evaluate")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    pairs = [question_and_reference(e, template or "") for e in examples]
    predictions = []
    with tqdm(total=len(examples), desc="eval", unit="question", disable=not progress or None) as bar:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            questions = [q for q, _ in pairs[start:start + batch_size]]
            images = [[e.image] if e.image is not None else [] for e in chunk]
            answers = model.generate(questions, images=images, max_new_tokens=max_new_tokens, temperature=0.0,
                                     template=template)
            for example, (question, reference), answer in zip(chunk, pairs[start:start + batch_size], answers,
                                                              strict=True):
                right = normalize_answer(answer) == normalize_answer(reference)
                predictions.append({"id": example.id, "question": question, "answer": answer,
                                    "reference": reference, "correct": right})
            bar.update(len(chunk))
    correct = sum(p["correct"] for p in predictions)
    return {"accuracy": correct / len(predictions), "n": len(predictions), "correct": correct,
            "predictions": predictions}
