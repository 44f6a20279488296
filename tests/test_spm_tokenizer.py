"""SentencePiece-only checkpoints tokenize exactly as the original LLaVA code's tokenizer did (property tests).

The reference, `slow_llama_tokenizer.SlowLlamaTokenizer`, is `sentencepiece` used as transformers 4.37's slow
`LlamaTokenizer` used it. Two models: the real Mistral `tokenizer.model` (llava-v1.6-mistral's; shipped in
mistral-common) and a small Llama-style BPE model trained here (byte fallback, split digits, dummy prefix, no
whitespace collapsing, whitespace-only pieces: Llama's trainer settings). Each in both `legacy` modes, with and
without an added `<image>` token (a llava-hf checkpoint saved SentencePiece-only).
"""

import importlib.resources
import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llava_jax import prompt as P
from llava_jax.spm_tokenizer import OriginalLlamaTokenizer

from slow_llama_tokenizer import SlowLlamaTokenizer, train_llama_style_model

MISTRAL_MODEL = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm-models")
    llama = root / "llama-style.model"
    llama.write_bytes(train_llama_style_model())
    mistral = root / "mistral.model"
    shutil.copy(MISTRAL_MODEL, mistral)
    return {"mistral": mistral, "llama-style": llama}


def original_checkpoint_tokenizer(directory, model_file, legacy, image_token_id=None, image_listed=False):
    """A tokenizer directory as an original (or SentencePiece-only llava-hf) checkpoint has it; with
    `image_token_id`, `<image>` is an added token (`image_listed`: also in `additional_special_tokens`)."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_file, directory / "tokenizer.model")
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    added = {str(i): {"content": t, **special} for i, t in enumerate(["<unk>", "<s>", "</s>"])}
    if image_token_id is not None:
        added[str(image_token_id)] = {"content": "<image>", **special}
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
              "added_tokens_decoder": added, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "pad_token": None, "clean_up_tokenization_spaces": False, "model_max_length": 4096}
    if legacy is not None:
        config["legacy"] = legacy
    if image_listed:
        config["additional_special_tokens"] = ["<image>"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


# image: "no" (original checkpoints), "added" (llava-hf: `<image>` in added_tokens_decoder), "listed" (and
# in additional_special_tokens, which makes it special to the legacy=False prefix rule)
CASES = [(model, legacy, image) for model in ("mistral", "llama-style") for legacy in (True, False, None)
         for image in ("no", "added", "listed")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-legacy={lg}-image={im}" for m, lg, im in CASES])
def pair(request, model_files, tmp_path_factory):
    """(load_tokenizer of the directory, the reference) for one case."""
    name, legacy, image = request.param
    model_file = model_files[name]
    vocab = 32000 if name == "mistral" else 520
    directory = original_checkpoint_tokenizer(tmp_path_factory.mktemp("tok"), model_file, legacy,
                                              None if image == "no" else vocab, image == "listed")
    reference = SlowLlamaTokenizer(model_file, legacy=legacy is not False,
                                   added_tokens=None if image == "no" else {"<image>": (vocab, False, False)},
                                   special_tokens=["<image>"] if image == "listed" else [])
    return P.load_tokenizer(directory), reference


# Runs of whitespace, whitespace next to special tokens and at chunk starts, SentencePiece's own "▁", bytes the
# models lack, and strings that only look like special tokens.
PIECES = [" ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\r\n", "\u3000", "\xa0", "▁", "▁▁", " ▁",
          "a", "The", "the", " cat", "What", "is", "shown", "12", "3.5", ",", ".", ":", "?",
          "é", "ü", "中文", "🙂", "\u200b", "Ω",
          "<s>", "</s>", "<unk>", "<image>", " <s>", "</s> ", "<s", "s>", "</", "<image", "image>", "<<image>>",
          "[INST]", "[/INST]", "<|im_start|>", "USER:", "ASSISTANT:"]
texts = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=3)), max_size=14).map("".join)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_ids_equal_the_original_tokenizer(pair, text):
    tokenizer, reference = pair
    assert isinstance(tokenizer, OriginalLlamaTokenizer)
    assert tokenizer(text).input_ids == reference.encode(text)


def test_edge_cases(pair):
    tokenizer, reference = pair
    edge = ["", " ", "  ", " lead", "a  b", "a \nb", "x <s> y", "<s>x", " <s>", "a1</s>USER: q2", "\nWhat",
            "USER: ", "<image>\n", " <image> ", "▁", "▁x", "<unk>", "What is  shown"]
    assert [tokenizer(t).input_ids for t in edge] == [reference.encode(t) for t in edge]


def test_known_mistral_ids(model_files, tmp_path):
    """The issue's example, fixed numbers: the original gives '▁' '▁shown' for a double space before 'shown'
    (transformers 5's LlamaTokenizer gives '▁▁' 'sh' 'own', 259 811 656)."""
    tokenizer = P.load_tokenizer(original_checkpoint_tokenizer(tmp_path, model_files["mistral"], True))
    ids = tokenizer("What is  shown").input_ids
    assert ids[-2:] == [28705, 4894] and 259 not in ids
    assert tokenizer("a <s> b").input_ids == [1, 264, 28705, 1, 28705, 287]  # legacy: "▁" before " b" too
    legacy_false = P.load_tokenizer(original_checkpoint_tokenizer(tmp_path / "new", model_files["mistral"], False))
    assert legacy_false("a <s> b").input_ids == [1, 264, 28705, 1, 287]


def test_decode_round_trip(pair):
    tokenizer, _ = pair
    for text in ["Hello  world\n!", "a\tb  \n c", "中文 🙂", "x"]:
        assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_which_tokenizer_each_layout_gets(model_files, tmp_path):
    from transformers import AutoTokenizer

    spm_only = original_checkpoint_tokenizer(tmp_path / "spm", model_files["mistral"], True)
    assert type(P.load_tokenizer(spm_only)) is OriginalLlamaTokenizer
    # with a tokenizer.json (published llava-hf checkpoints): the fast tokenizer transformers itself runs
    AutoTokenizer.from_pretrained(str(spm_only)).save_pretrained(tmp_path / "fast")
    assert (tmp_path / "fast" / "tokenizer.json").is_file()
    assert type(P.load_tokenizer(tmp_path / "fast")) is not OriginalLlamaTokenizer
