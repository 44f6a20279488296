"""The tokenizer of SentencePiece-only checkpoint directories, encoding as the original LLaVA code's tokenizer.

The original code loads its tokenizer with `AutoTokenizer.from_pretrained(path, use_fast=False)`: under its
pinned transformers 4.37 that is the slow `LlamaTokenizer`, which runs `sentencepiece` on each chunk of text
between added tokens. transformers 5 has no such class any more: its `LlamaTokenizer` is a rebuilt `tokenizers`
pipeline that encodes whitespace differently ("What is  shown": `259, 811, 656` instead of `28705, 4894` with
the Mistral model). `OriginalLlamaTokenizer` reproduces the slow class on transformers 5's own SentencePiece
base class (`SentencePieceBackend`, which already splits on added tokens and encodes chunks the 4.37 way):

- `legacy` comes from `tokenizer_config.json`, absent = True, as in 4.37. legacy=True: every chunk between
  added tokens gets SentencePiece's dummy "▁" prefix. legacy=False: the model's dummy prefix is switched off, one
  "▁" goes in front of the whole text (dropped again if a special token follows it), and a chunk that starts
  with a space keeps it as "▁".
- decoding runs `sentencepiece` on each run of ordinary pieces (byte pieces such as `<0x0A>` become bytes).

`tests/test_spm_tokenizer.py` checks the ids against `sentencepiece` used exactly as the slow class used it.
"""

from __future__ import annotations

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

SPIECE_UNDERLINE = "▁"


class OriginalLlamaTokenizer(SentencePieceBackend):
    """transformers 4.37's slow `LlamaTokenizer` (what the original LLaVA code ran), on transformers 5.

    Load it with `OriginalLlamaTokenizer.from_pretrained(directory)`; the directory holds `tokenizer.model` and
    optionally `tokenizer_config.json` / `special_tokens_map.json` (special tokens, `added_tokens_decoder`,
    `legacy`, `add_bos_token`, `add_eos_token`).
    """

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file=None, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token=None,
                 add_bos_token=True, add_eos_token=False, legacy=None, clean_up_tokenization_spaces=False,
                 **kwargs):
        kwargs.pop("tokenizer_class", None)
        listed = kwargs.get("additional_special_tokens") or kwargs.get("extra_special_tokens") or []
        super().__init__(
            vocab_file=vocab_file, unk_token=unk_token, bos_token=bos_token, eos_token=eos_token,
            pad_token=pad_token, legacy=True if legacy is None else legacy,  # 4.37: absent means legacy
            clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)
        self._bos_eos = (add_bos_token, add_eos_token)
        # 4.37's `all_special_tokens`: the named ones and the listed extras. An added token that is only marked
        # special in `added_tokens_decoder` (llava-hf's `<image>`) was not one; transformers 5 counts it.
        named = (self.bos_token, self.eos_token, self.unk_token, self.pad_token, *map(str, listed))
        self._special_437 = frozenset(str(t) for t in named if t is not None)

    @property
    def add_bos_token(self) -> bool:
        return self._bos_eos[0]

    @property
    def add_eos_token(self) -> bool:
        return self._bos_eos[1]

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        """BOS (if `add_bos_token`) + ids + EOS (if `add_eos_token`), per sequence, as the slow class."""
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + list(token_ids_0) + eos
        return out if token_ids_1 is None else out + bos + list(token_ids_1) + eos

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return (1 + pair) * (self.add_bos_token + self.add_eos_token)

    def tokenize(self, text, **kwargs) -> list[str]:
        """Pieces of `text` (added tokens kept whole), with 4.37's legacy=False prefix rule."""
        if self.legacy or not text:
            return super().tokenize(text, **kwargs)
        tokens = super().tokenize(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "), **kwargs)
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self._special_437:
            tokens = tokens[1:]
        return tokens

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Pieces -> text: `sentencepiece` decodes each run of ordinary pieces; special tokens stay verbatim."""
        if not tokens:
            return ""
        tokens = list(tokens)
        if tokens[0].startswith(SPIECE_UNDERLINE):  # the dummy prefix the encoder added
            tokens[0] = tokens[0][1:]
        special = self._special_437
        out, run, prev_special = [], [], False
        for i, token in enumerate(tokens):
            if token in special:
                if not prev_special and i and self.legacy:
                    out.append(" ")
                out.append(self.sp_model.decode(run) + token)
                run, prev_special = [], True
            else:
                run.append(token)
                prev_special = False
        out.append(self.sp_model.decode(run))
        return "".join(out)
