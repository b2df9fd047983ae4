"""Tests of the LLaVA instruction data pipeline: exact tokens and labels, collation, bad records, length grouping."""

import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch.utils.data import DataLoader
from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast, TrainingArguments

from adsc_llava.testing import (
    LLAVA_HF_CHAT_TEMPLATE,
    build_next_processor,
    build_processor,
    build_word_tokenizer,
    tiny_llava_config_for,
)
from adsc_llava.train import data
from adsc_llava.train.collator import LlavaDataCollator
from adsc_llava.train.data import IGNORE_INDEX, BadRecordError, ChatTemplateError, DataValidationError, load_records
from adsc_llava.train.dataset import LlavaInstructDataset, scan_once
from adsc_llava.train.sampler import ModalityLengthGroupedSampler, get_modality_length_grouped_indices

WORDS = ("what", "color", "is", "it", "?", "red", ".", "and", "the", "shape", "square", "hello", "hi", "there")
# Ids by construction of the word tokenizer: specials, prompt words, then WORDS in order.
BOS, EOS, PAD, IMG, USER, ASSISTANT, NL = 1, 2, 3, 4, 5, 6, 7
WHAT, COLOR, IS, IT, QMARK, RED, DOT, AND, THE, SHAPE, SQUARE, HELLO, HI, THERE = range(8, 22)
X = IGNORE_INDEX
IMAGE_SIZE, PATCH_SIZE = 16, 8  # 4 image tokens per image

SINGLE = {
    "id": "single",
    "image": "red.png",
    # LLaVA moves `<image>` to the start of the first human turn, wherever it was.
    "conversations": [{"from": "human", "value": "what color is it ?\n<image>"}, {"from": "gpt", "value": "red ."}],
}
MULTI = {
    "id": "multi",
    "image": "red.png",
    "conversations": [
        {"from": "human", "value": "<image>\nwhat color is it ?"},
        {"from": "gpt", "value": "red ."},
        {"from": "human", "value": "and the shape ?"},
        {"from": "gpt", "value": "square ."},
    ],
}
TEXT = {"id": "text", "conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi there"}]}

# USER: <image> x4 \n what color is it ? ASSISTANT: red . </s>
SINGLE_IDS = [BOS, USER, IMG, IMG, IMG, IMG, NL, WHAT, COLOR, IS, IT, QMARK, ASSISTANT, RED, DOT, EOS]
SINGLE_LABELS = [X] * 13 + [RED, DOT, EOS]
# ... </s> USER: and the shape ? ASSISTANT: square . </s>
MULTI_IDS = SINGLE_IDS + [USER, AND, THE, SHAPE, QMARK, ASSISTANT, SQUARE, DOT, EOS]
MULTI_LABELS = SINGLE_LABELS + [X] * 6 + [SQUARE, DOT, EOS]
# USER: hello ASSISTANT: hi there </s>
TEXT_IDS = [BOS, USER, HELLO, ASSISTANT, HI, THERE, EOS]
TEXT_LABELS = [X, X, X, X, HI, THERE, EOS]

# A template that closes answers with `</s>` itself, in the original LLaVA (vicuna_v1) layout.
EOS_EMITTING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] if item['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %} "
    "{% else %}ASSISTANT: {% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}"
    "{% endfor %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_EOS_ANSWER = (
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] }}{% endfor %}{{ eos_token }}"
)
assert _EOS_ANSWER in EOS_EMITTING_TEMPLATE
# The same with generation markers around the answer only (EOS written after the block), or around answer and EOS.
EOS_AFTER_MARKERS_TEMPLATE = EOS_EMITTING_TEMPLATE.replace(
    _EOS_ANSWER, _EOS_ANSWER.replace("{% for", "{% generation %}{% for").replace("{{ eos", "{% endgeneration %}{{ eos")
)
EOS_INSIDE_MARKERS_TEMPLATE = EOS_EMITTING_TEMPLATE.replace(
    _EOS_ANSWER, "{% generation %}" + _EOS_ANSWER + "{% endgeneration %}"
)
# llava-hf's template without `{% generation %}` markers: the dataset falls back to prefix rendering.
NO_MARKERS_TEMPLATE = LLAVA_HF_CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")


@pytest.fixture(scope="module")
def processor():
    return build_processor(build_word_tokenizer(WORDS), image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)


@pytest.fixture(scope="module")
def fallback_processor(processor):
    return build_processor(processor.tokenizer, IMAGE_SIZE, PATCH_SIZE, chat_template=NO_MARKERS_TEMPLATE)


@pytest.fixture(scope="module")
def sp_tokenizer():
    """A Llama-style tokenizer: "▁word" pieces that carry the space before them, `<s>` prepended."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    corpus = ["USER: what color is it? ASSISTANT: red.", "USER: and the shape? ASSISTANT: a square."] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"], show_progress=False
    )
    backend.train_from_iterator(corpus, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


SP_RECORD = {
    "id": "sp",
    "image": "red.png",
    "conversations": [
        {"from": "human", "value": "<image>\nwhat color is it?"},
        {"from": "gpt", "value": "red."},
        {"from": "human", "value": "and the shape?"},
        {"from": "gpt", "value": "a square."},
    ],
}


@pytest.fixture
def image_folder(tmp_path):
    Image.new("RGB", (20, 16), (220, 30, 30)).save(tmp_path / "red.png")
    Image.new("RGB", (16, 24), (30, 30, 220)).save(tmp_path / "blue.png")
    (tmp_path / "garbage.png").write_bytes(b"this is not an image")
    noise = torch.randint(0, 256, (64, 64, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(noise.numpy()).save(tmp_path / "full.jpg", quality=95)  # noise: the data dwarfs the header
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return tmp_path


def _dataset(records, processor, image_folder, **kwargs) -> LlavaInstructDataset:
    return LlavaInstructDataset(records, processor, image_folder, **kwargs)


def test_vocabulary_ids_match_the_hand_written_constants(processor):
    vocab = processor.tokenizer.get_vocab()
    assert [vocab[word] for word in WORDS] == list(range(8, 22))
    assert [vocab[token] for token in ("<s>", "</s>", "<pad>", "<image>", "USER:", "ASSISTANT:", "\n")] == [
        BOS,
        EOS,
        PAD,
        IMG,
        USER,
        ASSISTANT,
        NL,
    ]


@pytest.mark.parametrize(
    ("record", "expected_ids", "expected_labels", "num_images"),
    [(SINGLE, SINGLE_IDS, SINGLE_LABELS, 1), (MULTI, MULTI_IDS, MULTI_LABELS, 1), (TEXT, TEXT_IDS, TEXT_LABELS, 0)],
    ids=["single-turn", "multi-turn", "text-only"],
)
def test_encoding_is_exact(processor, image_folder, record, expected_ids, expected_labels, num_images):
    sample = _dataset([record], processor, image_folder)[0]
    assert sample["id"] == record["id"]
    assert sample["input_ids"].tolist() == expected_ids
    assert sample["labels"].tolist() == expected_labels
    if num_images:
        assert sample["pixel_values"].shape == (num_images, 3, IMAGE_SIZE, IMAGE_SIZE)
    else:
        assert "pixel_values" not in sample


def test_loss_on_every_text_token_when_not_assistant_only(processor, image_folder):
    sample = _dataset([MULTI], processor, image_folder, assistant_only_loss=False)[0]
    assert sample["input_ids"].tolist() == MULTI_IDS
    # Everything but the image placeholders and the token right after them: the next-token loss of pretraining (the
    # BOS label is never predicted). That token would be predicted from the image's last token, which ADSC drops at
    # its first pruning layer when an image keeps fewer than half its tokens.
    follows_image = [False] + [previous == IMG for previous in MULTI_IDS[:-1]]
    assert sample["labels"].tolist() == [
        X if token == IMG or after else token for token, after in zip(MULTI_IDS, follows_image, strict=True)
    ]
    assert sum(after and token != IMG for token, after in zip(MULTI_IDS, follows_image, strict=True)) == 1


def test_llava_hf_template_gets_eos_appended(processor, fallback_processor, image_folder):
    # llava-hf's template renders no `</s>`: the dataset appends it to each answer, with or without markers.
    for chat_processor in (processor, fallback_processor):
        dataset = _dataset([MULTI], chat_processor, image_folder)
        assert dataset.encoder.append_eos is True
        assert dataset.encoder.render(dataset.conversation(0)).count("</s>") == 2


@pytest.mark.parametrize(
    "template",
    [EOS_EMITTING_TEMPLATE, EOS_AFTER_MARKERS_TEMPLATE, EOS_INSIDE_MARKERS_TEMPLATE],
    ids=["no-markers", "eos-after-markers", "eos-inside-markers"],
)
def test_eos_template_does_not_get_a_second_eos(processor, image_folder, template):
    # A template that emits `</s>` must not get two, and its `</s>` is supervised even when written after the block.
    eos_processor = build_processor(processor.tokenizer, IMAGE_SIZE, PATCH_SIZE, chat_template=template)
    dataset = _dataset([MULTI, TEXT], eos_processor, image_folder)
    assert dataset.encoder.append_eos is False
    assert dataset.encoder.uses_generation_markers == (template != EOS_EMITTING_TEMPLATE)
    assert dataset.encoder.render(dataset.conversation(0)).count("</s>") == 2
    assert dataset[0]["input_ids"].tolist() == MULTI_IDS and dataset[0]["labels"].tolist() == MULTI_LABELS
    assert dataset[1]["input_ids"].tolist() == TEXT_IDS and dataset[1]["labels"].tolist() == TEXT_LABELS


@pytest.mark.parametrize("markers", [True, False], ids=["markers", "fallback"])
def test_labels_with_a_sentencepiece_style_tokenizer(sp_tokenizer, image_folder, markers):
    """With Llama-style "▁word" pieces, the space-carrying token after `</s>` must stay unsupervised."""
    template = LLAVA_HF_CHAT_TEMPLATE if markers else NO_MARKERS_TEMPLATE
    sp_processor = build_processor(sp_tokenizer, IMAGE_SIZE, PATCH_SIZE, chat_template=template)
    sample = _dataset([SP_RECORD], sp_processor, image_folder)[0]
    supervised = sample["labels"][sample["labels"] != IGNORE_INDEX].tolist()
    assert sp_tokenizer.convert_ids_to_tokens(supervised) == ["▁red.", "</s>", "▁a", "▁square.", "</s>"]
    assert int((sample["input_ids"] == sp_tokenizer.convert_tokens_to_ids("<image>")).sum()) == 4
    # The template's space after the last `</s>` adds no trailing "▁" token, and the light length check agrees.
    assert sample["input_ids"][-1] == sp_tokenizer.eos_token_id
    dataset = _dataset([SP_RECORD], sp_processor, image_folder)
    assert dataset.encoder.count_tokens(dataset.conversation(0), (20, 16)) == len(sample["input_ids"])


def test_collator_mixed_batch_is_exact(processor, image_folder):
    dataset = _dataset([SINGLE, TEXT, MULTI], processor, image_folder)
    items = [dataset[0], dataset[1], dataset[2]]
    batch = LlavaDataCollator.from_processor(processor)(items)
    width = len(MULTI_IDS)
    assert batch["input_ids"].tolist() == [
        SINGLE_IDS + [PAD] * (width - len(SINGLE_IDS)),
        TEXT_IDS + [PAD] * (width - len(TEXT_IDS)),
        MULTI_IDS,
    ]
    assert batch["labels"].tolist() == [
        SINGLE_LABELS + [X] * (width - len(SINGLE_IDS)),
        TEXT_LABELS + [X] * (width - len(TEXT_IDS)),
        MULTI_LABELS,
    ]
    assert batch["attention_mask"].tolist() == [
        [1] * len(SINGLE_IDS) + [0] * (width - len(SINGLE_IDS)),
        [1] * len(TEXT_IDS) + [0] * (width - len(TEXT_IDS)),
        [1] * width,
    ]
    # Only the two image rows contribute pixels, in order of appearance.
    assert torch.equal(batch["pixel_values"], torch.cat([items[0]["pixel_values"], items[2]["pixel_values"]]))

    # The batch is what LlavaForConditionalGeneration.forward takes (it checks image tokens against features).
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(tiny_llava_config_for(processor, IMAGE_SIZE, PATCH_SIZE, text_layers=2))
    with torch.no_grad():
        output = model(**batch)
    assert torch.isfinite(output.loss)


def test_collator_text_only_batch_has_no_pixel_values(processor, image_folder):
    dataset = _dataset([TEXT, TEXT], processor, image_folder)
    batch = LlavaDataCollator.from_processor(processor)([dataset[0], dataset[1]])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [TEXT_IDS, TEXT_IDS]


def test_collator_left_padding_and_multiple_of(processor, image_folder):
    dataset = _dataset([TEXT, SINGLE], processor, image_folder)
    collator = LlavaDataCollator(pad_token_id=PAD, padding_side="left", pad_to_multiple_of=8)
    batch = collator([dataset[0], dataset[1]])
    assert batch["input_ids"].tolist() == [[PAD] * 9 + TEXT_IDS, SINGLE_IDS]
    assert batch["labels"].tolist() == [[X] * 9 + TEXT_LABELS, SINGLE_LABELS]
    assert batch["attention_mask"].tolist() == [[0] * 9 + [1] * 7, [1] * 16]


def test_collator_rejects_bad_features():
    collator = LlavaDataCollator(pad_token_id=PAD)
    with pytest.raises(ValueError, match="empty batch"):
        collator([])
    with pytest.raises(ValueError, match="must be equal 1-D"):
        collator([{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([1, 2])}])
    mismatched = [
        {"input_ids": torch.tensor([1]), "labels": torch.tensor([1]), "pixel_values": torch.zeros(1, 3, 8, 8)},
        {"input_ids": torch.tensor([1]), "labels": torch.tensor([1]), "pixel_values": torch.zeros(1, 3, 16, 16)},
    ]
    with pytest.raises(ValueError, match="same processed shape"):
        collator(mismatched)


def _conv(*pairs):
    return [{"from": role, "value": value} for role, value in pairs]


BAD_RECORDS = {
    "missing_image": {"id": "b1", "image": "nope.png", "conversations": SINGLE["conversations"]},
    "unreadable_image": {"id": "b2", "image": "garbage.png", "conversations": SINGLE["conversations"]},
    "no_conversations": {"id": "b3", "image": "red.png"},
    "empty_conversations": {"id": "b4", "conversations": []},
    "unknown_role": {"id": "b5", "conversations": _conv(("human", "hello"), ("bot", "hi"))},
    "not_alternating": {"id": "b6", "conversations": _conv(("human", "hello"), ("human", "hello"), ("gpt", "hi"))},
    "unanswered": {"id": "b7", "conversations": _conv(("human", "hello"), ("gpt", "hi"), ("human", "hello"))},
    "not_an_object": ["hello", "hi"],
    "value_not_string": {"id": "b9", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "hi"}]},
    "image_token_no_image": {"id": "b10", "conversations": _conv(("human", "<image>\nhello"), ("gpt", "hi"))},
    "too_long": {
        "id": "b11",
        "image": "red.png",
        "conversations": _conv(("human", "<image>\nwhat color is it ?"), ("gpt", "red . " * 2000)),
    },
}
EXPECTED_REASON = {
    "missing_image": "missing_image",
    "unreadable_image": "unreadable_image",
    "no_conversations": "no_conversations",
    "empty_conversations": "no_conversations",
    "unknown_role": "malformed_roles",
    "not_alternating": "malformed_roles",
    "unanswered": "malformed_roles",
    "not_an_object": "malformed_record",
    "value_not_string": "malformed_record",
    "image_token_no_image": "image_token_without_image",
    "too_long": "too_long",
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_raises_clear_error(processor, image_folder, case):
    dataset = _dataset([TEXT, BAD_RECORDS[case]], processor, image_folder, on_bad_record="error")
    assert dataset[0]["id"] == "text"
    with pytest.raises(BadRecordError) as info:
        dataset[1]
    record_id = "#1" if case == "not_an_object" else BAD_RECORDS[case]["id"]
    assert info.value.reason == EXPECTED_REASON[case]
    assert info.value.record_id == record_id
    assert f"'{record_id}'" in str(info.value) and EXPECTED_REASON[case] in str(info.value)
    # The up-front scan checks everything and reports the same problem (dataset left unchanged).
    with pytest.raises(DataValidationError, match=f"{record_id}.*{EXPECTED_REASON[case]}"):
        dataset.scan(show_progress=False)
    assert len(dataset) == 2


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_record_is_skipped_and_counted_by_scan(processor, image_folder, case):
    dataset = _dataset([SINGLE, BAD_RECORDS[case], TEXT], processor, image_folder, on_bad_record="skip")
    stats = dataset.scan(show_progress=False)
    assert dict(stats.skipped) == {EXPECTED_REASON[case]: 1}
    assert (stats.checked, stats.kept, stats.num_skipped) == (3, 2, 1)
    assert len(dataset) == 2 and [dataset[i]["id"] for i in range(2)] == ["single", "text"]
    assert len(dataset.modality_lengths()) == 2
    assert EXPECTED_REASON[case] in stats.summary()


def test_scan_in_worker_processes_matches_in_process(processor, image_folder):
    records = [SINGLE, BAD_RECORDS["missing_image"], TEXT, BAD_RECORDS["unknown_role"], MULTI]
    serial = _dataset(records, processor, image_folder, on_bad_record="skip")
    parallel = _dataset(records, processor, image_folder, on_bad_record="skip")
    serial_stats = serial.scan(show_progress=False)
    parallel_stats = parallel.scan(num_workers=2, show_progress=False)
    assert parallel_stats == serial_stats and dict(serial_stats.skipped) == {"missing_image": 1, "malformed_roles": 1}
    assert parallel.indices == serial.indices == [0, 2, 4]


def test_lazy_skip_uses_next_record_and_counts(processor, image_folder, caplog):
    records = [BAD_RECORDS["missing_image"], BAD_RECORDS["unknown_role"], TEXT]
    dataset = _dataset(records, processor, image_folder, on_bad_record="skip")
    with caplog.at_level(logging.WARNING, logger="adsc_llava.train.dataset"):
        sample = dataset[0]
    assert sample["id"] == "text"
    assert dict(dataset.stats.skipped) == {"missing_image": 1, "malformed_roles": 1}
    assert "b1" in caplog.text and "b5" in caplog.text
    assert len(dataset) == 3  # lazy skips never change the length the sampler was built for
    with pytest.raises(IndexError):
        dataset[3]
    assert [sample["id"] for sample in dataset] == ["text"] * 3  # plain iteration stops at the end


def test_truncated_image_needs_decoding_to_be_caught(processor, image_folder):
    record = {"id": "trunc", "image": "truncated.jpg", "conversations": SINGLE["conversations"]}
    light = _dataset([record, TEXT], processor, image_folder, on_bad_record="skip")
    assert light.scan(show_progress=False).num_skipped == 0  # the JPEG header is intact
    full = _dataset([record, TEXT], processor, image_folder, on_bad_record="skip")
    assert dict(full.scan(decode_images=True, show_progress=False).skipped) == {"unreadable_image": 1}
    with pytest.raises(BadRecordError, match="unreadable_image"):
        _dataset([record], processor, image_folder)[0]


@pytest.mark.parametrize("decode_images", [False, True])
def test_scan_length_check_is_exact(processor, image_folder, decode_images):
    # The light check counts image tokens without processing pixels; it must agree with the real encoding.
    exact = len(MULTI_IDS)
    fits = _dataset([MULTI], processor, image_folder, max_length=exact)
    assert fits.scan(decode_images=decode_images, show_progress=False).kept == 1
    short = _dataset([MULTI, TEXT], processor, image_folder, max_length=exact - 1, on_bad_record="skip")
    assert dict(short.scan(decode_images=decode_images, show_progress=False).skipped) == {"too_long": 1}


def test_truncation_never_splits_an_image(processor, image_folder):
    # Cut right after the first answer's </s>: allowed, labels follow the cut.
    dataset = _dataset([MULTI], processor, image_folder, max_length=16, truncate_long_samples=True)
    sample = dataset[0]
    assert sample["input_ids"].tolist() == SINGLE_IDS and sample["labels"].tolist() == SINGLE_LABELS
    # Cut inside the image placeholders (positions 2-5): rejected even though truncation is on.
    with pytest.raises(BadRecordError, match="too_long"):
        _dataset([MULTI], processor, image_folder, max_length=4, truncate_long_samples=True)[0]
    # Cut before any answer token: nothing left to learn, rejected.
    with pytest.raises(BadRecordError, match="too_long"):
        _dataset([MULTI], processor, image_folder, max_length=12, truncate_long_samples=True)[0]


def test_generation_markers_are_detected():
    assert data.has_generation_markers(LLAVA_HF_CHAT_TEMPLATE)
    assert data.has_generation_markers("{%- generation -%}{{ x }}{%- endgeneration -%}")
    assert data.has_generation_markers({"default": "{%generation%}{{ x }}{%endgeneration%}"})
    assert not data.has_generation_markers(NO_MARKERS_TEMPLATE)
    assert not data.has_generation_markers(None)


@pytest.mark.parametrize("assistant_only_loss", [True, False], ids=["assistant-only", "all-text"])
@pytest.mark.parametrize("record", [SINGLE, MULTI, TEXT], ids=["single-turn", "multi-turn", "text-only"])
def test_marker_and_fallback_paths_agree(processor, fallback_processor, image_folder, record, assistant_only_loss):
    marked = _dataset([record], processor, image_folder, assistant_only_loss=assistant_only_loss)
    fallback = _dataset([record], fallback_processor, image_folder, assistant_only_loss=assistant_only_loss)
    assert marked.encoder.uses_generation_markers and not fallback.encoder.uses_generation_markers
    expected, actual = marked[0], fallback[0]
    assert set(actual) == set(expected)
    for key in ("input_ids", "labels", "pixel_values"):
        if key in expected:
            assert actual[key].dtype == expected[key].dtype and torch.equal(actual[key], expected[key]), key
    if assistant_only_loss:
        ids, labels = {"single": (SINGLE_IDS, SINGLE_LABELS), "multi": (MULTI_IDS, MULTI_LABELS)}.get(
            record["id"], (TEXT_IDS, TEXT_LABELS)
        )
        assert actual["input_ids"].tolist() == ids and actual["labels"].tolist() == labels


@pytest.mark.parametrize("assistant_only_loss", [True, False], ids=["assistant-only", "all-text"])
def test_marker_and_fallback_paths_agree_with_a_sentencepiece_style_tokenizer(
    sp_tokenizer, image_folder, assistant_only_loss
):
    samples = [
        _dataset(
            [SP_RECORD],
            build_processor(sp_tokenizer, IMAGE_SIZE, PATCH_SIZE, chat_template=template),
            image_folder,
            assistant_only_loss=assistant_only_loss,
        )[0]
        for template in (LLAVA_HF_CHAT_TEMPLATE, NO_MARKERS_TEMPLATE)
    ]
    assert torch.equal(samples[0]["input_ids"], samples[1]["input_ids"])
    assert torch.equal(samples[0]["labels"], samples[1]["labels"])


def test_prefix_rendering_spans_run_from_answer_through_eos(fallback_processor):
    messages = data._with_eos(data.record_to_conversation(MULTI, 0).messages, "</s>")
    rendered = data.render_conversation(fallback_processor, messages)
    assert [rendered.text[start:end] for start, end in rendered.assistant_spans] == ["red .</s>", "square .</s>"]
    assert rendered.text.endswith("square .</s>")


@pytest.mark.parametrize("markers", [True, False], ids=["markers", "fallback"])
def test_template_that_writes_bos_gets_no_second_bos(processor, image_folder, markers):
    template = "{{ bos_token }}" + (LLAVA_HF_CHAT_TEMPLATE if markers else NO_MARKERS_TEMPLATE)
    bos_processor = build_processor(processor.tokenizer, IMAGE_SIZE, PATCH_SIZE, chat_template=template)
    dataset = _dataset([MULTI, TEXT], bos_processor, image_folder)
    assert dataset.encoder.uses_generation_markers is markers
    assert dataset[0]["input_ids"].tolist() == MULTI_IDS and dataset[0]["labels"].tolist() == MULTI_LABELS
    assert dataset[1]["input_ids"].tolist() == TEXT_IDS and dataset[1]["labels"].tolist() == TEXT_LABELS
    assert dataset.scan(show_progress=False).kept == 2
    exact = _dataset([MULTI], bos_processor, image_folder, max_length=len(MULTI_IDS))
    assert exact.scan(show_progress=False).kept == 1


@pytest.mark.parametrize("markers", [True, False], ids=["markers", "fallback"])
def test_template_that_rewrites_answers(processor, image_folder, markers):
    # `| trim` changes what the template writes for each answer; both paths locate what it wrote.
    trimming = LLAVA_HF_CHAT_TEMPLATE.replace(
        "{{ content['text'] + ' '}}{% endgeneration %}", "{{ content['text'] | trim + ' '}}{% endgeneration %}"
    )
    assert trimming != LLAVA_HF_CHAT_TEMPLATE
    if not markers:
        trimming = trimming.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    trimming_processor = build_processor(processor.tokenizer, IMAGE_SIZE, PATCH_SIZE, chat_template=trimming)
    padded = {**MULTI, "conversations": [{**turn, "value": f"  {turn['value']}  "} for turn in MULTI["conversations"]]}
    dataset = _dataset([padded], trimming_processor, image_folder)
    assert dataset.encoder.uses_generation_markers is markers
    sample = dataset[0]
    assert sample["input_ids"].tolist() == MULTI_IDS and sample["labels"].tolist() == MULTI_LABELS


def test_template_that_is_not_prefix_stable_is_rejected(processor, image_folder):
    # Without generation markers, prefixes that start with a different count cannot locate the answers.
    counting = "{{ messages | length }} " + EOS_EMITTING_TEMPLATE
    unstable = build_processor(processor.tokenizer, IMAGE_SIZE, PATCH_SIZE, chat_template=counting)
    with pytest.raises(ChatTemplateError, match="prefix"):
        _dataset([TEXT], unstable, image_folder, on_bad_record="skip")[0]
    with pytest.raises(ChatTemplateError, match="prefix"):
        _dataset([TEXT], unstable, image_folder, on_bad_record="skip").scan(show_progress=False)


def test_generation_block_without_eos_is_rejected(processor, image_folder):
    # Markers around the user's text instead of the answer: the marked tokens are not an answer closed by EOS.
    user_marked = NO_MARKERS_TEMPLATE.replace(
        "{% if message['role'] != 'assistant' %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] + ' '}}",
        "{% if message['role'] != 'assistant' %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}",
    )
    assert data.has_generation_markers(user_marked)
    marked_processor = build_processor(processor.tokenizer, IMAGE_SIZE, PATCH_SIZE, chat_template=user_marked)
    # Caught when the dataset is built, before any record is encoded.
    with pytest.raises(ChatTemplateError, match="not closed by the EOS token"):
        _dataset([TEXT], marked_processor, image_folder, on_bad_record="skip")


def test_invalid_arguments(processor, image_folder):
    with pytest.raises(ValueError, match="on_bad_record"):
        _dataset([TEXT], processor, image_folder, on_bad_record="ignore")
    with pytest.raises(ValueError, match="max_length"):
        _dataset([TEXT], processor, image_folder, max_length=0)


def test_from_json_and_jsonl(processor, image_folder):
    (image_folder / "data.json").write_text(json.dumps([SINGLE, TEXT]))
    (image_folder / "data.jsonl").write_text("\n".join(json.dumps(r) for r in [SINGLE, TEXT]) + "\n")
    for name in ("data.json", "data.jsonl"):
        dataset = LlavaInstructDataset.from_json(image_folder / name, processor, image_folder)
        assert [dataset[i]["input_ids"].tolist() for i in range(2)] == [SINGLE_IDS, TEXT_IDS]
    (image_folder / "object.json").write_text(json.dumps({"id": "x"}))
    with pytest.raises(ValueError, match="JSON list"):
        load_records(image_folder / "object.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_records(image_folder / "missing.json")


def test_modality_lengths_follow_llava(processor, image_folder):
    dataset = _dataset([SINGLE, TEXT, MULTI], processor, image_folder)
    # Whitespace-separated words of all turns ("<image>" included, as in LLaVA); negative for text-only records.
    assert dataset.modality_lengths() == [8, -3, 14]


def _megabatches(order, size):
    return [order[i : i + size] for i in range(0, len(order), size)]


def test_modality_grouped_sampler_groups_and_is_reproducible():
    lengths = [5, 9, 3, 12, 7, 4, 10, 6, 8, 11] + [-2, -6, -3, -9, -4, -7, -5]
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=2, world_size=2, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths))) and len(sampler) == len(lengths)
    mixed = [batch for batch in _megabatches(order, 4) if len({lengths[i] > 0 for i in batch}) > 1]
    assert len(mixed) <= 1  # only LLaVA's leftover megabatch may mix modalities
    assert list(ModalityLengthGroupedSampler(lengths, batch_size=2, world_size=2, seed=3)) == order
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(sampler) == list(range(len(lengths)))


def test_sampler_from_training_args(tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=3, gradient_accumulation_steps=2, seed=7, use_cpu=True
    )
    sampler = ModalityLengthGroupedSampler.from_training_args([4, -2, 5], args)
    assert (sampler.batch_size, sampler.world_size, sampler.seed) == (3, 2, 7)


def test_modality_grouping_sorts_each_megabatch_longest_first():
    lengths = [5, 9, 3, 12, 7, 4, 10, 6] + [-2, -6, -3, -9]
    order = get_modality_length_grouped_indices(lengths, 4, 1, torch.Generator().manual_seed(0))
    for batch in _megabatches(order, 4):
        sizes = [abs(lengths[i]) for i in batch]
        assert len({lengths[i] > 0 for i in batch}) == 1 and sizes == sorted(sizes, reverse=True)


def test_single_modality_falls_back_to_length_grouping():
    lengths = [3, 1, 2, 5]
    order = get_modality_length_grouped_indices(lengths, 2, 1, torch.Generator().manual_seed(0))
    assert sorted(order) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="non-zero"):
        get_modality_length_grouped_indices([1, 0], 2, 1)


def test_dataloader_with_sampler_and_collator(processor, image_folder):
    dataset = _dataset([SINGLE, TEXT, MULTI, TEXT, SINGLE, TEXT], processor, image_folder)
    sampler = ModalityLengthGroupedSampler(dataset.modality_lengths(), batch_size=2, seed=0)
    loader = DataLoader(dataset, batch_size=2, sampler=sampler, collate_fn=LlavaDataCollator.from_processor(processor))
    batches = list(loader)
    assert sum(len(batch["input_ids"]) for batch in batches) == 6
    num_images = sum(len(batch.get("pixel_values", [])) for batch in batches)
    assert num_images == 3
    for batch in batches:
        assert int((batch["input_ids"] == IMG).sum()) == 4 * len(batch.get("pixel_values", []))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    turns=st.lists(
        st.tuples(st.lists(st.sampled_from(WORDS), max_size=4), st.lists(st.sampled_from(WORDS), max_size=4)),
        min_size=1,
        max_size=4,
    ),
    with_image=st.booleans(),
)
def test_supervised_tokens_are_exactly_the_answers(processor, fallback_processor, image_folder, turns, with_image):
    conversations = []
    for question, answer in turns:
        conversations += [{"from": "human", "value": " ".join(question)}, {"from": "gpt", "value": " ".join(answer)}]
    record = {"id": "random", "conversations": conversations, **({"image": "red.png"} if with_image else {})}
    sample = _dataset([record], processor, image_folder)[0]
    fallback = _dataset([record], fallback_processor, image_folder)[0]
    assert torch.equal(sample["input_ids"], fallback["input_ids"])
    assert torch.equal(sample["labels"], fallback["labels"])
    labels, input_ids = sample["labels"], sample["input_ids"]
    supervised = labels[labels != IGNORE_INDEX].tolist()
    vocab = processor.tokenizer.get_vocab()
    assert supervised == [token for _, answer in turns for token in [vocab[word] for word in answer] + [EOS]]
    assert torch.equal(labels[labels != IGNORE_INDEX], input_ids[labels != IGNORE_INDEX])
    assert int((input_ids == IMG).sum()) == (4 if with_image else 0) and input_ids[0] == BOS
    # Every answer starts right after an ASSISTANT: token.
    starts = [i for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX]
    assert all(input_ids[i - 1] == ASSISTANT for i in starts) and len(starts) == len(turns)


# --------------------------------------------------------------------------------------------------------------
# LLaVA's conventions, and one scan for every process and every resume
# --------------------------------------------------------------------------------------------------------------


def test_a_leading_answer_is_dropped_as_llava_does(processor, image_folder):
    leading = {**MULTI, "id": "leading", "conversations": [{"from": "gpt", "value": "hi"}, *MULTI["conversations"]]}
    sample = _dataset([leading], processor, image_folder)[0]
    assert sample["input_ids"].tolist() == MULTI_IDS and sample["labels"].tolist() == MULTI_LABELS
    only_answer = {"id": "only", "conversations": [{"from": "gpt", "value": "hi"}]}
    with pytest.raises(BadRecordError, match="no_conversations"):
        _dataset([only_answer], processor, image_folder)[0]


def test_placeholder_counts_by_image_size_equal_what_the_processor_writes():
    """The scan counts an image's placeholders from its size without processing pixels; that count must be the one
    the processor writes, for LLaVA-1.5 (constant) and LLaVA-NeXT (grid and aspect ratio dependent) alike."""
    tokenizer = build_word_tokenizer(WORDS)
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    generator = torch.Generator().manual_seed(0)
    sizes = [(1, 500), (500, 1), (336, 336), *torch.randint(8, 1400, (16, 2), generator=generator).tolist()]
    for processor in (build_processor(tokenizer, 336, 14), build_next_processor(tokenizer, 336, 14, pinpoints)):
        encoder = data.ConversationEncoder(processor)
        counts = [encoder.image_tokens_for_size(width, height) for width, height in sizes]
        assert counts == [encoder.measured_image_tokens(width, height) for width, height in sizes]
    assert len(set(counts)) > 5  # NeXT's counts do depend on the size


def test_the_scan_is_kept_and_reused_until_the_data_or_the_settings_change(processor, image_folder, monkeypatch):
    data_file = image_folder / "data.json"
    data_file.write_text(json.dumps([SINGLE, BAD_RECORDS["missing_image"], TEXT]))
    cache_file = image_folder / "out" / "data-scan.json"

    def scanned(**kwargs):
        dataset = LlavaInstructDataset.from_json(data_file, processor, image_folder, on_bad_record="skip", **kwargs)
        stats, how = scan_once(dataset, cache_file, show_progress=False)
        return dataset, stats, how

    first, stats, how = scanned()
    assert how.startswith("scanned") and first.indices == [0, 2] and dict(stats.skipped) == {"missing_image": 1}
    checks = []
    monkeypatch.setattr(LlavaInstructDataset, "check", lambda self, index, **kwargs: checks.append(index))
    again, stats_again, how = scanned()  # a rerun or --resume into the same output folder
    assert how == f"reused {cache_file}" and checks == []
    assert again.indices == first.indices and stats_again == stats
    scanned(max_length=1000)  # other settings: scanned again
    assert checks == [0, 1, 2]
    data_file.write_text(json.dumps([SINGLE, TEXT]))  # other data: scanned again
    scanned()
    assert checks == [0, 1, 2, 0, 1]


# One of two processes (gloo) scanning together; rank 1's file system "loses" every image it looks at.
SCAN_AS_RANK = """
import json, sys
from pathlib import Path
import torch
from adsc_llava.testing import build_processor, build_word_tokenizer
from adsc_llava.train import dataset as dataset_module
from adsc_llava.train.data import BadRecordError

rank, port, folder, words = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), json.loads(sys.argv[4])
torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
processor = build_processor(build_word_tokenizer(words), image_size=16, patch_size=8)
checked, check_image_file = [], dataset_module.check_image_file

def flaky_check_image_file(path, record_id):
    checked.append(record_id)
    if rank == 1:
        raise BadRecordError(record_id, "missing_image", "a file system hiccup on rank 1 only")
    return check_image_file(path, record_id)

dataset_module.check_image_file = flaky_check_image_file
dataset = dataset_module.LlavaInstructDataset.from_json(folder / "data.json", processor, folder, on_bad_record="skip")
stats, _ = dataset_module.scan_once(dataset, folder / "out" / "data-scan.json", show_progress=False)
result = {"indices": dataset.indices, "checked": checked, "summary": stats.summary()}
(folder / f"rank{rank}.json").write_text(json.dumps(result))
torch.distributed.destroy_process_group()
"""


def test_two_processes_scan_half_each_and_serve_the_same_records(image_folder):
    """Each process checks its share and they exchange what they found: whatever one process alone saw, both
    serve the same records (a process that scanned everything itself would serve a data set of its own)."""
    records = [{**SINGLE, "id": f"image_{index}"} for index in range(6)] + [TEXT]
    (image_folder / "data.json").write_text(json.dumps(records))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    arguments = [str(port), str(image_folder), json.dumps(WORDS)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", SCAN_AS_RANK, str(rank), *arguments], env=env) for rank in (0, 1)]
    assert [process.wait(timeout=300) for process in ranks] == [0, 0]
    first, second = (json.loads((image_folder / f"rank{rank}.json").read_text()) for rank in range(2))
    assert first["indices"] == second["indices"] == [0, 2, 4, 6]  # rank 1's records 1, 3, 5 lost for both
    summary = "checked 7, kept 4, skipped 3 (missing_image: 3 e.g. ['image_1', 'image_3', 'image_5'])"
    assert first["summary"] == second["summary"] == summary
    assert first["checked"] == ["image_0", "image_2", "image_4"]
    assert second["checked"] == ["image_1", "image_3", "image_5"]
    assert (image_folder / "out" / "data-scan.json").is_file()
