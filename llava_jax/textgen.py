"""Text in, text out: templates, tokenization, images, stop strings and streaming around the decode engine."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np

from .batch import ImageCrops, cache_bucket, left_pad, make_batch, prompt_bucket
from .errors import InputError
from .prompt import IMAGE_MARKER, PromptError, default_template, render_prompt, with_image_markers
from .sampling import make_sampler
from .validation import check_token_batch, validate_sampling

RAW = "raw"  # template name meaning: use the prompt text as is


def _as_image_list(images) -> list:
    if images is None:
        return []
    return list(images) if isinstance(images, list | tuple) else [images]


class TextStreamer:
    """Turns growing token lists into text deltas per row (decoding the whole row each time, so that
    SentencePiece's word-initial spaces come out right), and finds stop strings."""

    def __init__(self, tokenizer, rows: int, stop_strings: Sequence[str], stop_ids, callback):
        self.tokenizer, self.stop_strings, self.callback = tokenizer, list(stop_strings), callback
        self.stop_ids = set(stop_ids)
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.emitted = [""] * rows
        self.finished = [False] * rows
        # The embedding matrix is often padded past the tokenizer's vocabulary (to a multiple of 64, say); a
        # sampled id in that padding has no text, as transformers' fast tokenizers decode it.
        self.vocab_size = len(tokenizer)

    def decode(self, row: int) -> str:
        return self.tokenizer.decode([t for t in self.tokens[row] if 0 <= t < self.vocab_size],
                                     skip_special_tokens=True)

    def text(self, row: int) -> str:
        return self._cut_at_stop(self.decode(row))

    def _cut_at_stop(self, text: str) -> str:
        for s in self.stop_strings:
            if s in text:
                text = text[: text.index(s)]
        return text

    def __call__(self, buffer: np.ndarray, start: int, end: int) -> np.ndarray:
        stop = np.zeros(len(self.tokens), bool)
        for row in range(len(self.tokens)):
            if self.finished[row]:
                continue
            for t in buffer[row, start:end].tolist():
                self.tokens[row].append(t)
                if t in self.stop_ids:
                    self.finished[row] = True
                    break
            full = self.decode(row)
            if any(s in full for s in self.stop_strings):
                self.finished[row] = stop[row] = True
            text = self._cut_at_stop(full)
            if not self.finished[row]:  # a stop string may be starting: hold its first characters back
                text = text[: len(text) - self._stop_prefix_length(text)]
            self._emit(row, text)
        return stop

    def _stop_prefix_length(self, text: str) -> int:
        """The length of the longest end of `text` that begins a stop string (text that may yet be cut)."""
        return max((n for s in self.stop_strings for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])), default=0)

    def _emit(self, row: int, text: str, final: bool = False) -> None:
        if self.callback is None or (not final and text.endswith("\ufffd")):  # wait for whole UTF-8 characters
            return
        if text.startswith(self.emitted[row]) and len(text) > len(self.emitted[row]):
            self.callback(row, text[len(self.emitted[row]):])
            self.emitted[row] = text

    def flush(self, row: int) -> None:
        """The row is over (stopped or out of tokens): send whatever text was held back."""
        self.finished[row] = True
        self._emit(row, self.text(row), final=True)


def generate(model, prompts, images=None, *, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float | None = None, top_k: int | None = None, seed: int = 0,
             stop: Sequence[str] | str | None = None, stop_token_ids: Sequence[int] = (),
             template: str | None = None, system: str | None = None, return_ids: bool = False,
             stream: Callable[[int, str], None] | None = None):
    """See `LlavaModel.generate`."""
    single = isinstance(prompts, str)
    prompt_list = [prompts] if single else list(prompts)
    if not prompt_list:
        raise InputError("no prompts given")
    if single:
        image_lists = [_as_image_list(images)]
    elif images is None:
        image_lists = [[] for _ in prompt_list]
    else:
        if len(images) != len(prompt_list):
            raise InputError(f"{len(prompt_list)} prompts but {len(images)} image entries: give one per prompt "
                             "(None, an image, or a list of images)")
        image_lists = [_as_image_list(i) for i in images]
    validate_sampling(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, stop=stop,
                      seed=seed)
    template = template or default_template(model.config)
    texts = []
    for text, imgs in zip(prompt_list, image_lists, strict=True):
        if template == RAW:
            texts.append(text)
            continue
        texts.append(render_prompt(template, [with_image_markers(text, len(imgs))], system=system))
    return generate_from_texts(model, texts, image_lists, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, top_k=top_k, seed=seed, stop=stop, stop_token_ids=stop_token_ids,
                               return_ids=return_ids, stream=stream, single=single)


def generate_token_rows(model, rows: list[list[int]], images: list[ImageCrops], *, max_new_tokens: int,
                        temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None,
                        seed: int = 0, stop_ids, pad_id: int = 0, on_tokens=None,
                        chunk: int | None = None) -> list[list[int]]:
    """The one pipeline from token rows (image tokens expanded) and their images, in order, to new token ids:
    bucket and left-pad the rows, place the images, then the engine (embed, insert images, prefill, decode).
    `max_new_tokens` is reduced, with a warning, to fit the model's context."""
    context = model.config.text.max_position_embeddings
    longest = max(map(len, rows))
    if longest >= context:
        raise InputError(f"the prompt is {longest} tokens long (images included); the model's context is "
                         f"{context} tokens")
    if longest + max_new_tokens > context:
        warnings.warn(f"max_new_tokens={max_new_tokens} reduced to {context - longest} to fit the model's context "
                      f"of {context} tokens", stacklevel=3)
        max_new_tokens = context - longest
    bucket = prompt_bucket(longest)
    ids, mask = left_pad(rows, bucket)
    batch = make_batch(ids, mask, images, model.config.image_token_id, model.batch_multiple)
    return model.engine.generate(model.params, batch, make_sampler(temperature, top_k, top_p),
                                 max_new_tokens=max_new_tokens, seed=seed, stop_ids=stop_ids, pad_id=pad_id,
                                 cache_len=cache_bucket(bucket + max_new_tokens), on_tokens=on_tokens, chunk=chunk)


def tokenize_with_images(model, text: str, images: list) -> tuple[list[int], list[ImageCrops]]:
    """A rendered prompt (one `<image>` marker per image) and its images -> (token ids with each image's tokens
    expanded, the images' crops)."""
    if text.count(IMAGE_MARKER) != len(images):
        raise PromptError(f"the prompt has {text.count(IMAGE_MARKER)} {IMAGE_MARKER} marker(s) but "
                          f"{len(images)} image(s) were given")
    processed = [model.processor.process_image(im) for im in images]
    return (model.processor.token_ids(text, processed),
            [ImageCrops.create(model.config, p.crops, p.plan) for p in processed])


def default_stop_ids(model) -> set[int]:
    """The token ids that end an answer: the config's EOS ids and the tokenizer's."""
    stop_ids = set(model.config.text.eos_token_id)
    if getattr(model.tokenizer, "eos_token_id", None) is not None:
        stop_ids.add(model.tokenizer.eos_token_id)
    return stop_ids


def generate_from_texts(model, texts: list[str], image_lists: list[list], *, max_new_tokens, temperature, top_p,
                        top_k, seed, stop, stop_token_ids, return_ids, stream, single=False):
    """Generate from fully rendered prompt texts (with `<image>` markers) and their images."""
    validate_sampling(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, stop=stop,
                      seed=seed)
    rows, images = [], []
    for text, imgs in zip(texts, image_lists, strict=True):
        ids, crops = tokenize_with_images(model, text, imgs)
        rows.append(ids)
        images += crops
    tokenizer = model.tokenizer
    stop_ids = default_stop_ids(model) | set(stop_token_ids)
    stop_strings = [stop] if isinstance(stop, str) else list(stop or [])
    streamer = TextStreamer(tokenizer, len(rows), stop_strings, stop_ids, stream)
    token_rows = generate_token_rows(
        model, rows, images, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        seed=seed, stop_ids=stop_ids, pad_id=getattr(tokenizer, "pad_token_id", None) or 0, on_tokens=streamer,
        chunk=1 if (stream is not None or stop_strings) else None)
    streamer.tokens = token_rows
    for row in range(len(token_rows)):
        streamer.flush(row)
    texts_out = [streamer.text(i).strip() for i in range(len(token_rows))]
    if return_ids:
        result = [(t, ids) for t, ids in zip(texts_out, token_rows, strict=True)]
    else:
        result = texts_out
    return result[0] if single else result


def generate_ids(model, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, *,
                 max_new_tokens: int = 128, temperature: float = 0.0, top_p: float | None = None,
                 top_k: int | None = None, seed: int = 0, stop_token_ids: Sequence[int] | None = None):
    """See `LlavaModel.generate_ids`."""
    validate_sampling(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, seed=seed)
    input_ids, attention_mask = check_token_batch(input_ids, attention_mask, model.config)
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise InputError(f"input_ids must be (batch, seq), got shape {ids.shape}")
    mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    rows = [row[m].tolist() for row, m in zip(ids, mask, strict=True)]
    images = [] if pixel_values is None else model.image_crops(pixel_values, image_sizes)
    stop_ids = model.config.text.eos_token_id if stop_token_ids is None else tuple(stop_token_ids)
    return generate_token_rows(model, rows, images, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, top_k=top_k, seed=seed, stop_ids=stop_ids)


class ChatSession:
    """A multi-turn conversation: `ask` renders every turn so far with the template and generates."""

    def __init__(self, model, template: str | None = None, system: str | None = None, **generate_kwargs):
        self.model = model
        self.template = template or default_template(model.config)
        self.system = system
        self.generate_kwargs = generate_kwargs
        self.turns: list[str] = []
        self.images: list = []

    def ask(self, text: str, images=None, stream: Callable[[int, str], None] | None = None, **kwargs) -> str:
        """Add a user message (with new images, marked in the text or prepended) and return the answer."""
        new_images = _as_image_list(images)
        user = with_image_markers(text, len(new_images)) if new_images else text
        prompt = render_prompt(self.template, [*self.turns, user], system=self.system)
        options = {**self.generate_kwargs, **kwargs}
        answer = generate_from_texts(
            self.model, [prompt], [self.images + new_images], stream=stream, single=True,
            **{k: options.get(k, v) for k, v in _GENERATE_DEFAULTS.items()},
        )
        self.turns += [user, answer]
        self.images += new_images
        return answer


_GENERATE_DEFAULTS = dict(max_new_tokens=128, temperature=0.0, top_p=None, top_k=None, seed=0, stop=None,
                          stop_token_ids=(), return_ids=False)
