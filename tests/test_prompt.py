"""Prompts and prompt token ids against the original LLaVA code (llava-torch 1.2.2) and SentencePiece."""

import importlib.resources
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from llava_jax import prompt as P

from slow_llama_tokenizer import SlowLlamaTokenizer, train_llama_style_model

IMAGE_TOKEN_INDEX = -200  # llava.constants.IMAGE_TOKEN_INDEX
MISTRAL_MODEL = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"


@pytest.fixture(scope="module")
def conversation():
    return pytest.importorskip(
        "llava.conversation", reason="the original code: pip install --no-deps llava-torch"
    )


@pytest.fixture(scope="module")
def mm_utils():
    return pytest.importorskip(
        "llava.mm_utils", reason="the original code: pip install --no-deps llava-torch"
    )


# ---------------------------------------------------------------------------------------------------------
# Rendering

CONVERSATIONS = {
    "one turn": ["<image>\nWhat is shown here?"],
    "two turns": ["<image>\nWhat is shown here?", "A black cat on a sofa.", "What colour is the sofa?"],
    "three turns": ["<image>\nDescribe it.", "A cat.", "Is it asleep?", "Yes.", "Thanks. Anything else?"],
    "text only": ["Hello!"],
    "empty answer": ["<image>\nWhat is it?", "", "Try again."],  # the original treats "" like an open turn
}
SYSTEMS = [None, "Answer in one word.", ""]


def original_prompt(conversation, name, turns, system):
    """The original: copy the template, append each message and an open assistant turn, get_prompt()."""
    conv = conversation.conv_templates[name].copy()
    if system is not None:
        chatml = conv.sep_style == conversation.SeparatorStyle.MPT
        conv.system = ("<|im_start|>system\n" if chatml else "") + system
    for i, text in enumerate(turns):
        conv.append_message(conv.roles[i % 2], text)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def test_templates_are_the_original_ones(conversation):
    # Every template of llava-torch 1.2.2 except FastChat's Vicuna v0 ("default"/"v0"), which carries a
    # canned example conversation and is used by no LLaVA model.
    assert set(P.TEMPLATES) == set(conversation.conv_templates) - {"default", "v0"}
    for name in ("vicuna_v1", "llava_v1", "mistral_instruct", "chatml_direct", "llava_llama_2", "plain"):
        assert name in P.TEMPLATES


@pytest.mark.parametrize("system", SYSTEMS, ids=["default system", "own system", "empty system"])
@pytest.mark.parametrize("turns", CONVERSATIONS.values(), ids=CONVERSATIONS.keys())
@pytest.mark.parametrize("name", sorted(P.TEMPLATES))
def test_render_prompt_equals_original(conversation, name, turns, system):
    if P.TEMPLATES[name] is P.TEMPLATES["plain"] and any(turns[1::2]):
        # PLAIN has no sep2: the original fails on the first assistant reply, and so do we.
        with pytest.raises(TypeError):
            original_prompt(conversation, name, turns, system)
        with pytest.raises(P.PromptError):
            P.render_prompt(name, turns, system=system)
        return
    assert P.render_prompt(name, turns, system=system) == original_prompt(conversation, name, turns, system)


def test_render_prompt_known_strings():
    # Independent of llava-torch: the seed's llava_v1 prompt and the chatml/mistral forms of docs/semantics.md.
    q = "<image>\nWhat are the things I should be cautious about when I visit here?"
    assert P.render_prompt("llava_v1", [q]) == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: " + q + " ASSISTANT:"
    )
    assert P.render_prompt("chatml_direct", ["<image>\nq"]) == (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nq<|im_end|>"
        "<|im_start|>assistant\n"
    )
    assert P.render_prompt("mistral_instruct", ["<image>\nq1", "a1", "q2"]) == (
        "[INST] <image>\nq1 [/INST] a1 </s>[INST] q2 [/INST]"
    )
    assert P.render_prompt("vicuna_v1", ["q1", "a1", "q2"]).endswith(
        " USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"
    )
    assert P.render_prompt("plain", ["<image>\n"]) == "<image>\n\n"


def test_render_prompt_turn_forms():
    strings = ["q1", "a1", "q2"]
    pairs = [("user", "q1"), ("assistant", "a1"), ("user", "q2")]
    assert P.render_prompt("llava_v1", pairs) == P.render_prompt("llava_v1", strings)
    assert P.render_prompt(P.TEMPLATES["llava_v1"], strings) == P.render_prompt("llava_v1", strings)
    with pytest.raises(P.PromptError, match="last turn must be a user message"):
        P.render_prompt("llava_v1", ["q1", "a1"])
    with pytest.raises(P.PromptError, match="alternate"):
        P.render_prompt("llava_v1", [("user", "q1"), ("user", "q2")])
    with pytest.raises(P.PromptError, match="at least one"):
        P.render_prompt("llava_v1", [])
    with pytest.raises(P.PromptError, match="unknown template 'nope'"):
        P.render_prompt("nope", ["q"])
    with pytest.raises(P.PromptError, match="first message"):
        P.render_prompt("mistral_instruct", [""])


def test_with_image_markers():
    assert P.with_image_markers("What is it?", 1) == "<image>\nWhat is it?"
    assert P.with_image_markers("Compare.", 2) == "<image>\n<image>\nCompare."
    assert P.with_image_markers("Text only.", 0) == "Text only."
    assert P.with_image_markers("Left <image> right <image>", 2) == "Left <image> right <image>"
    assert P.with_image_markers("See <image-placeholder> here", 1) == "See <image> here"
    with pytest.raises(P.PromptError):
        P.with_image_markers("x", -1)


# ---------------------------------------------------------------------------------------------------------
# Tokenization


@pytest.fixture(scope="module")
def reference():
    """The original code's tokenizer for llava-v1.6-mistral (legacy=True), on sentencepiece alone."""
    return SlowLlamaTokenizer(MISTRAL_MODEL)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return P.load_tokenizer(P.mistral_tokenizer_dir(tmp_path_factory.mktemp("mistral-tokenizer")))


def test_mistral_tokenizer_basics(tokenizer, reference):
    assert len(tokenizer) == 32000
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    assert tokenizer.pad_token_id == 0  # LLaVA pads with <unk>
    assert tokenizer("Hello world").input_ids == [1, *reference.sp.encode("Hello world")]
    assert (
        tokenizer.decode(tokenizer("Hello  world\n!").input_ids, skip_special_tokens=True)
        == "Hello  world\n!"
    )


def random_texts(n, seed=0):
    # Spaces at chunk starts, runs of spaces and text next to special tokens are where tokenizers that
    # only look alike part ways.
    alphabet = [" ", "  ", "   ", "\n", "\t", ":", ".", ",", "12", "3.5", "é", "中文", "🙂", "▁"]
    alphabet += ["a", "The", " the", "cat", "USER", "[INST]", "<|im_end|>", "</s>", "<s>", "<unk>", "<image>"]
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14))) for _ in range(n)]


def test_tokenizer_matches_sentencepiece(tokenizer, reference):
    edge = ["", " ", " lead", "  two", "a  b", "x <s> y", "a1</s>USER: q2", "a </s> b", "\nWhat", "USER: "]
    texts = edge + [t.replace("<image>", "") for t in random_texts(1500)]
    mismatches = [
        (t, tokenizer(t).input_ids, reference(t).input_ids)
        for t in texts
        if tokenizer(t).input_ids != reference(t).input_ids
    ]
    assert mismatches == []


IMAGE_QUERIES = {
    "one image": ["<image>\nWhat is shown here?"],
    "two images": ["<image>\n<image>\nWhat differs between the two pictures?"],
    "inline images": ["Compare <image> and <image> , please."],  # chunks that start with a space
    "multi-turn": ["<image>\nWhat is it?", "A cat.", "And this one? <image>"],
}


@pytest.mark.parametrize(
    "name, turns",
    [
        pytest.param(name, turns, id=f"{name}-{case}")
        for name in sorted(P.TEMPLATES)
        for case, turns in IMAGE_QUERIES.items()
        if not (P.TEMPLATES[name] is P.TEMPLATES["plain"] and len(turns) > 1)  # PLAIN is single-turn only
    ],
)
def test_tokenizer_image_token_equals_original(mm_utils, tokenizer, reference, name, turns):
    text = P.render_prompt(name, turns)
    ours = P.tokenizer_image_token(text, tokenizer, IMAGE_TOKEN_INDEX)
    assert ours == mm_utils.tokenizer_image_token(text, tokenizer, IMAGE_TOKEN_INDEX)
    assert ours == mm_utils.tokenizer_image_token(text, reference, IMAGE_TOKEN_INDEX)
    assert ours.count(IMAGE_TOKEN_INDEX) == text.count("<image>")
    assert ours[0] == 1 and ours.count(1) == 1 + text.count("<s>")  # one BOS, whatever the chunks


def test_tokenizer_image_token_random_text(mm_utils, tokenizer, reference):
    for text in random_texts(300, seed=1):
        ours = P.tokenizer_image_token(text, tokenizer, IMAGE_TOKEN_INDEX)
        assert ours == mm_utils.tokenizer_image_token(text, reference, IMAGE_TOKEN_INDEX), text


def test_seed_token_structure(tokenizer, reference):
    # The seed's vicuna ids read `... ':' '▁' -200 '▁' '\n' ...`: "USER: " ends in a lone "▁", and the chunk
    # after the image starts with SentencePiece's dummy prefix, a lone "▁", before the newline byte.
    text = P.render_prompt("llava_v1", [P.with_image_markers("What is it?", 1)])
    ids = P.tokenizer_image_token(text, tokenizer, IMAGE_TOKEN_INDEX)
    at = ids.index(IMAGE_TOKEN_INDEX)
    piece = reference.sp.piece_to_id
    assert ids[at - 2 : at + 3] == [piece(":"), piece("▁"), IMAGE_TOKEN_INDEX, piece("▁"), piece("<0x0A>")]
    assert ids[at - 2 : at + 3] == [28747, 28705, IMAGE_TOKEN_INDEX, 28705, 13]


# The six templates the released models use, on multi-turn conversations whose messages have irregular
# whitespace (leading/trailing/double spaces, tabs, spaces before newlines) and images mid-text.
SIX_TEMPLATES = ["vicuna_v1", "llava_v1", "mistral_instruct", "chatml_direct", "llava_llama_2", "plain"]
IRREGULAR = {
    "spaces": ["<image>\n  What is  shown here? ", "A  cat\t on a sofa .", " And   the colour?\n"],
    "newlines": ["<image>\nDescribe it. \n\nBriefly.", "It is  a dog.\n\n", "\tWhy?  <image> \n Compare."],
    "chunk starts": ["Look: <image>  left, <image>\tright", "  Two  images.", "Which is  larger ?"],
    "look-alikes": ["<image>\n<s> [INST] </s>  x", " <unk>  ", "USER:  ASSISTANT: <|im_end|>"],
}


@pytest.fixture(scope="module")
def llama_style_pair(tmp_path_factory):
    """(our tokenizer, the reference) for a Llama-style model in legacy=False mode, as vicuna-based checkpoints
    ship it (the Mistral pair above covers legacy=True)."""
    import json

    directory = tmp_path_factory.mktemp("llama-style")
    (directory / "tokenizer.model").write_bytes(train_llama_style_model())
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False}))
    return P.load_tokenizer(directory), SlowLlamaTokenizer(directory / "tokenizer.model", legacy=False)


@pytest.mark.parametrize("case", IRREGULAR, ids=IRREGULAR.keys())
@pytest.mark.parametrize("name", SIX_TEMPLATES)
def test_six_templates_prompt_ids_equal_original(conversation, mm_utils, tokenizer, reference, llama_style_pair,
                                                 name, case):
    turns = IRREGULAR[case][:1] if name == "plain" else IRREGULAR[case]  # PLAIN is single-turn only
    text = P.render_prompt(name, turns)
    assert text == original_prompt(conversation, name, turns, None)
    for ours, theirs in [(tokenizer, reference), llama_style_pair]:
        ids = P.tokenizer_image_token(text, ours, IMAGE_TOKEN_INDEX)
        assert ids == mm_utils.tokenizer_image_token(text, theirs, IMAGE_TOKEN_INDEX)
        assert ids.count(IMAGE_TOKEN_INDEX) == text.count("<image>")


class CharTokenizer:
    """A toy tokenizer (one id per character), with or without BOS, for the BOS handling."""

    def __init__(self, bos):
        self.bos_token_id = 1 if bos else None

    def __call__(self, text):
        return {"input_ids": ([1] if self.bos_token_id else []) + [ord(c) for c in text]}


@pytest.mark.parametrize("bos", [True, False])
def test_tokenizer_image_token_bos_handling(mm_utils, bos):
    toy = CharTokenizer(bos)

    class Attr:  # the original reads `.input_ids`
        bos_token_id = toy.bos_token_id

        def __call__(self, text):
            return SimpleNamespace(**toy(text))

    for text in ["<image>\nab", "a<image>b<image>", "<image><image>", "no image", ""]:
        ours = P.tokenizer_image_token(text, toy, 32000)
        assert ours == mm_utils.tokenizer_image_token(text, Attr(), 32000)
        assert ours.count(32000) == text.count("<image>")
    assert P.tokenizer_image_token("a<image>b", toy, 7) == ([1] if bos else []) + [97, 7, 98]


# ---------------------------------------------------------------------------------------------------------
# Image token expansion


def test_expand_image_tokens():
    img = 32000
    assert P.expand_image_tokens([1, 5, img, 6, img, 7], [3, 2], img) == [1, 5, img, img, img, 6, img, img, 7]
    assert P.expand_image_tokens([1, -200, 9], [4], img, placeholder_id=-200) == [1, img, img, img, img, 9]
    as_arrays = P.expand_image_tokens(np.array([1, -200, 9]), np.array([2]), img, placeholder_id=-200)
    assert as_arrays == [1, img, img, 9] and all(type(t) is int for t in as_arrays)
    assert P.expand_image_tokens([1, 2, 3], [], img) == [1, 2, 3]
    assert P.expand_image_tokens([img], [1], img) == [img]


def test_expand_image_tokens_mismatch():
    with pytest.raises(P.PromptError, match=r"2 <image> marker\(s\) .* but 1 image\(s\)"):
        P.expand_image_tokens([1, 32000, 2, 32000], [576], 32000)
    with pytest.raises(P.PromptError, match=r"0 <image> marker\(s\) .* but 1 image\(s\)"):
        P.expand_image_tokens([1, 2], [576], 32000)
    with pytest.raises(P.PromptError, match="positive"):
        P.expand_image_tokens([1, 32000], [0], 32000)
    with pytest.raises(TypeError):
        P.expand_image_tokens([1, 32000], [2.5], 32000)


def test_expand_after_tokenizer_image_token(tokenizer):
    text = P.render_prompt("mistral_instruct", [P.with_image_markers("Compare.", 2)])
    ids = P.tokenizer_image_token(text, tokenizer, IMAGE_TOKEN_INDEX)
    full = P.expand_image_tokens(ids, [2144, 1728], 32000, placeholder_id=IMAGE_TOKEN_INDEX)
    assert len(full) == len(ids) - 2 + 2144 + 1728
    assert full.count(32000) == 2144 + 1728 and IMAGE_TOKEN_INDEX not in full


# ---------------------------------------------------------------------------------------------------------
# Template choice

MODEL_NAMES = {
    "liuhaotian/llava-v1.5-7b": "llava_v1",
    "liuhaotian/llava-v1.5-13b": "llava_v1",
    "liuhaotian/llava-v1.6-vicuna-7b": "llava_v1",
    "liuhaotian/llava-v1.6-vicuna-13b": "llava_v1",
    "liuhaotian/llava-v1.6-mistral-7b": "mistral_instruct",
    "liuhaotian/llava-v1.6-34b": "chatml_direct",
    "llava-hf/llava-v1.6-mistral-7b-hf": "mistral_instruct",
    "llava-hf/llava-v1.6-vicuna-13b-hf": "llava_v1",
    "llava-hf/llava-v1.6-34b-hf": "chatml_direct",
    "llava-hf/llava-1.5-7b-hf": "llava_v0",  # no "v1" in the name: the original falls through to v0
    "liuhaotian/llava-llama-2-13b-chat-lightning-preview": "llava_llama_2",
    "liuhaotian/LLaVA-Lightning-MPT-7B-preview": "mpt",
    "/data/ckpt/llava-v1.5-7b/checkpoint-500/": "llava_v1",
    "./checkpoints/LLaVA-v1.6-Mistral-7B-lora": "mistral_instruct",
    "lmms-lab/llama3-llava-next-8b": "llava_v0",
}


@pytest.fixture
def original_conv_mode(monkeypatch):
    """The template run_llava.eval_model picks, from the original code itself: model loading is stubbed
    and the run stops at the image loading that follows the choice."""
    run_llava = pytest.importorskip(
        "llava.eval.run_llava", reason="the original code: pip install --no-deps llava-torch"
    )

    class Stop(Exception):
        pass

    def stop(_args):
        raise Stop

    model = SimpleNamespace(config=SimpleNamespace(mm_use_im_start_end=False))
    monkeypatch.setattr(run_llava, "disable_torch_init", lambda: None)  # it patches torch globally
    monkeypatch.setattr(run_llava, "load_pretrained_model", lambda *a, **k: (None, model, None, None))
    monkeypatch.setattr(run_llava, "image_parser", stop)

    def conv_mode(model_path):
        args = SimpleNamespace(
            model_path=model_path,
            model_base=None,
            query="q",
            conv_mode=None,
            image_file="x.jpg",
            sep=",",
            temperature=0,
            top_p=None,
            num_beams=1,
            max_new_tokens=1,
        )
        with pytest.raises(Stop):
            run_llava.eval_model(args)
        return args.conv_mode

    return conv_mode


@pytest.mark.parametrize("path, expected", MODEL_NAMES.items(), ids=MODEL_NAMES.keys())
def test_default_template_by_name(original_conv_mode, path, expected):
    assert P.default_template(path) == expected
    assert original_conv_mode(path) == expected


def hf_config(model_type, vocab_size, name=""):
    """A llava-hf config.json."""
    text = {"model_type": model_type, "vocab_size": vocab_size}
    return {"_name_or_path": name, "model_type": "llava_next", "text_config": text}


def jax_config(model_type, vocab_size):
    """The layout of llava_jax.config.LlavaConfig: the text model under `text`."""
    return SimpleNamespace(text=SimpleNamespace(model_type=model_type, vocab_size=vocab_size))


@pytest.mark.parametrize(
    "config, expected",
    [
        (hf_config("mistral", 32064), "mistral_instruct"),
        (hf_config("llama", 64064), "chatml_direct"),
        (hf_config("llama", 32064), "llava_v1"),
        (hf_config("llama", 32064, "llava-hf/llava-1.5-7b-hf"), "llava_v1"),  # no name rule: config decides
        (hf_config("llama", 32064, "liuhaotian/llava-v1.6-34b"), "chatml_direct"),  # a name rule wins
        ({"model_type": "llava_mistral", "vocab_size": 32000}, "mistral_instruct"),  # original config.json
        ({"model_type": "llava_llama", "vocab_size": 64000}, "chatml_direct"),
        ({"model_type": "llava_llama", "vocab_size": 32000}, "llava_v1"),
        (jax_config("mistral", 32064), "mistral_instruct"),
        (jax_config("llama", 64064), "chatml_direct"),
        (jax_config("llama", 32064), "llava_v1"),
    ],
)
def test_default_template_by_config(config, expected):
    assert P.default_template(config) == expected


def test_default_template_other_inputs():
    from transformers import LlavaNextConfig

    assert P.default_template(LlavaNextConfig(text_config={"model_type": "mistral"})) == "mistral_instruct"
    assert P.default_template(Path("models/llava-v1.6-34b")) == "chatml_direct"


# ---------------------------------------------------------------------------------------------------------
# Tokenizer files


def test_load_tokenizer_without_files(tmp_path):
    for path in (tmp_path, tmp_path / "missing"):
        with pytest.raises(P.TokenizerNotFoundError) as err:
            P.load_tokenizer(path)
        assert str(path) in str(err.value)
        assert "tokenizer.json" in str(err.value) and "tokenizer.model" in str(err.value)
        assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, P.PromptError)


def test_mistral_tokenizer_dir_is_a_cache(tmp_path):
    dest = P.mistral_tokenizer_dir(tmp_path / "tok")
    model, config = dest / "tokenizer.model", dest / "tokenizer_config.json"
    assert model.read_bytes() == MISTRAL_MODEL.read_bytes()
    stamps = (model.stat().st_mtime_ns, config.stat().st_mtime_ns)
    assert P.mistral_tokenizer_dir(dest) == dest
    assert (model.stat().st_mtime_ns, config.stat().st_mtime_ns) == stamps  # up to date: not rewritten
    model.write_bytes(b"truncated")
    P.mistral_tokenizer_dir(dest)
    assert model.read_bytes() == MISTRAL_MODEL.read_bytes()  # a damaged copy is repaired
    assert sorted(p.name for p in dest.iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
