"""ADSC for LLaVA-NeXT and LLaVA-OneVision on tiny random models: images of different sizes, several images, video.

Prompts are built from the models' own visual features: each image's (or video's) placeholder count is the length
of its features, as the processors compute it, so images of different sizes give units of different lengths.
"""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_alive_masks, reference_forward
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)

from adsc_llava.configuration_adsc_llava_next import AdscLlavaNextConfig
from adsc_llava.configuration_adsc_llava_onevision import AdscLlavaOnevisionConfig
from adsc_llava.modeling_adsc_llava_next import AdscLlavaNextForConditionalGeneration
from adsc_llava.modeling_adsc_llava_onevision import AdscLlavaOnevisionForConditionalGeneration

from conftest import run_fresh_process

MAX_ABS_DIFF = 1e-5
IMAGE_ID, VIDEO_ID, PAD_ID, BOS_ID = 90, 91, 92, 1
NUM_LAYERS = 4
CROP = 16  # px: a 4 x 4 grid of 4-px patches per crop
PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]
TEXT = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=NUM_LAYERS, num_attention_heads=4)
TEXT.update(
    num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=2
)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=CROP)
VISION.update(patch_size=4)


def next_config() -> LlavaNextConfig:
    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**VISION).to_dict(),
        text_config=LlamaConfig(**TEXT).to_dict(),
        image_token_index=IMAGE_ID,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
    )


def onevision_config() -> LlavaOnevisionConfig:
    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**VISION, vision_use_head=False).to_dict(),  # as in llava-hf's
        text_config=Qwen2Config(**TEXT).to_dict(),
        image_token_index=IMAGE_ID,
        video_token_index=VIDEO_ID,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
    )


FAMILIES = {
    "next": (
        next_config,
        AdscLlavaNextConfig,
        AdscLlavaNextForConditionalGeneration,
        LlavaNextForConditionalGeneration,
    ),
    "onevision": (
        onevision_config,
        AdscLlavaOnevisionConfig,
        AdscLlavaOnevisionForConditionalGeneration,
        LlavaOnevisionForConditionalGeneration,
    ),
}


def processor_and_stock_config(family: str, words: tuple[str, ...]):
    """A word-level NeXT-style processor over `words` and the family's tiny stock config fitted to its vocabulary.

    OneVision's own processor needs torchvision (for its video processor), which this CPU environment lacks; a NeXT
    processor set up as OneVision counts (`full` features, no CLS) stands in: on these small grids (at most 4 crops,
    so no `anyres_max_9` shrinking) both give the same placeholder counts.
    """
    from adsc_llava.testing import build_next_processor, build_word_tokenizer

    processor = build_next_processor(build_word_tokenizer(words), CROP, 4, PINPOINTS)
    if family == "onevision":
        processor.vision_feature_select_strategy, processor.num_additional_image_tokens = "full", 0
    config = FAMILIES[family][0]()
    config.text_config.vocab_size = len(processor.tokenizer)
    config.image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    config.text_config.pad_token_id = processor.tokenizer.pad_token_id
    return processor, config


def models(family: str, attn: str = "eager", **schedule):
    """A random ADSC model of the family and its stock twin with the very same weights."""
    stock_config_fn, adsc_config_class, adsc_class, stock_class = FAMILIES[family]
    config = adsc_config_class.from_stock_config(stock_config_fn(), **schedule)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = adsc_class(config).eval()
    stock_config = config.to_stock_config()
    stock_config._attn_implementation = attn
    stock = stock_class(stock_config).eval()
    stock.load_state_dict(model.state_dict())
    return model, stock


def image_inputs(sizes: list[tuple[int, int]], seed: int = 0) -> dict:
    """`pixel_values` `(images, max crops, 3, 16, 16)` zero-padded across images, and `image_sizes` `(images, 2)`."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    generator = torch.Generator().manual_seed(seed)
    crops = [image_size_to_num_patches(size, PINPOINTS, CROP) for size in sizes]
    pixel_values = torch.zeros(len(sizes), max(crops), 3, CROP, CROP)
    for index, count in enumerate(crops):
        pixel_values[index, :count] = torch.randn(count, 3, CROP, CROP, generator=generator)
    return {"pixel_values": pixel_values, "image_sizes": torch.tensor(sizes)}


def build_batch(model, rows: list[list], family: str, padding_side: str = "left", seed: int = 0) -> dict:
    """Rows of items: an int is that many text tokens, ("image", (H, W)) an image, ("video", frames) a video.

    Every image of the batch goes through one `get_image_features` call (as a processor would batch them), videos
    through `get_video_features`; each placeholder run is as long as its features.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    sizes = [item[1] for row in rows for item in row if isinstance(item, tuple) and item[0] == "image"]
    frames = [item[1] for row in rows for item in row if isinstance(item, tuple) and item[0] == "video"]
    inputs, lengths = {}, {"image": [], "video": []}
    with torch.no_grad():
        if sizes:
            inputs = image_inputs(sizes, seed)
            if family == "onevision":  # images per prompt: several images are not cropped
                per_row = [sum(isinstance(i, tuple) and i[0] == "image" for i in row) for row in rows]
                inputs["batch_num_images"] = torch.tensor([count for count in per_row if count])
            features = model.model.get_image_features(**inputs).pooler_output
            lengths["image"] = [len(feature) for feature in features]
        if frames:
            assert len(set(frames)) == 1, "one frame count per batch"
            videos = torch.randn(len(frames), frames[0], 3, CROP, CROP, generator=generator)
            inputs["pixel_values_videos"] = videos
            lengths["video"] = [len(video) for video in model.model.get_video_features(videos).pooler_output]
    image_lengths, video_lengths = iter(lengths["image"]), iter(lengths["video"])
    sequences = []
    for row in rows:
        tokens = [BOS_ID]
        for item in row:
            if isinstance(item, int):
                tokens += torch.randint(3, 80, (item,), generator=generator).tolist()
            elif item[0] == "image":
                tokens += [IMAGE_ID] * next(image_lengths)
            else:
                tokens += [VIDEO_ID] * next(video_lengths)
        sequences.append(tokens)
    width = max(map(len, sequences))
    input_ids = torch.full((len(rows), width), PAD_ID)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for index, tokens in enumerate(sequences):
        span = slice(width - len(tokens), width) if padding_side == "left" else slice(0, len(tokens))
        input_ids[index, span], attention_mask[index, span] = torch.tensor(tokens), 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, **inputs}
    batch["unit_lengths"] = lengths
    return batch


def forward_inputs(batch: dict) -> dict:
    return {key: value for key, value in batch.items() if key != "unit_lengths"}


# Different image sizes (grids 1x1, 1x2, 2x1, 2x2 of 16-px crops, unpadded), a text-only row, adjacent images.
NEXT_ROWS = [[("image", (16, 16)), 3], [("image", (30, 14)), 5, ("image", (20, 40))], [7], [("image", (32, 32)), 2]]
ONEVISION_ROWS = [[("image", (16, 16)), ("image", (24, 32)), 3], [4, ("video", 3), 2], [6], [("image", (32, 20)), 2]]
ROWS = {"next": NEXT_ROWS, "onevision": ONEVISION_ROWS}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_without_pruning_equals_stock(family, attn):
    model, stock = models(family, attn)
    batch = forward_inputs(build_batch(model, ROWS[family], family))
    with torch.no_grad():
        ours, theirs = model(**batch).logits, stock(**batch).logits
    assert ours.shape == theirs.shape and (ours - theirs).abs().max() <= MAX_ABS_DIFF
    options = dict(max_new_tokens=6, do_sample=False, suppress_tokens=[IMAGE_ID, VIDEO_ID])
    assert torch.equal(model.generate(**batch, **options), stock.generate(**batch, **options))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "schedule", [dict(pruning_layers=[1], drop_ratio=0.5), dict(pruning_layers=[1, 3], drop_ratio=0.7)]
)
def test_pruned_prefill_equals_the_naive_reference(family, schedule):
    model, _ = models(family, **schedule)
    batch = build_batch(model, ROWS[family], family)
    units = [*batch["unit_lengths"]["image"], *batch["unit_lengths"]["video"]]
    inputs = forward_inputs(batch)
    with torch.no_grad():
        output = model.model(**inputs, output_hidden_states=True)
        embeds = output.hidden_states[0]  # the merged embeddings, as the stock model builds them
        ordered = reference_unit_lengths(batch)
        alive = reference_alive_masks(
            inputs["input_ids"],
            schedule["pruning_layers"],
            schedule["drop_ratio"],
            NUM_LAYERS,
            ordered,
            (IMAGE_ID, VIDEO_ID),
        )
        reference = reference_forward(model, inputs, alive, inputs_embeds=embeds)
    assert sum(units) == int(((inputs["input_ids"] == IMAGE_ID) | (inputs["input_ids"] == VIDEO_ID)).sum())
    seen = alive[-1] & inputs["attention_mask"].bool()
    assert (output.last_hidden_state[seen] - reference["normed"][seen]).abs().max() <= MAX_ABS_DIFF
    assert not alive[-1][inputs["input_ids"] == IMAGE_ID].all()  # something was pruned


def reference_unit_lengths(batch: dict) -> list[int]:
    """Unit lengths in the order the reference walks them: row by row, images and videos as they appear."""
    images, videos = iter(batch["unit_lengths"]["image"]), iter(batch["unit_lengths"]["video"])
    ordered = []
    for row in batch["input_ids"].tolist():
        position = 0
        while position < len(row):
            token = row[position]
            if token in (IMAGE_ID, VIDEO_ID):
                length = next(images) if token == IMAGE_ID else next(videos)
                ordered.append(length)
                position += length
            else:
                position += 1
    return ordered


@settings(max_examples=12, deadline=None)
@given(
    family=st.sampled_from(list(FAMILIES)),
    layers=st.sampled_from([[1], [1, 2], [2, 3], [1, 2, 3]]),
    drop_ratio=st.sampled_from([0.3, 0.6, 0.9, 0.999]),
    padding_side=st.sampled_from(["left", "right"]),
    num_beams=st.sampled_from([1, 2]),
)
def test_cached_generation_equals_uncached(family, layers, drop_ratio, padding_side, num_beams):
    model, _ = models(family, pruning_layers=layers, drop_ratio=drop_ratio)
    batch = forward_inputs(build_batch(model, ROWS[family], family, padding_side=padding_side))
    options = dict(max_new_tokens=5, do_sample=False, num_beams=num_beams, suppress_tokens=[IMAGE_ID, VIDEO_ID])
    assert torch.equal(
        model.generate(**batch, **options, use_cache=True), model.generate(**batch, **options, use_cache=False)
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_lengths_are_the_text_plus_each_units_kept_tokens(family):
    schedule = dict(pruning_layers=[1, 2], drop_ratio=0.6)
    model, _ = models(family, **schedule)
    rows = ROWS[family][:1]  # one row: its cache length is exactly its tokens
    batch = build_batch(model, rows, family)
    inputs = forward_inputs(batch)
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).cache
    text = int(((inputs["input_ids"] != IMAGE_ID) & (inputs["input_ids"] != VIDEO_ID)).sum())
    units = [*batch["unit_lengths"]["image"], *batch["unit_lengths"]["video"]]
    for layer in range(NUM_LAYERS):
        kept = sum(model.config.vision_tokens_per_layer(n)[layer] for n in units)
        assert cache.get_seq_length(layer) == text + kept


@pytest.mark.parametrize("family", FAMILIES)
def test_mismatched_placeholders_and_truncated_spans_are_refused(family):
    model, _ = models(family, pruning_layers=[1], drop_ratio=0.5)
    batch = forward_inputs(build_batch(model, [[("image", (20, 40)), 4]], family))
    short = dict(batch, input_ids=batch["input_ids"].clone())
    short["input_ids"][0, (short["input_ids"][0] == IMAGE_ID).nonzero()[-1]] = 5
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(**short)


REMOTE_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
from transformers import AutoModelForImageTextToText
workdir = Path(sys.argv[1])
request = json.loads((workdir / "request.json").read_text())
inputs = torch.load(workdir / "inputs.pt")
model = AutoModelForImageTextToText.from_pretrained(request["checkpoint"], trust_remote_code=True).eval()
with torch.no_grad():
    torch.save(model(**inputs).logits, workdir / "logits.pt")
(workdir / "report.json").write_text(json.dumps({"module": type(model).__module__, "class": type(model).__name__}))
"""


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_loads_as_remote_code_in_a_fresh_process(family, tmp_path):
    model, _ = models(family, attn="sdpa", pruning_layers=[1, 2], drop_ratio=0.5)
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    shipped = {path.name for path in checkpoint.glob("*.py")}
    assert {"configuration_adsc_llava.py", "modeling_adsc_llava.py"} <= shipped and len(shipped) == 4
    inputs = forward_inputs(build_batch(model, ROWS[family][:2], family))
    torch.save(inputs, tmp_path / "inputs.pt")
    report = run_fresh_process(REMOTE_SCRIPT, tmp_path, {"checkpoint": str(checkpoint)})
    assert report["module"].startswith("transformers_modules.") and report["class"] == type(model).__name__
    with torch.no_grad():
        expected = model(**inputs).logits
    assert (torch.load(tmp_path / "logits.pt") - expected).abs().max() <= MAX_ABS_DIFF
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == type(model.config).model_type


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["current", "old"])
def test_convert_takes_stock_checkpoints_of_both_key_layouts(family, layout, tmp_path):
    """`adsc-llava convert` on a stock NeXT / OneVision folder: every weight in place, the schedule solved."""
    from safetensors.torch import load_file, save_file

    from adsc_llava.convert import main as convert_main

    model, stock = models(family, attn="sdpa")
    source = tmp_path / "stock"
    stock.save_pretrained(source)
    if layout == "old":  # the llava-hf layout before transformers 4.52: language_model.model.*, top-level towers
        weights = load_file(source / "model.safetensors")
        renamed = {}
        for key, tensor in weights.items():
            key = key.replace("model.language_model.", "language_model.model.", 1)
            key = key.removeprefix("model.")
            renamed[key] = tensor
        assert any(key.startswith("language_model.model.") for key in renamed)
        save_file(renamed, source / "model.safetensors", metadata={"format": "pt"})
    reference = model.config.reference_vision_tokens
    assert convert_main([str(source), str(tmp_path / "adsc"), "--budget", str(reference / 3)]) == 0
    _, adsc_config_class, adsc_class, _ = FAMILIES[family]
    converted = adsc_class.from_pretrained(tmp_path / "adsc").eval()
    assert (
        isinstance(converted.config, adsc_config_class) and converted.config.average_vision_tokens() <= reference / 3
    )
    for name, tensor in stock.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor), name


@pytest.mark.parametrize("family", FAMILIES)
def test_fine_tunes_with_lora_and_the_curriculum(family, tmp_path):
    """A few LoRA steps with images of different sizes (different crop counts in one batch); for OneVision with the
    stand-in processor of `processor_and_stock_config`, whose placeholder counts the training run checks."""
    from PIL import Image
    from safetensors.torch import load_file

    from adsc_llava.train.args import AdscTrainConfig
    from adsc_llava.train.trainer import run_training

    words = ("what", "color", "is", "the", "shape", "?", "red", "blue", "green")
    processor, config = processor_and_stock_config(family, words)
    _, adsc_config_class, adsc_class, stock_class = FAMILIES[family]
    torch.manual_seed(0)
    base = tmp_path / "base"
    stock_class(config).save_pretrained(base)
    budget = 1200.0  # of the reference image's 2,340 (NeXT) or 2,929 (OneVision) tokens
    processor.save_pretrained(base)
    (tmp_path / "images").mkdir()
    records = []
    for index, ((width, height), color) in enumerate(
        zip([(16, 16), (40, 20), (20, 40), (32, 32)], (*words[6:], "red"), strict=True)
    ):
        Image.new("RGB", (width, height), color).save(tmp_path / "images" / f"{index}.png")
        conversation = [
            {"from": "human", "value": "<image>\nwhat color is the shape ?"},
            {"from": "gpt", "value": color},
        ]
        records.append({"id": str(index), "image": f"images/{index}.png", "conversations": conversation})
    (tmp_path / "data.json").write_text(json.dumps(records))
    final = run_training(
        AdscTrainConfig(
            model=str(base),
            data=str(tmp_path / "data.json"),
            output_dir=str(tmp_path / "out"),
            budget=budget,
            max_steps=3,
            per_device_train_batch_size=4,
            lora_r=4,
            lora_alpha=8,
            learning_rate=1e-2,
            projector_learning_rate=1e-2,
            gradient_checkpointing=False,
            save_steps=1000,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
    )
    trained = adsc_class.from_pretrained(final)
    assert isinstance(trained.config, adsc_config_class) and trained.config.average_vision_tokens() <= budget
    weights, before = load_file(final / "model.safetensors"), load_file(base / "model.safetensors")
    changed = {name for name in weights if not torch.equal(weights[name], before[name])}
    assert any("multi_modal_projector" in name for name in changed)  # trained
    assert any("language_model" in name and "q_proj" in name for name in changed)  # LoRA merged
    assert not any("vision_tower" in name or "image_newline" in name for name in changed)  # frozen
