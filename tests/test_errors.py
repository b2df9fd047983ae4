"""Bad input gets a clear error that names the problem, never a silent wrong answer."""

import pytest
import torch
from transformers import GemmaConfig, StaticCache

from adsc_llava import AdscLlavaConfig, AdscLlavaForConditionalGeneration

from conftest import IMAGE_TOKEN_ID, TOKENS_PER_IMAGE, make_batch, tiny_adsc_model, tiny_config


def test_image_token_count_must_match_image_features():
    model = tiny_adsc_model(pruning_layers=[1], drop_ratio=0.5)
    batch = make_batch([1, 1])
    batch["pixel_values"] = batch["pixel_values"][:1]  # two image spans, one image
    with pytest.raises(ValueError, match=r"holds 32 image tokens but the images give 16 features"):
        model(**batch)


def test_truncated_image_span_is_rejected():
    model = tiny_adsc_model(pruning_layers=[1], drop_ratio=0.5)
    batch = make_batch([1, 1])
    # Row 0 loses 4 image tokens and row 1 gains 4: the totals still match the features, the spans do not.
    row0 = batch["input_ids"][0]
    image_positions = (row0 == IMAGE_TOKEN_ID).nonzero().flatten()
    row0[image_positions[-4:]] = 5
    row1 = batch["input_ids"][1]
    row1[(row1 != IMAGE_TOKEN_ID).nonzero().flatten()[-4:]] = IMAGE_TOKEN_ID
    expected = rf"Truncated image span: every image \(or video\) needs .* consecutive run of \[{TOKENS_PER_IMAGE}, "
    with pytest.raises(ValueError, match=expected):
        model(**batch)


def test_non_llama_text_model_is_rejected_on_construction():
    config_dict = tiny_config().to_dict()
    config_dict["text_config"] = GemmaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2).to_dict()
    with pytest.raises(ValueError, match=r"supports Llama-style text models .* got text_config.model_type='gemma'"):
        AdscLlavaForConditionalGeneration(AdscLlavaConfig(**config_dict))


@pytest.mark.parametrize("text_model_type", ["mistral", "qwen2"])
def test_other_llama_style_text_models_are_accepted(text_model_type):
    config = tiny_config(pruning_layers=[1], drop_ratio=0.5, text_model_type=text_model_type)
    config.text_config.sliding_window = None
    model = AdscLlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        logits = model(**make_batch([1])).logits
    assert torch.isfinite(logits).all()


def test_sliding_window_text_model_is_rejected():
    config = tiny_config(text_model_type="mistral")
    config.text_config.sliding_window = 8
    with pytest.raises(ValueError, match="needs full attention in every layer"):
        AdscLlavaForConditionalGeneration(config)


def test_static_cache_is_rejected():
    model = tiny_adsc_model(pruning_layers=[1], drop_ratio=0.5)
    batch = make_batch([1])
    cache = StaticCache(config=model.config.text_config, max_cache_len=64)
    with pytest.raises(ValueError, match="cannot use a StaticCache: static .* same length"):
        model(**batch, cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="cannot use a StaticCache"):
        model.generate(**batch, max_new_tokens=2, cache_implementation="static")


def test_four_dimensional_attention_mask_is_rejected():
    model = tiny_adsc_model(pruning_layers=[1], drop_ratio=0.5)
    batch = make_batch([1])
    length = batch["input_ids"].shape[1]
    batch["attention_mask"] = torch.ones(1, 1, length, length)
    with pytest.raises(ValueError, match="needs the 2D padding mask"):
        model(**batch)


def test_schedule_edited_after_construction_is_validated_at_forward():
    model = tiny_adsc_model(pruning_layers=[1], drop_ratio=0.5)
    model.config.adsc_drop_ratio = 1.5
    with pytest.raises(ValueError, match=r"adsc_drop_ratio must be in \[0, 1\), got 1.5"):
        model(**make_batch([1]))
