"""Tests of the offline tiny builders: word tokenizer, LLaVA processor, chat template, tiny LLaVA config."""

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration, LlavaProcessor

from adsc_llava.testing import (
    LLAVA_HF_CHAT_TEMPLATE,
    build_processor,
    build_tiny_processor,
    build_word_tokenizer,
    init_patch_position_embeddings,
    sincos_2d_position_embeddings,
    tiny_llava_config,
    tiny_llava_config_for,
)

WORDS = ("what", "is", "this", "?", "a", "red", "square", ".", "and", "color")
# Ids by construction: specials 0-4, prompt words 5-7, then WORDS in order from 8.
UNK, BOS, EOS, PAD, IMG, USER, ASSISTANT, NL = range(8)
WHAT, IS, THIS, QMARK, A, RED, SQUARE, DOT, AND, COLOR = range(8, 18)


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(WORDS)


def _messages(*turns: str, image: bool = True) -> list[dict]:
    """Chat messages alternating user/assistant; the first user turn carries the image."""
    messages = []
    for position, text in enumerate(turns):
        content = [{"type": "text", "text": text}]
        if position == 0 and image:
            content.insert(0, {"type": "image"})
        messages.append({"role": "user" if position % 2 == 0 else "assistant", "content": content})
    return messages


def test_tokenizer_ids_and_prompt_words(tokenizer):
    encoding = tokenizer("USER: <image>\nwhat is this ? ASSISTANT: a red square .</s>")
    assert encoding["input_ids"] == [BOS, USER, IMG, NL, WHAT, IS, THIS, QMARK, ASSISTANT, A, RED, SQUARE, DOT, EOS]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS, EOS, PAD)
    assert tokenizer.convert_tokens_to_ids("<image>") == IMG
    assert tokenizer("zebra", add_special_tokens=False)["input_ids"] == [UNK]
    # Prompt words stay single tokens even when glued to other text.
    assert tokenizer("what\nUSER:is", add_special_tokens=False)["input_ids"] == [WHAT, NL, USER, IS]
    assert tokenizer.decode([WHAT, IS, RED, EOS], skip_special_tokens=True) == "what is red"


def test_tokenizer_rejects_empty_words():
    with pytest.raises(ValueError, match="non-empty strings"):
        build_word_tokenizer(["ok", ""])


def test_tokenizer_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "USER: <image>\nwhat color is this ? ASSISTANT: red .</s>"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token, loaded.unk_token) == (
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
    )
    assert loaded.image_token == "<image>"
    assert loaded.decode(tokenizer(text)["input_ids"]) == tokenizer.decode(tokenizer(text)["input_ids"])


@pytest.mark.parametrize(("image_size", "patch_size"), [(32, 8), (16, 8), (28, 14)])
def test_processor_expands_image_token(tokenizer, image_size, patch_size):
    processor = build_processor(tokenizer, image_size=image_size, patch_size=patch_size)
    image = Image.new("RGB", (image_size + 9, image_size + 3), (10, 200, 30))  # not square: resized + cropped
    encoding = processor(images=image, text="USER: <image>\nwhat is this ? ASSISTANT:", return_tensors="pt")
    num_image_tokens = (image_size // patch_size) ** 2
    assert int((encoding["input_ids"] == IMG).sum()) == num_image_tokens
    expected = [BOS, USER] + [IMG] * num_image_tokens + [NL, WHAT, IS, THIS, QMARK, ASSISTANT]
    assert encoding["input_ids"][0].tolist() == expected
    assert encoding["pixel_values"].shape == (1, 3, image_size, image_size)


def test_processor_rejects_size_not_multiple_of_patch(tokenizer):
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_processor(tokenizer, image_size=30, patch_size=8)


def test_processor_round_trip(tokenizer, tmp_path):
    processor = build_processor(tokenizer, image_size=32, patch_size=8)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, LlavaProcessor)
    assert loaded.chat_template == LLAVA_HF_CHAT_TEMPLATE
    image = Image.new("RGB", (40, 36), (200, 30, 30))
    text = "USER: <image>\nwhat color is this ? ASSISTANT:"
    original = processor(images=image, text=text, return_tensors="pt")
    reloaded = loaded(images=image, text=text, return_tensors="pt")
    assert torch.equal(original["input_ids"], reloaded["input_ids"])
    torch.testing.assert_close(original["pixel_values"], reloaded["pixel_values"])


def test_chat_template_single_turn(tokenizer):
    processor = build_processor(tokenizer, image_size=32, patch_size=8)
    prompt = processor.apply_chat_template(_messages("what is this ?"), add_generation_prompt=True)
    assert prompt == "USER: <image>\nwhat is this ? ASSISTANT:"
    without_prompt = processor.apply_chat_template(_messages("what is this ?"), add_generation_prompt=False)
    assert without_prompt == "USER: <image>\nwhat is this ? "


def test_chat_template_multi_turn(tokenizer):
    processor = build_processor(tokenizer, image_size=32, patch_size=8)
    messages = _messages("what is this ?", "a red square .", "and what color ?")
    # llava-hf's template: answers are followed by a space, not by `</s>` (train.data appends it for training).
    assert (
        processor.apply_chat_template(messages, add_generation_prompt=True)
        == "USER: <image>\nwhat is this ? ASSISTANT: a red square . USER: and what color ? ASSISTANT:"
    )
    text_only = processor.apply_chat_template(_messages("what is this ?", image=False), add_generation_prompt=True)
    assert text_only == "USER: what is this ? ASSISTANT:"


def test_tiny_llava_config_builds_a_working_model(tokenizer):
    processor = build_processor(tokenizer, image_size=32, patch_size=8)
    config = tiny_llava_config_for(processor, text_layers=2)
    assert config.text_config.vocab_size == len(tokenizer)
    assert (config.image_token_id, config.text_config.pad_token_id) == (IMG, PAD)
    assert config.tie_word_embeddings is False and config.image_seq_length == 16
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    inputs = processor(
        images=Image.new("RGB", (32, 32), (0, 0, 255)), text="USER: <image>\nwhat is this ?", return_tensors="pt"
    )
    with torch.no_grad():
        output = model(**inputs, labels=inputs["input_ids"])
    assert output.logits.shape == (1, inputs["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(output.loss)


def test_tiny_llava_config_validates_arguments():
    with pytest.raises(ValueError, match="vision_layers"):
        tiny_llava_config(vocab_size=32, image_token_id=4, pad_token_id=3, vision_layers=1)
    with pytest.raises(ValueError, match="vision_feature_layer"):
        tiny_llava_config(vocab_size=32, image_token_id=4, pad_token_id=3, vision_layers=2, vision_feature_layer=-3)
    with pytest.raises(ValueError, match="vision_feature_layer"):
        tiny_llava_config(vocab_size=32, image_token_id=4, pad_token_id=3, vision_feature_layer=0)
    with pytest.raises(ValueError, match="must lie in"):
        tiny_llava_config(vocab_size=32, image_token_id=40, pad_token_id=3)


def test_demo_processor_covers_demo_words():
    processor = build_tiny_processor()
    ids = processor.tokenizer("what color is the square ?", add_special_tokens=False)["input_ids"]
    assert processor.tokenizer.unk_token_id not in ids


def test_sincos_2d_codes_separate_rows_and_columns():
    grid, dim = 6, 32
    codes = sincos_2d_position_embeddings(grid, dim, scale=0.5).view(grid, grid, dim)
    row_half, column_half = codes[..., : dim // 2], codes[..., dim // 2 :]
    # The first half depends on the row only, the second on the column only; every patch gets its own code.
    assert torch.equal(row_half, row_half[:, :1].expand_as(row_half))
    assert torch.equal(column_half, column_half[:1].expand_as(column_half))
    assert torch.cdist(codes.view(-1, dim), codes.view(-1, dim)).add(torch.eye(grid * grid)).min() > 0.1
    assert codes.abs().max() <= 0.5 and torch.allclose(codes[0, 0, dim // 4 : dim // 2], torch.full((dim // 4,), 0.5))
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_2d_position_embeddings(grid, 30)


def test_init_patch_position_embeddings_keeps_cls_and_rope_theta_reaches_the_model():
    config = tiny_llava_config(32, 30, 31, image_size=16, patch_size=4, rope_theta=1e6)
    model = LlavaForConditionalGeneration(config)
    weight = model.model.vision_tower.embeddings.position_embedding.weight
    cls_before = weight[0].clone()
    init_patch_position_embeddings(model, scale=0.3)
    assert torch.equal(weight[0], cls_before)
    assert torch.equal(weight[1:], sincos_2d_position_embeddings(4, config.vision_config.hidden_size, 0.3))
    head_dim = config.text_config.hidden_size // config.text_config.num_attention_heads
    expected = 1.0 / 1e6 ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)
    torch.testing.assert_close(model.model.language_model.rotary_emb.inv_freq, expected)


def test_last_layer_features_and_initializer_range_reach_the_model():
    config = tiny_llava_config(
        32, 30, 31, image_size=16, patch_size=4, vision_layers=1, vision_feature_layer=-1, text_initializer_range=0.1
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    pixel_values = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        last = model.model.vision_tower(pixel_values).last_hidden_state[:, 1:]
        features = model.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
    # The one CLIP layer's output (CLS dropped, before CLIP's post-layernorm) goes through the projector.
    torch.testing.assert_close(torch.cat(list(features)), model.model.multi_modal_projector(last)[0])
    # The LM and the projector start at std 0.1 instead of Llama's 0.02; the CLIP tower keeps its own init.
    for weight in (
        model.model.language_model.layers[0].self_attn.q_proj.weight,
        model.lm_head.weight,
        model.model.multi_modal_projector.linear_1.weight,
    ):
        assert 0.08 < weight.std().item() < 0.12
    assert model.model.vision_tower.embeddings.patch_embedding.weight.std().item() < 0.05
