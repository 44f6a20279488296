"""Input ids and labels equal to the original training code's (`llava/train/train.py` of llava-torch).

The original's `preprocess_multimodal`, `preprocess` (dispatching to preprocess_plain / _v1 / _llama_2 / _mpt)
and `DataCollatorForSupervisedDataset` run on the same tokenizer object as `build_example`, with the
original's conversation templates set as train.py sets them. Equality is exact (ids and labels are integers).
"""

import copy
import json
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from llava_jax.config import ORIGINAL_IMAGE_TOKEN_INDEX
from llava_jax.errors import InputError
from llava_jax.prompt import load_tokenizer, mistral_tokenizer_dir
from llava_jax.train.labels import IGNORE_INDEX, LabelError, build_example, stage_template

IMAGE_ROWS = [
    [{"from": "human", "value": "What is shown in this picture?\n<image>"},
     {"from": "gpt", "value": "A red circle on a white background."}],
    [{"from": "human", "value": "<image>\nDescribe  the image."},  # a double space: SentencePiece's hard case
     {"from": "gpt", "value": "There is a blue square.\nIt is small."},
     {"from": "human", "value": "What color is it?"},
     {"from": "gpt", "value": "Blue"},
     {"from": "human", "value": "And the background? Answer in one word, café-style ünïcode."},
     {"from": "gpt", "value": "white"}],
]
TEXT_ROWS = [
    [{"from": "human", "value": "Write a haiku about JAX."},
     {"from": "gpt", "value": "Arrays flow in jit,\ngradients bloom on the TPU,\nXLA hums on."},
     {"from": "human", "value": "Thanks! Now one word: yes or no?"},
     {"from": "gpt", "value": "yes"}],
]
CAPTIONS = [
    [{"from": "human", "value": "<image>\nRender a short caption."}, {"from": "gpt", "value": "a green triangle"}],
    [{"from": "human", "value": "Caption this: <image>"}, {"from": "gpt", "value": "two   cats, asleep\n"}],
]


@pytest.fixture(scope="module")
def original():
    """llava.train.train imported under transformers 5: its trainer module imports a name transformers 5
    removed, so a stand-in takes its place (preprocess never uses it)."""
    stub = types.ModuleType("llava.train.llava_trainer")
    stub.LLaVATrainer = object
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "llava.train.llava_trainer", stub)
        import llava.train.train as train
        from llava import conversation as conversation_lib
        saved = conversation_lib.default_conversation
        yield train, conversation_lib
        conversation_lib.default_conversation = saved


def original_example(original, conversations, tokenizer, template, has_image, max_length):
    """What the original's LazySupervisedDataset + collator give for one row."""
    train, conversation_lib = original
    conversation_lib.default_conversation = conversation_lib.conv_templates[template]  # as train.py does
    tokenizer.pad_token = tokenizer.unk_token  # train.py, for every template but v0
    tokenizer.model_max_length = max_length
    sources = [copy.deepcopy(conversations)]
    if has_image:
        sources = train.preprocess_multimodal(sources, types.SimpleNamespace(is_multimodal=True,
                                                                           mm_use_im_start_end=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = train.preprocess(sources, tokenizer, has_image=has_image)
    batch = train.DataCollatorForSupervisedDataset(tokenizer=tokenizer)(
        [dict(input_ids=torch.as_tensor(data["input_ids"][0]), labels=torch.as_tensor(data["labels"][0]))])
    return batch["input_ids"][0].numpy(), batch["labels"][0].numpy()


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    """The real Mistral-7B tokenizer (llava-v1.6-mistral's; mistral-common ships it), as llava-jax loads it."""
    return load_tokenizer(mistral_tokenizer_dir(tmp_path_factory.mktemp("mistral")))


@pytest.fixture(scope="module")
def mistral_nonlegacy(tmp_path_factory):
    """The same model with legacy=False: preprocess_v1 then shortens every round after the first by one."""
    d = mistral_tokenizer_dir(tmp_path_factory.mktemp("nonlegacy"))
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": False}))
    tok = load_tokenizer(d)
    assert tok.legacy is False
    return tok


@pytest.fixture(scope="module")
def fast(tmp_path_factory, mistral):
    """A tokenizer.json (tokenizers-backed) tokenizer, the kind llava-hf checkpoints load through AutoTokenizer:
    transformers 5's LlamaTokenizer built from the Mistral model (legacy=False, its own whitespace rules)."""
    from transformers import LlamaTokenizer

    d = tmp_path_factory.mktemp("fast")
    LlamaTokenizer.from_pretrained(mistral.name_or_path).save_pretrained(str(d))
    tok = load_tokenizer(d)
    assert (d / "tokenizer.json").is_file() and type(tok) is not type(mistral)
    return tok


def _check(original, rows, tokenizer, template, has_image, max_length=4096, expect_trained=True):
    for row in rows:
        want_ids, want_labels = original_example(original, row, tokenizer, template, has_image, max_length)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ids, labels = build_example(row, tokenizer, template, has_image, max_length)
        assert ids.dtype == labels.dtype == np.int32
        np.testing.assert_array_equal(ids, want_ids, err_msg=f"{template} ids")
        np.testing.assert_array_equal(labels, want_labels, err_msg=f"{template} labels")
        if max_length == 4096:  # nothing cut: one image placeholder on image rows, none on text rows
            assert (ids == ORIGINAL_IMAGE_TOKEN_INDEX).sum() == has_image
        if expect_trained:  # a meaningful comparison: answers are trained on, prompts are not
            assert 0 < (labels != IGNORE_INDEX).sum() < len(labels)


@pytest.mark.parametrize("template", ["llava_v1", "vicuna_v1", "mistral_instruct", "llava_llama_2", "v1_mmtag",
                                      "llava_v0", "v0_mmtag"])
def test_finetune_labels_match_the_original_mistral_tokenizer(original, mistral, template):
    _check(original, IMAGE_ROWS, mistral, template, has_image=True)
    _check(original, TEXT_ROWS, mistral, template, has_image=False)


@pytest.mark.parametrize("template", ["chatml_direct", "mpt"])
def test_chatml_labels_match_the_original(original, mistral, mistral_nonlegacy, template):
    # preprocess_mpt never counts the "<|im_end|>" that closes the last answer, so every conversation is a
    # "tokenization mismatch" to it and nothing is trained on: reproduced, with a warning
    for tokenizer in (mistral, mistral_nonlegacy):
        for rows, has_image in ((IMAGE_ROWS, True), (TEXT_ROWS, False)):
            _check(original, rows, tokenizer, template, has_image, expect_trained=False)
            for row in rows:
                with pytest.warns(UserWarning, match="tokenization mismatch"):
                    _, labels = build_example(row, tokenizer, template, has_image, 4096)
                assert (labels == IGNORE_INDEX).all()


def test_pretrain_plain_labels_match_the_original(original, mistral):
    _check(original, CAPTIONS + IMAGE_ROWS[:1], mistral, "plain", has_image=True)
    ids, labels = build_example(CAPTIONS[0], mistral, "plain", True, 4096)
    # BOS and the image are the prompt; the caption and the closing newline are the answer
    assert ids[:2].tolist() == [mistral.bos_token_id, ORIGINAL_IMAGE_TOKEN_INDEX]
    assert (labels[:2] == IGNORE_INDEX).all() and (labels[2:] == ids[2:]).all()
    assert mistral.decode(ids[2:]).strip() == "a green triangle"


@pytest.mark.parametrize("template", ["llava_v1", "llava_llama_2", "llava_v0", "plain"])
@pytest.mark.parametrize("kind", ["nonlegacy", "fast"])
def test_labels_match_the_original_other_tokenizers(request, original, kind, template):
    tokenizer = request.getfixturevalue("mistral_nonlegacy" if kind == "nonlegacy" else kind)
    _check(original, CAPTIONS if template == "plain" else IMAGE_ROWS, tokenizer, template, has_image=True)
    if template != "plain":
        _check(original, TEXT_ROWS, tokenizer, template, has_image=False)


@pytest.mark.parametrize("template", ["llava_v1", "mistral_instruct", "chatml_direct", "llava_v0", "plain"])
@pytest.mark.parametrize("max_length", [3, 17, 40])
def test_truncation_matches_the_original(original, mistral, template, max_length):
    rows = CAPTIONS if template == "plain" else IMAGE_ROWS
    _check(original, rows, mistral, template, True, max_length, expect_trained=False)
    if template != "plain":
        _check(original, TEXT_ROWS, mistral, template, False, max_length, expect_trained=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full, _ = build_example(rows[-1], mistral, template, True, 4096)
        ids, labels = build_example(rows[-1], mistral, template, True, max_length)
    assert len(ids) == len(labels) == min(len(full), max_length) and len(full) > 3


def test_image_marker_moves_to_the_front_only_on_image_rows(mistral):
    row = [{"from": "human", "value": "Look: <image> here"}, {"from": "gpt", "value": "ok"}]
    with_image, _ = build_example(row, mistral, "llava_v1", True, 4096)
    text_only, _ = build_example(row, mistral, "llava_v1", False, 4096)
    assert ORIGINAL_IMAGE_TOKEN_INDEX in with_image.tolist()
    assert ORIGINAL_IMAGE_TOKEN_INDEX not in text_only.tolist()  # tokenized as text, as the original does
    at = with_image.tolist().index(ORIGINAL_IMAGE_TOKEN_INDEX)
    assert mistral.decode(with_image[at + 1:]).lstrip().startswith("Look:  here")  # the original leaves both spaces


def test_stage_template_and_refusals(mistral):
    assert stage_template("pretrain", "mistral_instruct") == "plain"
    assert stage_template("finetune", "mistral_instruct") == "mistral_instruct"
    with pytest.raises(InputError, match="stage"):
        stage_template("sft", "llava_v1")
    with pytest.raises(LabelError, match="unknown template"):
        build_example(IMAGE_ROWS[0], mistral, "nope", True, 100)
    with pytest.raises(LabelError, match="turn 1 is from 'human'"):
        build_example([IMAGE_ROWS[0][0]] * 2, mistral, "llava_v1", True, 100)
    with pytest.raises(LabelError, match="plain template.*exactly two turns"):
        build_example(IMAGE_ROWS[1], mistral, "plain", True, 100)
