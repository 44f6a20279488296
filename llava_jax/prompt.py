"""Conversation templates and prompt tokenization, as the original LLaVA code does them.

The reference is the LLaVA authors' code (PyPI ``llava-torch`` 1.2.2): ``llava/conversation.py``
(``Conversation.get_prompt``, ``conv_templates``), ``llava/mm_utils.py`` (``tokenizer_image_token``) and the
template choice in ``llava/eval/run_llava.py``. Rendered prompts are string-equal to ``get_prompt()`` and
the token ids equal ``tokenizer_image_token`` run with the original (slow, SentencePiece) tokenizer;
``tests/test_prompt.py`` checks both against llava-torch.

Images follow the original layout: the prompt holds one ``<image>`` marker per image, ``tokenizer_image_token``
turns each marker into one placeholder id, and ``expand_image_tokens`` widens each placeholder to the number
of features the vision side produces for that image. (HF processors instead repeat ``<image>`` in the text
and tokenize it as an added token.)
"""

from __future__ import annotations

import importlib.resources
import json
import operator
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

IMAGE_MARKER = "<image>"
# run_llava.py lets a query say where the image goes with this string; it becomes IMAGE_MARKER.
IMAGE_PLACEHOLDER = "<image-placeholder>"


class PromptError(InputError):
    """A prompt, conversation or image count that cannot be rendered or tokenized."""


class TokenizerNotFoundError(PromptError, FileNotFoundError):
    """No tokenizer files in a checkpoint directory."""


# --------------------------------------------------------------------------------------------------------
# Templates


@dataclass(frozen=True)
class RoleTemplate:
    """Separator styles SINGLE, TWO, MPT and PLAIN of the original ``Conversation``.

    Renders ``system_prefix + system [+ seps[0]]`` and then, for the message at position ``i``,
    ``roles[i % 2] + role_sep + message + seps[i % 2]``. An empty or ``None`` message is the open turn the
    model completes: ``roles[i % 2] + role_sep.rstrip()`` (``"ASSISTANT:"``, ``"<|im_start|>assistant\\n"``).
    """

    system: str
    roles: tuple[str, str]
    # Closing separators of user / assistant messages. None: the original cannot close that message
    # (PLAIN has no sep2 and fails with a TypeError on any assistant reply).
    seps: tuple[str, str | None]
    role_sep: str = ": "
    # ChatML's header is part of the original system string; keeping it apart lets `system=` replace the text.
    system_prefix: str = ""
    sep_after_system: bool = True  # PLAIN writes the system string with no separator

    def render(self, messages: Sequence[str | None], system: str | None = None) -> str:
        """The prompt for ``messages`` (user first, alternating), as ``get_prompt()`` renders it."""
        out = [self.system_prefix + (self.system if system is None else system)]
        if self.sep_after_system:
            out.append(self.seps[0])
        for i, message in enumerate(messages):
            role = self.roles[i % 2]
            if not message:  # the original tests truthiness, so "" is an open turn too
                out.append(role + self.role_sep.rstrip())
                continue
            sep = self.seps[i % 2]
            if sep is None:
                raise PromptError(
                    "this template has no separator to close an assistant message (single-turn only)"
                )
            out.append(role + self.role_sep + message + sep)
        return "".join(out)


@dataclass(frozen=True)
class InstTemplate:
    """Separator style LLAMA_2: ``[INST] user [/INST] answer`` turns, the system prompt in ``<<SYS>>``.

    ``sep`` goes before every ``[INST]`` except the first, ``sep2`` after every answer; the open assistant
    turn adds nothing, so the prompt ends with ``[/INST]``.
    """

    system: str
    sep: str = "<s>"
    sep2: str = "</s>"

    def render(self, messages: Sequence[str | None], system: str | None = None) -> str:
        """The prompt for ``messages`` (user first, alternating), as ``get_prompt()`` renders it."""
        system = self.system if system is None else system
        out = []
        for i, message in enumerate(messages):
            if not message:
                if i == 0:
                    raise PromptError(
                        "the first message of a [INST] template must be a non-empty user message"
                    )
                continue  # the original appends "" for an empty or open turn
            if i == 0 and system:
                message = f"<<SYS>>\n{system}\n<</SYS>>\n\n{message}"
            out.append(f"{self.sep}[INST] {message} [/INST]" if i % 2 == 0 else f" {message} {self.sep2}")
        # The original's `ret.lstrip(sep)` strips a character set; the text after the first sep is always
        # "[INST]" and "[" is in no sep, so it removes exactly that one sep.
        return "".join(out).removeprefix(self.sep)


Template = RoleTemplate | InstTemplate

_CURIOUS_USER = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_CURIOUS_HUMAN = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_MMTAG = (  # sic: no space after "language."
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant is able to understand the visual content that the user provides, and assist the user "
    "with a variety of tasks using natural language."
    "The visual content will be provided with the following format: <Image>visual content</Image>."
)
_LLAMA_2 = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or "
    "illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)
_LLAVA_LLAMA_2 = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)


def _two(system: str) -> RoleTemplate:  # SeparatorStyle.TWO: Vicuna v1 style
    return RoleTemplate(system, ("USER", "ASSISTANT"), (" ", "</s>"))


def _single(system: str) -> RoleTemplate:  # SeparatorStyle.SINGLE: "###" after every message
    return RoleTemplate(system, ("Human", "Assistant"), ("###", "###"))


def _chatml(system: str) -> RoleTemplate:  # SeparatorStyle.MPT
    return RoleTemplate(
        system,
        ("<|im_start|>user\n", "<|im_start|>assistant\n"),
        ("<|im_end|>", "<|im_end|>"),
        role_sep="",
        system_prefix="<|im_start|>system\n",
    )


_vicuna_v1 = _two(_CURIOUS_USER)
_chatml_direct = _chatml("Answer the questions.")
_plain = RoleTemplate("", ("", ""), ("\n", None), role_sep="", sep_after_system=False)

# The keys of llava-torch 1.2.2 `conv_templates`, aliases included, except "default" and "v0"
# (FastChat's Vicuna v0 with a canned example conversation; no LLaVA model uses it).
TEMPLATES: dict[str, Template] = {
    "vicuna_v1": _vicuna_v1,
    "v1": _vicuna_v1,
    "llava_v1": _two(_CURIOUS_HUMAN),
    "v1_mmtag": _two(_MMTAG),
    "llava_v0": _single(_CURIOUS_HUMAN),
    "v0_mmtag": _single(_MMTAG),
    "llama_2": InstTemplate(_LLAMA_2),
    "llava_llama_2": InstTemplate(_LLAVA_LLAMA_2),
    "mistral_instruct": InstTemplate("", sep=""),
    "chatml_direct": _chatml_direct,
    "mistral_direct": _chatml_direct,  # sic: an alias of chatml_direct in the original
    "mpt": _chatml(
        "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers."
    ),
    "plain": _plain,
    "v0_plain": _plain,
}


def _messages(turns: Sequence[str | tuple[str, str]]) -> list[str]:
    """Turns as alternating user/assistant texts, checked to start and end with a user message."""
    if not turns:
        raise PromptError("a conversation needs at least one user message")
    texts = []
    for i, turn in enumerate(turns):
        expected = ("user", "assistant")[i % 2]
        if isinstance(turn, str):
            texts.append(turn)
            continue
        role, text = turn
        if role != expected:
            raise PromptError(f"turn {i} has role {role!r}; turns must alternate user/assistant from 'user'")
        texts.append(text)
    if len(texts) % 2 == 0:
        raise PromptError(
            "the last turn must be a user message; the assistant turn is left open for generation"
        )
    return texts


def render_prompt(
    template: str | Template, turns: Sequence[str | tuple[str, str]], system: str | None = None
) -> str:
    """Render a conversation that ends with an open assistant turn, ready for generation.

    ``template`` is a key of ``TEMPLATES`` (or a template object). ``turns`` is a list of alternating
    user/assistant strings, or of ``(role, text)`` pairs with roles ``"user"``/``"assistant"``; it starts and
    ends with a user message. ``system`` replaces the template's system text (for ChatML templates only the
    text after ``<|im_start|>system\\n``). The result equals the original's ``conv.append_message(...)`` for
    each turn, then ``append_message(roles[1], None)`` and ``get_prompt()``. Image markers are not added
    here; see ``with_image_markers``.
    """
    if isinstance(template, str):
        if template not in TEMPLATES:
            raise PromptError(f"unknown template {template!r}; known: {', '.join(sorted(TEMPLATES))}")
        template = TEMPLATES[template]
    return template.render([*_messages(turns), None], system)


def with_image_markers(text: str, n_images: int) -> str:
    """Put ``n_images`` ``<image>`` markers into a user message, as the original CLI does.

    Text that already has ``<image>`` markers is returned unchanged; ``<image-placeholder>`` strings are
    replaced by ``<image>`` (run_llava.py). Otherwise one ``"<image>\\n"`` per image goes in front, the
    original's ``DEFAULT_IMAGE_TOKEN + '\\n' + inp`` (the original only ever prepends one; with several
    images this prepends one per image).
    """
    if n_images < 0:
        raise PromptError(f"n_images must be >= 0, got {n_images}")
    text = text.replace(IMAGE_PLACEHOLDER, IMAGE_MARKER)
    if IMAGE_MARKER in text:
        return text
    return (IMAGE_MARKER + "\n") * n_images + text


# --------------------------------------------------------------------------------------------------------
# Template choice

# run_llava.py / serve/cli.py: the first substring of the lower-cased model name that matches wins.
_NAME_RULES = (
    ("llama-2", "llava_llama_2"),
    ("mistral", "mistral_instruct"),
    ("v1.6-34b", "chatml_direct"),
    ("v1", "llava_v1"),
    ("mpt", "mpt"),
)
_YI_VOCAB_SIZES = (64000, 64064)  # Nous-Hermes-2-Yi-34B: original / HF padded


def _model_name(path: str) -> str:
    """``llava.mm_utils.get_model_name_from_path``: the last path component, or ``parent_checkpoint-N``."""
    parts = path.strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return parts[-2] + "_" + parts[-1]
    return parts[-1]


def _template_from_name(path: str) -> str | None:
    name = _model_name(path).lower()
    return next((template for key, template in _NAME_RULES if key in name), None)


def _field(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)


def default_template(config_or_name: Any) -> str:
    """The template name the original code picks for a model.

    A string (model name, hub id or checkpoint path) is matched exactly like ``run_llava.py`` does: on the
    last path component, ``llama-2`` -> llava_llama_2, ``mistral`` -> mistral_instruct, ``v1.6-34b`` ->
    chatml_direct, ``v1`` -> llava_v1, ``mpt`` -> mpt, and otherwise llava_v0 (so ``llava-hf/llava-1.5-7b-hf``,
    which has no ``v1``, gets llava_v0 there too).

    A config (a ``config.json`` dict or a config object) is matched by its ``_name_or_path`` when that
    matches a rule; otherwise by its text model: ``model_type`` containing ``mistral`` -> mistral_instruct,
    ``vocab_size`` 64000/64064 (Yi-34B) -> chatml_direct, anything else -> llava_v1 (Vicuna, the
    LLaVA-1.5/1.6 default). The text model is ``text_config`` (HF), ``text`` (``llava_jax.config.LlavaConfig``)
    or the config itself (original ``config.json``).
    """
    if isinstance(config_or_name, str | os.PathLike):
        return _template_from_name(os.fspath(config_or_name)) or "llava_v0"
    config = config_or_name
    name = _field(config, "_name_or_path") or _field(config, "name_or_path")
    if name and (template := _template_from_name(str(name))):
        return template
    text = _field(config, "text_config") or _field(config, "text") or config
    if "mistral" in str(_field(text, "model_type") or "").lower():
        return "mistral_instruct"
    if _field(text, "vocab_size") in _YI_VOCAB_SIZES:
        return "chatml_direct"
    return "llava_v1"


# --------------------------------------------------------------------------------------------------------
# Tokenization


def _input_ids(encoding: Any) -> list[int]:
    # HF returns a BatchEncoding (a mapping that also has attributes); the original reads `.input_ids`.
    return list(encoding["input_ids"] if isinstance(encoding, Mapping) else encoding.input_ids)


def tokenizer_image_token(prompt: str, tokenizer: Any, image_token_id: int) -> list[int]:
    """Token ids of ``prompt`` with one ``image_token_id`` where each ``<image>`` marker was.

    As ``llava.mm_utils.tokenizer_image_token``: the text between markers is tokenized chunk by chunk
    (so each chunk starts afresh, e.g. with SentencePiece's lone ``"▁"`` before ``"\\n"``), and the BOS
    the tokenizer adds to every chunk is kept once, at the start, if it adds one at all. The original
    passes ``IMAGE_TOKEN_INDEX = -200``; pass the id your caller expects.
    """
    chunks = [_input_ids(tokenizer(chunk)) for chunk in prompt.split(IMAGE_MARKER)]
    bos = getattr(tokenizer, "bos_token_id", None)
    keep_bos = bos is not None and chunks[0][:1] == [bos]
    ids = [bos] if keep_bos else []
    for k, chunk in enumerate(chunks):
        if k:
            ids.append(image_token_id)
        # The original drops the first id of every chunk once the first starts with BOS; tokenizers add
        # BOS to every call, so dropping it only where it is BOS gives the same ids.
        ids.extend(chunk[1:] if keep_bos and chunk[:1] == [bos] else chunk)
    return ids


def expand_image_tokens(
    ids: Sequence[int], counts: Sequence[int], image_token_id: int, *, placeholder_id: int | None = None
) -> list[int]:
    """Replace the k-th image placeholder in ``ids`` by ``counts[k]`` copies of ``image_token_id``.

    The placeholder is ``image_token_id`` unless ``placeholder_id`` says otherwise (e.g. the original's
    -200). ``counts[k]`` is the number of feature vectors image k contributes. Raises ``PromptError`` when
    the number of placeholders and of counts differ, or a count is not a positive integer.
    """
    placeholder = image_token_id if placeholder_id is None else placeholder_id
    ids = [operator.index(t) for t in ids]
    counts = [operator.index(c) for c in counts]
    positions = [i for i, t in enumerate(ids) if t == placeholder]
    if len(positions) != len(counts):
        raise PromptError(
            f"the prompt has {len(positions)} {IMAGE_MARKER} marker(s) (id {placeholder}) "
            f"but {len(counts)} image(s) were given"
        )
    if any(c < 1 for c in counts):
        raise PromptError(f"image token counts must be positive, got {counts}")
    out: list[int] = []
    start = 0
    for pos, count in zip(positions, counts, strict=True):
        out += ids[start:pos]
        out += [image_token_id] * count
        start = pos + 1
    return out + ids[start:]


# --------------------------------------------------------------------------------------------------------
# Tokenizer files

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def load_tokenizer(path: str | os.PathLike) -> Any:
    """Load the tokenizer of a checkpoint directory (local files only), as the reference for its layout runs it.

    - ``tokenizer.json`` present (llava-hf checkpoints): ``AutoTokenizer``, the fast tokenizer transformers runs.
    - only ``tokenizer.model`` (original checkpoints, and llava-hf ones saved SentencePiece-only), with a
      ``tokenizer_config.json`` naming a Llama tokenizer or none: ``OriginalLlamaTokenizer``, which encodes
      exactly as the original LLaVA code's slow ``LlamaTokenizer`` (transformers 4.37) did; transformers 5's
      own ``LlamaTokenizer`` does not (it encodes runs of spaces and a space after a special token
      differently). Other SentencePiece classes go to ``AutoTokenizer``.

    No tokenizer file: ``TokenizerNotFoundError`` (a ``PromptError`` and a ``FileNotFoundError``).
    """
    path = Path(path)
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise TokenizerNotFoundError(
            f"no tokenizer in {path}: looked for {' or '.join(_TOKENIZER_FILES)}"
            + ("" if path.is_dir() else " (the directory does not exist)")
        )
    if not (path / "tokenizer.json").is_file() and _tokenizer_class(path) in _SENTENCEPIECE_LLAMA_CLASSES:
        from .spm_tokenizer import OriginalLlamaTokenizer  # deferred: importing transformers takes seconds

        return OriginalLlamaTokenizer.from_pretrained(str(path), local_files_only=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# `tokenizer_class` values of SentencePiece-only directories that hold a Llama-family model: the original
# checkpoints' "LlamaTokenizer" (also Mistral's and Yi's), its fast twin, none at all, and "TokenizersBackend"
# (transformers 5's name for "build from the model file").
_SENTENCEPIECE_LLAMA_CLASSES = (None, "LlamaTokenizer", "LlamaTokenizerFast", "TokenizersBackend")


def _tokenizer_class(path: Path) -> str | None:
    config = path / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("tokenizer_class")
    except (json.JSONDecodeError, AttributeError) as e:
        raise PromptError(f"{config} is not a JSON object: {e}") from e


# A tokenizer directory like an original checkpoint's: the original code's settings (Mistral and Llama-2 ship
# "legacy": true; LLaVA pads with <unk>, llava/train/train.py).
_SPM_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<unk>",
    "add_bos_token": True,
    "add_eos_token": False,
    "legacy": True,
    "clean_up_tokenization_spaces": False,
}


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return
    # Write then rename, so concurrent callers (pytest-xdist) never see a partial file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sentencepiece_tokenizer_dir(model_file: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Make ``dest`` a tokenizer directory for a Llama-family SentencePiece model (``<s>``, ``</s>``, ``<unk>``).

    Writes ``tokenizer.model`` (a copy of ``model_file``) and a ``tokenizer_config.json`` like an original
    checkpoint's, so ``load_tokenizer(dest)`` encodes like the original LLaVA code's tokenizer.
    Files already up to date are left alone, so ``dest`` works as a cache. Returns ``dest``.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    _write_if_changed(dest / "tokenizer.model", Path(model_file).read_bytes())
    config = json.dumps(_SPM_TOKENIZER_CONFIG, indent=2) + "\n"
    _write_if_changed(dest / "tokenizer_config.json", config.encode())
    return dest


def mistral_tokenizer_dir(dest: str | os.PathLike) -> Path:
    """``sentencepiece_tokenizer_dir`` for the Mistral-7B v0.1 tokenizer (llava-v1.6-mistral-7b's, 32000 pieces).

    The model file comes from the ``mistral-common`` package (``mistral_common/data/tokenizer.model.v1``),
    so this works offline.
    """
    try:
        model_file = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    except ModuleNotFoundError as e:
        raise TokenizerNotFoundError(
            "the Mistral tokenizer comes from the mistral-common package: pip install mistral-common"
        ) from e
    if not model_file.is_file():
        raise TokenizerNotFoundError(f"{model_file} is missing from the installed mistral-common package")
    with importlib.resources.as_file(model_file) as local:
        return sentencepiece_tokenizer_dir(local, dest)
