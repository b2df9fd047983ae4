"""The cost model for Qwen2.5-VL and Qwen3-VL inputs: grids and tokens per image or video, vision-side FLOPs, KV."""

import ast
import math
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image
from test_qwen_vl import END_ID, START_ID, build_batch, models
from torch.utils.flop_counter import FlopCounterMode
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from adsc_llava import cost_qwen
from adsc_llava.cost import adsc_config, estimate_cost, load_reference_config

# The hub processors' settings (preprocessor_config.json of Qwen2.5-VL-7B-Instruct and Qwen3-VL-8B-Instruct).
HUB_IMAGE_PROCESSORS = {
    "qwen2.5-vl-7b": dict(min_pixels=3136, max_pixels=12845056, patch_size=14),
    "qwen3-vl-8b": dict(size={"shortest_edge": 65536, "longest_edge": 16777216}, patch_size=16),
}
# (H, W) -> (Qwen2.5-VL tokens, Qwen3-VL tokens), as the processors count them.
IMAGE_TOKENS = {
    (720, 1280): (1196, 880),
    (480, 640): (391, 300),
    (1080, 1920): (2691, 2040),
    (336, 336): (144, 100),
    (50, 100): (8, 72),
    (3000, 4000): (15301, 11750),
}


@pytest.mark.parametrize("size", sorted(IMAGE_TOKENS))
def test_image_tokens_are_the_real_processors(size):
    for index, (name, settings) in enumerate(HUB_IMAGE_PROCESSORS.items()):
        config = load_reference_config(name)
        processor = Qwen2VLImageProcessorPil(merge_size=2, temporal_patch_size=2, **settings)
        grid = processor(images=[Image.new("RGB", size[::-1])], return_tensors="pt")["image_grid_thw"][0].tolist()
        assert cost_qwen.image_grid(config, *size) == tuple(grid)
        assert cost_qwen.visual_units(config, tuple(grid), video=False) == [IMAGE_TOKENS[size][index]]


def transformers_function(module: str, name: str):
    """A function of a transformers module that cannot be imported here (its module needs torchvision), compiled
    from the installed source."""
    path = Path(transformers.__file__).parent / "models" / module
    tree = ast.parse(path.read_text())
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name)
    namespace = {"math": math}
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


@pytest.mark.parametrize("frames, size", [(32, (720, 1280)), (32, (360, 640)), (8, (1080, 1920)), (5, (480, 640))])
def test_video_grids_are_the_real_video_processors(frames, size):
    """The video processors' own resize functions (installed source; torchvision is not) and temporal patching."""
    qwen2_resize = transformers_function("qwen2_vl/video_processing_qwen2_vl.py", "smart_resize")
    qwen3_resize = transformers_function("qwen3_vl/video_processing_qwen3_vl.py", "smart_resize")
    qwen2_5, qwen3 = load_reference_config("qwen2.5-vl-7b"), load_reference_config("qwen3-vl-8b")
    height, width = qwen2_resize(*size, factor=28, min_pixels=3136, max_pixels=12845056)
    assert cost_qwen.video_grid(qwen2_5, frames, *size) == (math.ceil(frames / 2), height // 14, width // 14)
    height, width = qwen3_resize(frames, *size, temporal_factor=2, factor=32, min_pixels=4096, max_pixels=25165824)
    assert cost_qwen.video_grid(qwen3, frames, *size) == (math.ceil(frames / 2), height // 16, width // 16)


def test_video_units():
    qwen2_5, qwen3 = load_reference_config("qwen2.5-vl-7b"), load_reference_config("qwen3-vl-8b")
    assert cost_qwen.visual_units(qwen2_5, cost_qwen.video_grid(qwen2_5, 32, 720, 1280), video=True) == [19136]
    assert cost_qwen.visual_units(qwen3, cost_qwen.video_grid(qwen3, 32, 720, 1280), video=True) == [720] * 16


# Inputs of the tiny models whose grids the hub settings give (Qwen3-VL's minimum is 256 x 256 px for an image).
TINY_INPUTS = {
    "qwen2_5_vl": [("image", (56, 64)), ("video", (4, 56, 64))],
    "qwen3_vl": [("image", (256, 256)), ("video", (4, 32, 32))],
}


@pytest.mark.parametrize("family, index", [(family, index) for family in TINY_INPUTS for index in range(2)])
def test_prefill_flops_and_cache_bytes_equal_the_measured(family, index):
    """FlopCounterMode on a pruned prefill, component by component (eager attention, so the vision tower's windows
    and frames are counted as the cost model counts them), and the bytes the cache holds."""
    kind, size = TINY_INPUTS[family][index]
    model, _ = models(family, attn="eager", pruning_layers=[1, 3], drop_ratio=0.6)
    config = model.config
    grid = cost_qwen.video_grid(config, *size) if kind == "video" else cost_qwen.image_grid(config, *size)
    t, h, w = grid
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(t * h * w, 3 * 2 * config.vision_config.patch_size**2, generator=generator)
    if kind == "image":  # the grid the hub processor gives (the tiny test processor would shrink the image)
        units = [h * w // 4]
        inputs = build_batch(family, [[5]])["inputs"]
        run = [START_ID, *[config.image_token_id] * units[0], END_ID]
        inputs["input_ids"] = torch.tensor(
            [[*inputs["input_ids"][0, :3].tolist(), *run, *inputs["input_ids"][0, 3:].tolist()]]
        )
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == config.image_token_id).int()
        inputs.update(pixel_values=pixels, image_grid_thw=torch.tensor([grid]))
    else:
        patch = config.vision_config.patch_size
        batch = build_batch(family, [[3, ("video", (2 * t, h * patch, w * patch)), 2]])
        inputs = batch["inputs"]
        units = cost_qwen.visual_units(config, grid, video=True)
        assert batch["units"] == units
    prompt_tokens = int(
        ((inputs["input_ids"] != config.image_token_id) & (inputs["input_ids"] != config.video_token_id)).sum()
    )
    report = estimate_cost(
        config,
        prompt_tokens=prompt_tokens,
        new_tokens=1,
        image_size=size[-2:],
        video_frames=size[0] if kind == "video" else None,
        lm_head_positions="all",
    )
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        cache = model(**inputs, use_cache=True, logits_to_keep=0).cache
    flops = counter.get_flop_counts()
    name = type(model).__name__

    def module(path: str) -> int:
        return sum(flops.get(f"{name}.{path}", {}).values())

    deepstack = range(len(getattr(config.vision_config, "deepstack_visual_indexes", [])))
    mergers = module("model.visual.merger") + sum(module(f"model.visual.deepstack_merger_list.{i}") for i in deepstack)
    assert mergers == report.projector_flops
    assert module("model.visual") - mergers == report.vision_tower_flops
    for layer, expected in enumerate(report.prefill_layer_flops):
        assert module(f"model.language_model.layers.{layer}") == expected, layer
    cached = [layer.keys.nbytes + layer.values.nbytes for layer in cache.layers]
    assert cached == report.kv_cache_bytes_per_layer(0)


@pytest.mark.parametrize("name, tokens", [("qwen2.5-vl-7b", 1196), ("qwen3-vl-8b", 880)])
def test_a_third_of_the_reference_photo_saves_half_the_flops(name, tokens):
    config = adsc_config(load_reference_config(name)).with_budget(None, fraction=1 / 3)
    layers = config.text_config.num_hidden_layers
    stock = estimate_cost(config, prompt_tokens=58, new_tokens=64, schedule=[tokens] * layers)
    pruned = estimate_cost(config, prompt_tokens=58, new_tokens=64)
    assert pruned.vision_tokens_per_layer[0] == tokens and pruned.average_vision_tokens <= tokens / 3
    assert 0.45 < pruned.total_flops / stock.total_flops < 0.6  # the vision tower's share is not pruned
    assert 0.35 < pruned.kv_cache_bytes / stock.kv_cache_bytes < 0.45


def test_cost_command_prints_the_qwen_tables(capsys):
    from adsc_llava.cost_table import main

    assert main(["--config", "qwen2.5-vl-7b"]) == 0
    printed = capsys.readouterr().out
    assert "| 1196 (stock) |" in printed and "(1280 x 720)" in printed
    assert "| 32-frame 720x1280 video | 19136 |" in printed and "paper" not in printed.lower()
    assert main(["--config", "qwen3-vl-8b", "--video-frames", "32"]) == 0
    printed = capsys.readouterr().out
    assert "| 720 (stock) |" in printed and "11520 tokens per input in 16 units" in printed


def test_keep_pattern_proxy_compares_positions_at_equal_counts():
    """benchmarks/keep_pattern.py: the 2-D and per-frame rules keep exactly 1-D's counts, nested stage by stage."""
    from adsc_llava.benchmarks import keep_pattern

    for drop_ratio in (0.3, 0.6, 0.9):
        one_d = keep_pattern.one_d(12 * 18, drop_ratio, 4)
        for other in (keep_pattern.two_d(12, 18, drop_ratio, 4), keep_pattern.per_frame(4, 54, drop_ratio, 4)):
            assert [len(kept) for kept in other] == [len(kept) for kept in one_d]
            assert all(set(later) <= set(earlier) for earlier, later in zip(other, other[1:], strict=False))
    generator = torch.Generator().manual_seed(0)
    field = keep_pattern.natural_field((12, 18), generator)
    assert abs(float(field.std()) - 1) < 1e-5
    assert keep_pattern.reconstruction_error((12, 18), list(range(12 * 18)), [field]) == 0.0


def test_qwen_benchmark_presets_feed_the_reference_photo_and_a_video():
    from adsc_llava.benchmarks.models import PRESET_INPUTS, benchmark_config, make_inputs

    for preset, tokens in (("cpu-qwen2.5-vl", 1196), ("cpu-qwen2.5-vl-video", 4784)):
        config = benchmark_config(preset)
        options = dict(batch_size=1, device=torch.device("cpu"), dtype=torch.float32, vision_tower=False, seed=0)
        inputs = make_inputs(config, prompt_tokens=8, num_images=1, visual_input=PRESET_INPUTS[preset], **options)
        placeholder = config.video_token_id if "video" in preset else config.image_token_id
        assert int((inputs["input_ids"] == placeholder).sum()) == tokens
        (kind,) = inputs["mm_encoder_outputs"]
        assert [len(unit) for unit in inputs["mm_encoder_outputs"][kind].pooler_output] == [tokens]
