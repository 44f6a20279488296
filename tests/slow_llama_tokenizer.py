"""The tokenizer the original LLaVA code ran, rebuilt on `sentencepiece` alone: the reference for tokenizer tests.

The original code loads `AutoTokenizer.from_pretrained(path, use_fast=False)`, which under its pinned
transformers 4.37 is the slow, sentencepiece-backed `LlamaTokenizer`. Its `__call__(text).input_ids` is:

1. `tokenize(text)`:
   - legacy=False only: "▁" characters become spaces, and one "▁" goes in front of the whole text;
   - the text is split around the added tokens (the special tokens `<unk>`, `<s>`, `</s>` and any token the
     `tokenizer_config.json` adds, such as `<image>`), leftmost match first, the longest at a position; an
     added token with `lstrip` / `rstrip` eats the whitespace on its left / right, and empty chunks vanish;
   - every other chunk goes to `sp.encode(chunk, out_type=str)`. legacy=True: with the model's own settings, so
     each chunk gets SentencePiece's dummy "▁" prefix. legacy=False: with `add_dummy_prefix` switched off, and
     a chunk that starts with a space or "▁" is encoded as `unk_token + chunk` with the pieces of the unk text
     cut off again (keeps that leading space as "▁");
   - legacy=False only: a leading lone "▁" right before a special token is dropped;
2. pieces -> ids (`added token -> its id`, else `sp.piece_to_id`), BOS in front when `add_bos_token`, EOS at
   the end when `add_eos_token`.

An empty text is tokenized by the plain path in both modes.
"""

from __future__ import annotations

import io
import random
import re
from types import SimpleNamespace

import sentencepiece
from sentencepiece import sentencepiece_model_pb2

SPIECE_UNDERLINE = "▁"


class SlowLlamaTokenizer:
    """transformers 4.37 `LlamaTokenizer` (slow) semantics on a SentencePiece model file.

    added_tokens: {content: (id, lstrip, rstrip)} beyond `<unk>`, `<s>`, `</s>`, as a tokenizer_config's
    `added_tokens_decoder` declares them. special_tokens: the extra tokens 4.37 counted in `all_special_tokens`
    (`additional_special_tokens`); `added_tokens_decoder`'s `special` flag did not make a token one.
    """

    def __init__(self, model_file, legacy=True, added_tokens=None, special_tokens=(), add_bos_token=True,
                 add_eos_token=False):
        self.legacy = legacy
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))  # the untouched model
        if legacy:
            self.encoder = self.sp
        else:  # get_spm_processor: the same model with add_dummy_prefix off
            proto = sentencepiece_model_pb2.ModelProto.FromString(self.sp.serialized_model_proto())
            proto.normalizer_spec.add_dummy_prefix = False
            self.encoder = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.unk_token, self.bos_token, self.eos_token = "<unk>", "<s>", "</s>"
        self.bos_token_id, self.eos_token_id = self.sp.piece_to_id("<s>"), self.sp.piece_to_id("</s>")
        self.added = {self.unk_token: (self.sp.unk_id(), False, False),
                      self.bos_token: (self.bos_token_id, False, False),
                      self.eos_token: (self.eos_token_id, False, False), **(added_tokens or {})}
        self.special = {self.unk_token, self.bos_token, self.eos_token, *special_tokens}
        alternatives = sorted(self.added, key=len, reverse=True)  # the longest wins at one position
        self._split = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")").split
        self.unk_token_length = len(self.encoder.encode(self.unk_token))

    def _encode_chunk(self, chunk: str) -> list[str]:
        if self.legacy or not chunk.startswith((SPIECE_UNDERLINE, " ")):
            return self.encoder.encode(chunk, out_type=str)
        pieces = self.encoder.encode(self.unk_token + chunk, out_type=str)
        return pieces[self.unk_token_length :] if len(pieces) >= self.unk_token_length else pieces

    def _split_added(self, text: str) -> list[str]:
        parts = self._split(text)  # odd positions are added tokens
        for i in range(1, len(parts), 2):
            _, lstrip, rstrip = self.added[parts[i]]
            if lstrip:
                parts[i - 1] = parts[i - 1].rstrip()
            if rstrip:
                parts[i + 1] = parts[i + 1].lstrip()
        return parts

    def tokenize(self, text: str) -> list[str]:
        """The pieces (strings) of `text`, added tokens included, no BOS/EOS."""
        plain = self.legacy or not text
        if not plain:
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        tokens: list[str] = []
        for i, part in enumerate(self._split_added(text)):
            if i % 2:
                tokens.append(part)
            elif part:
                tokens += self._encode_chunk(part)
        if not plain and len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.special:
            tokens = tokens[1:]
        return tokens

    def encode(self, text: str) -> list[int]:
        ids = [self.added[t][0] if t in self.added else self.sp.piece_to_id(t) for t in self.tokenize(text)]
        return [self.bos_token_id] * self.add_bos_token + ids + [self.eos_token_id] * self.add_eos_token

    def __call__(self, text: str):
        # The original's `tokenizer_image_token` reads `.input_ids`.
        return SimpleNamespace(input_ids=self.encode(text))


def train_llama_style_model() -> bytes:
    """A ~520-piece BPE model with Llama's trainer settings, on a generated corpus with irregular whitespace."""
    rng = random.Random(0)
    words = ("the cat sat on a mat what is shown in this picture image user assistant answer question describe "
             "colour sofa black white two three photo of dog").split()
    gaps = [" ", " ", " ", "  ", "   ", "\t", ", ", ". ", " 12 ", " é ", "\n"]
    lines = ["".join(rng.choice(words).capitalize() if rng.random() < 0.1 else rng.choice(words) + rng.choice(gaps)
                     for _ in range(rng.randint(3, 15))) for _ in range(3000)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=520, hard_vocab_limit=False,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity", character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return model.getvalue()
