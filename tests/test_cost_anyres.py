"""The cost model for LLaVA-NeXT and LLaVA-OneVision inputs: token counts per image size or frame count, FLOPs, KV."""

import pytest
import torch
from test_next_onevision import IMAGE_ID, VIDEO_ID, build_batch, models
from torch.utils.flop_counter import FlopCounterMode

from adsc_llava.cost import adsc_config, anyres_image_tokens, estimate_cost, load_reference_config, video_tokens

# (H, W) -> (NeXT tokens, NeXT crops fed, OneVision tokens, OneVision crops fed), as the processors and models of
# transformers 5.24 count them for llava-v1.6 and llava-onevision 7B (the project's LLaVA facts file, section 2).
REAL_COUNTS = {
    (336, 336): (1176, 3, 1485, 2),
    (384, 384): (2928, 5, 1485, 2),
    (672, 672): (2928, 5, 3699, 5),
    (480, 640): (2340, 5, 2929, 5),
    (640, 480): (2352, 5, 2943, 5),
    (768, 1024): (2340, 5, 4725, 7),
    (1024, 768): (2352, 5, 4744, 7),
    (899, 1024): (2634, 5, 6551, 10),
    (1080, 1920): (1948, 5, 7269, 16),
    (1152, 1152): (2928, 5, 7371, 10),
    (2000, 3000): (2144, 5, 7329, 25),
}


@pytest.mark.parametrize("size", sorted(REAL_COUNTS))
def test_token_counts_of_the_real_processors(size):
    next_tokens, next_crops, onevision_tokens, onevision_crops = REAL_COUNTS[size]
    assert anyres_image_tokens(load_reference_config("llava-next-7b"), *size) == (next_tokens, next_crops)
    assert anyres_image_tokens(load_reference_config("llava-onevision-7b"), *size) == (
        onevision_tokens,
        onevision_crops,
    )


def test_video_token_counts():
    onevision = load_reference_config("llava-onevision-7b")
    assert [video_tokens(onevision, frames) for frames in (8, 16, 32)] == [1569, 3137, 6273]


@pytest.mark.parametrize("family", ["next", "onevision"])
@pytest.mark.parametrize("size", [(16, 16), (30, 14), (20, 40), (32, 32), (40, 64)])
def test_token_counts_equal_the_models_features(family, size):
    model, _ = models(family)
    from test_next_onevision import image_inputs

    with torch.no_grad():
        features = model.model.get_image_features(**image_inputs([size])).pooler_output
    assert anyres_image_tokens(model.config, *size)[0] == len(features[0])


def test_video_token_count_equals_the_models_features():
    model, _ = models("onevision")
    with torch.no_grad():
        features = model.model.get_video_features(torch.randn(1, 3, 3, 16, 16)).pooler_output
    assert video_tokens(model.config, 3) == features.shape[1]


@pytest.mark.parametrize("family, item", [("next", ("image", (20, 40))), ("onevision", ("image", (40, 64)))])
def test_prefill_flops_and_cache_bytes_equal_the_measured(family, item):
    """FlopCounterMode on a pruned prefill of one image, component by component, and the bytes the cache holds."""
    model, _ = models(family, attn="eager", pruning_layers=[1, 3], drop_ratio=0.6)
    batch = build_batch(model, [[4, item, 3]], family)
    inputs = {key: value for key, value in batch.items() if key != "unit_lengths"}
    prompt_tokens = int(((inputs["input_ids"] != IMAGE_ID) & (inputs["input_ids"] != VIDEO_ID)).sum())
    report = estimate_cost(
        model.config, prompt_tokens=prompt_tokens, new_tokens=1, image_size=item[1], lm_head_positions="all"
    )
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        cache = model(**inputs, use_cache=True, logits_to_keep=0).cache
    flops = counter.get_flop_counts()
    name = type(model).__name__

    def module(path: str) -> int:
        return sum(flops[f"{name}.{path}"].values())

    assert module("model.vision_tower") == report.vision_tower_flops
    assert module("model.multi_modal_projector") == report.projector_flops
    for layer, expected in enumerate(report.prefill_layer_flops):
        assert module(f"model.language_model.layers.{layer}") == expected, layer
    cached = [layer.keys.nbytes + layer.values.nbytes for layer in cache.layers]
    assert cached == report.kv_cache_bytes_per_layer(0)


def test_next_savings_at_a_third_of_the_reference_image():
    """LLaVA-NeXT 7B, a 640 x 480 photo: a third of its 2,340 tokens on average cuts FLOPs and KV by well over half."""
    config = adsc_config(load_reference_config("llava-next-7b")).with_budget(None, fraction=1 / 3)
    stock = estimate_cost(config, prompt_tokens=58, new_tokens=64, schedule=[2340] * 32)
    pruned = estimate_cost(config, prompt_tokens=58, new_tokens=64)
    assert pruned.average_vision_tokens <= 780 and pruned.vision_tokens_per_layer[0] == 2340
    assert 0.3 < pruned.total_flops / stock.total_flops < 0.45
    assert 0.3 < pruned.kv_cache_bytes / stock.kv_cache_bytes < 0.4


def test_cost_command_prints_typical_inputs_for_onevision(capsys):
    from adsc_llava.cost_table import main

    assert main(["--config", "llava-onevision-7b"]) == 0
    printed = capsys.readouterr().out
    assert "| 2929 (stock) |" in printed and "| 32-frame video | 6273 |" in printed
    assert "| 1080x1920 image | 7269 |" in printed and "paper" not in printed.lower()
    with pytest.raises(SystemExit):
        main(["--config", "llava-next-7b", "--image-size", "480by640"])
    assert "HEIGHTxWIDTH" in capsys.readouterr().err
