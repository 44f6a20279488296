"""Input ids and labels of one conversation, exactly as the original training code builds them.

The reference is `llava/train/train.py` of llava-torch 1.2.2 (the LLaVA-1.5 training code):
`preprocess_multimodal` moves `<image>` to the front of its message (with `mm_use_im_start_end=False`, the
setting of every released model), then `preprocess` picks by template:

    plain, v0_plain                                   preprocess_plain      (stage 1, "pretrain")
    vicuna_v1, v1, llava_v1, v1_mmtag                 preprocess_v1         (version starts with "v1")
    llama_2, llava_llama_2, mistral_instruct          preprocess_llama_2    (separator style LLAMA_2)
    chatml_direct, mistral_direct, mpt                preprocess_mpt        (version "mpt")
    llava_v0, v0_mmtag                                the generic fallback  ("### Human: ...\n" signals)

Every label is `IGNORE_INDEX` except the assistant answers (with their closing separator), as the original
masks them, including its quirks: a rendered prompt whose rounds do not re-tokenize to its own length
("tokenization mismatch") has every label ignored, as the original does (with a warning). Note that
preprocess_mpt (chatml_direct, mistral_direct, mpt) never counts the `<|im_end|>` that closes the last answer,
so the original finds that mismatch on every conversation and trains on nothing; reproduced as it is (a
corrected ChatML recipe would be a new recipe, not the original's). Rows with an image
are tokenized with `tokenizer_image_token` (one `ORIGINAL_IMAGE_TOKEN_INDEX` per `<image>`), rows without one
with the tokenizer (truncated to `max_length` there); both are then cut to `max_length` as the original's
collator does. The original's `tokenizers >= 0.14` test is always true here (the project requires 0.20).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from ..config import ORIGINAL_IMAGE_TOKEN_INDEX
from ..errors import InputError
from ..prompt import IMAGE_MARKER, TEMPLATES, InstTemplate, RoleTemplate, tokenizer_image_token

IGNORE_INDEX = -100  # llava.constants.IGNORE_INDEX: the label of tokens that are not trained on

# The original's `preprocess` dispatch, for the project's template names (llava_jax.prompt.TEMPLATES).
PREPROCESS = {
    "plain": "plain", "v0_plain": "plain",
    "vicuna_v1": "v1", "v1": "v1", "llava_v1": "v1", "v1_mmtag": "v1",
    "llama_2": "llama_2", "llava_llama_2": "llama_2", "mistral_instruct": "llama_2",
    "chatml_direct": "mpt", "mistral_direct": "mpt", "mpt": "mpt",
    "llava_v0": "signals", "v0_mmtag": "signals",
}
ROLES = {"human": 0, "gpt": 1}


class LabelError(InputError):
    """A conversation the original training code cannot turn into labels with the chosen template."""


def stage_template(stage: str, model_template: str) -> str:
    """The template a training stage uses: "pretrain" -> "plain" (the original's stage-1 recipe), "finetune"
    -> the model's own template."""
    if stage == "pretrain":
        return "plain"
    if stage == "finetune":
        return model_template
    raise InputError(f"stage {stage!r} is not a training stage (pretrain, finetune)")


def preprocess_style(template: str) -> str:
    """Which of the original's preprocess functions a template goes through; LabelError if none."""
    if template not in TEMPLATES:
        raise LabelError(f"unknown template {template!r}; known: {', '.join(sorted(TEMPLATES))}")
    if template not in PREPROCESS:
        raise LabelError(f"template {template!r} has no training recipe (known: {', '.join(sorted(PREPROCESS))})")
    return PREPROCESS[template]


def move_image_to_front(conversations: Sequence[dict], template: str) -> list[dict]:
    """`preprocess_multimodal` (mm_use_im_start_end=False): a message holding `<image>` becomes
    "<image>\\n" + the rest of its text, stripped; mmtag templates wrap it in `<Image>...</Image>`."""
    out = []
    for sentence in conversations:
        value = sentence["value"]
        if IMAGE_MARKER in value:
            value = (IMAGE_MARKER + "\n" + value.replace(IMAGE_MARKER, "").strip()).strip()
            if "mmtag" in template:
                value = value.replace(IMAGE_MARKER, "<Image>" + IMAGE_MARKER + "</Image>")
        out.append({**sentence, "value": value})
    return out


def _check_turns(conversations: Sequence[dict]) -> list[str]:
    """The messages, checked to alternate human/gpt from human (the original asserts it)."""
    texts = []
    for i, sentence in enumerate(conversations):
        if ROLES.get(sentence.get("from")) != i % 2:
            raise LabelError(f"turn {i} is from {sentence.get('from')!r}: turns must alternate human/gpt, "
                             "starting with human")
        texts.append(sentence["value"])
    if not texts:
        raise LabelError("a conversation needs at least one turn")
    return texts


class _Tokens:
    """The two ways the original tokenizes: `tokenizer_image_token` for rows with an image, `tokenizer(...)`
    without."""

    def __init__(self, tokenizer, has_image: bool, max_length: int):
        self.tokenizer, self.has_image, self.max_length = tokenizer, has_image, max_length

    def ids(self, text: str, truncate: bool = False) -> list[int]:
        if self.has_image:
            return tokenizer_image_token(text, self.tokenizer, ORIGINAL_IMAGE_TOKEN_INDEX)
        kwargs = dict(max_length=self.max_length, truncation=True) if truncate else {}
        return list(self.tokenizer(text, **kwargs)["input_ids"])

    def count(self, text: str) -> int:
        return len(self.ids(text))


def _pad_id(tokenizer) -> int | None:
    # train.py sets `tokenizer.pad_token = tokenizer.unk_token` for every template it trains here
    unk = getattr(tokenizer, "unk_token_id", None)
    return unk if unk is not None else getattr(tokenizer, "pad_token_id", None)


def _plain(conversations, tokenizer, max_length):
    """preprocess_plain: "<image>" + answer + "\\n"; the image (and BOS) are not trained on."""
    if len(conversations) != 2 or IMAGE_MARKER not in conversations[0]["value"]:
        raise LabelError("the plain template (stage pretrain) takes exactly two turns, the first with <image> "
                         f"(an image caption pair); this conversation has {len(conversations)} turn(s)"
                         + ("" if len(conversations) != 2 else " and no <image> in the first"))
    tokens = _Tokens(tokenizer, True, max_length)
    ids = np.asarray(tokens.ids(IMAGE_MARKER + conversations[1]["value"] + TEMPLATES["plain"].seps[0]), np.int64)
    labels = ids.copy()
    labels[:tokens.count(IMAGE_MARKER)] = IGNORE_INDEX
    return ids, labels


def _rounds(style: str, template, prompt: str) -> tuple[list[str], str]:
    """The prompt cut into rounds (user turn + answer) and the separator that ends each round's instruction."""
    if style == "mpt":
        sep = template.seps[0]  # "<|im_end|>"
        parts = prompt.split(sep)
        rounds = [sep.join(parts[:3])]  # system + user + answer
        rounds += [sep.join(parts[i:i + 2]) for i in range(3, len(parts), 2)]
        return rounds, sep + template.roles[1]
    if style == "llama_2":
        return prompt.split(template.sep2), "[/INST] "
    return prompt.split(template.seps[1]), template.seps[0] + template.roles[1] + template.role_sep


def _templated(conversations, tokenizer, template_name, style, has_image, max_length):
    """preprocess_v1 / preprocess_llama_2 / preprocess_mpt: the prompt as the template renders it; the
    instruction part of every round masked by re-tokenizing the round and its instruction alone."""
    template = TEMPLATES[template_name]
    assert isinstance(template, InstTemplate if style == "llama_2" else RoleTemplate)
    texts = _check_turns(conversations)
    prompt = template.render(texts)
    tokens = _Tokens(tokenizer, has_image, max_length)
    ids = np.asarray(tokens.ids(prompt, truncate=True), np.int64)
    labels = ids.copy()  # numpy slices as the original's torch slices (a negative end counts from the back)
    pad = _pad_id(tokenizer)
    total_len = int((ids != pad).sum()) if pad is not None else len(ids)
    rounds, sep = _rounds(style, template, prompt)
    # what the original subtracts from an instruction's count (its BOS and the separator's last piece) and
    # where the first round starts (after BOS, except for mpt)
    strip, cur_len = (1, 0) if style == "mpt" else (2, 1)
    labels[:cur_len] = IGNORE_INDEX
    legacy = getattr(tokenizer, "legacy", None)
    for i, rou in enumerate(rounds):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        round_len = tokens.count(rou)
        instruction_len = tokens.count(parts[0] + sep) - strip
        if i != 0 and style == "v1" and not legacy:
            round_len -= 1
            instruction_len -= 1
        if i != 0 and style == "mpt" and legacy:
            round_len += 1
            instruction_len += 1
        labels[cur_len:cur_len + instruction_len] = IGNORE_INDEX
        cur_len += round_len
    labels[cur_len:] = IGNORE_INDEX
    if cur_len < max_length and cur_len != total_len:
        warnings.warn(f"tokenization mismatch: {cur_len} vs. {total_len} tokens; as the original does, nothing "
                      "of this conversation is trained on", stacklevel=3)
        labels[:] = IGNORE_INDEX
    return ids, labels


def _signals(conversations, tokenizer, template_name, has_image, max_length):
    """The original `preprocess`'s fallback (`_add_speaker_and_signal`, `_mask_targets`): the system text,
    then "### ROLE: message\n" per turn and a final "### "; each human turn masked from its third token on
    (every count includes the tokenizer's BOS, as the original's does)."""
    template = TEMPLATES[template_name]
    header = template.system + "\n\n"
    texts = ["### " + template.roles[ROLES[t["from"]]] + ": " + t["value"] + "\n" for t in conversations]
    tokens = _Tokens(tokenizer, has_image, max_length)
    ids = np.asarray(tokens.ids(header + "".join(texts) + "### ", truncate=True), np.int64)
    labels = ids.copy()
    if has_image:
        lengths = [tokens.count(text) for text in [header, *texts]]
    else:  # _tokenize_fn: truncated, and counted without pad tokens
        pad = _pad_id(tokenizer)
        lengths = [sum(t != pad for t in tokens.ids(text, truncate=True)) for text in [header, *texts]]
    cur = lengths[0]
    labels[:cur] = IGNORE_INDEX
    for length, turn in zip(lengths[1:], conversations, strict=True):
        if turn["from"] == "human":
            labels[cur + 2:cur + length] = IGNORE_INDEX
        cur += length
    return ids, labels


def build_example(conversations, tokenizer, template: str, has_image: bool,
                  max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels), int32 rows of equal length, as the original training code makes them for one
    LLaVA-format conversation ([{"from": "human"|"gpt", "value": ...}, ...]).

    tokenizer: the model's (`model.tokenizer`: HF-compatible, `tokenizer(text)["input_ids"]`). template: a
    name of `llava_jax.prompt.TEMPLATES` with a training recipe (`PREPROCESS`; see `stage_template`).
    has_image: the row has an image (its `<image>` then goes to the front of its message and becomes one
    `ORIGINAL_IMAGE_TOKEN_INDEX`; without an image the text is tokenized as it is). max_length: the
    original's `model_max_length`; both rows are cut to it. Image tokens are expanded later, by the caller.
    LabelError (an InputError) for a template without a recipe or turns that do not fit it.
    """
    style = preprocess_style(template)
    if max_length < 1:
        raise InputError(f"max_length must be >= 1, got {max_length}")
    conversations = [dict(c) for c in conversations]
    _check_turns(conversations)
    if has_image:  # the original's dataset runs preprocess_multimodal on image rows only
        conversations = move_image_to_front(conversations, template)
    if style == "plain":
        ids, labels = _plain(conversations, tokenizer, max_length)
    elif style == "signals":
        ids, labels = _signals(conversations, tokenizer, template, has_image, max_length)
    else:
        ids, labels = _templated(conversations, tokenizer, template, style, has_image, max_length)
    # DataCollatorForSupervisedDataset: input_ids[:, :model_max_length], labels likewise
    return ids[:max_length].astype(np.int32), labels[:max_length].astype(np.int32)

