"""ADSC for Qwen2.5-VL and Qwen3-VL on tiny random models: M-RoPE, native-resolution images, videos, DeepStack.

Inputs are built as the processors build them: images through Qwen's (PIL) image processor, videos as random patches
with their grid; each run of placeholders sits between `<|vision_start|>` and `<|vision_end|>` and is as long as its
features (a Qwen3-VL video: one run per temporal patch, after a timestamp word).
"""

import pytest
import torch
from PIL import Image
from reference import reference_alive_masks, reference_forward
from reference_qwen import full_length_deepstack, reference_positions, reference_rotary
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

from adsc_llava import AdscQwen2_5_VLConfig, AdscQwen3VLConfig
from adsc_llava.modeling_adsc_qwen2_5_vl import AdscQwen2_5_VLForConditionalGeneration
from adsc_llava.modeling_adsc_qwen3_vl import AdscQwen3VLForConditionalGeneration
from adsc_llava.testing import build_qwen_processor, build_qwen_tokenizer, tiny_qwen_vl_config

MAX_ABS_DIFF = 1e-5
NUM_LAYERS = 4
PATCH = 4
TOKENIZER = build_qwen_tokenizer()
IMAGE_PROCESSOR = build_qwen_processor(TOKENIZER, patch_size=PATCH).image_processor
ID = {token: TOKENIZER.convert_tokens_to_ids(token) for token in ("<|image_pad|>", "<|video_pad|>", "<|endoftext|>")}
IMAGE_ID, VIDEO_ID, PAD_ID = ID["<|image_pad|>"], ID["<|video_pad|>"], ID["<|endoftext|>"]
START_ID, END_ID = (TOKENIZER.convert_tokens_to_ids(token) for token in ("<|vision_start|>", "<|vision_end|>"))
WORD_IDS = range(len(TOKENIZER) - 30, len(TOKENIZER))  # ordinary words

FAMILIES = {
    "qwen2_5_vl": (AdscQwen2_5_VLConfig, AdscQwen2_5_VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration),
    "qwen3_vl": (AdscQwen3VLConfig, AdscQwen3VLForConditionalGeneration, Qwen3VLForConditionalGeneration),
}
# Images of different sizes (40 x 24 px: a 3 x 5 merged grid; 16 x 32: 4 x 2; 24 x 24: 3 x 3), two images in a row,
# a video (4 frames of 16 x 24 px: 2 temporal patches of 2 x 3), a text-only row; rows differ in length (left padding).
ROWS = [
    [3, ("image", (24, 40)), 2, ("image", (32, 16)), 2],
    [2, ("video", (4, 16, 24)), 3],
    [5],
    [("image", (24, 24)), 4],
]


def models(family: str, attn: str = "eager", **schedule):
    """A random ADSC model of the family and its stock twin with the very same weights."""
    config_class, adsc_class, stock_class = FAMILIES[family]
    config = config_class.from_stock_config(tiny_qwen_vl_config(family, TOKENIZER), **schedule)
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = adsc_class(config).eval()
    stock_config = config.to_stock_config()
    stock_config._attn_implementation = attn
    stock = stock_class(stock_config).eval()
    stock.load_state_dict(model.state_dict())
    return model, stock


def build_batch(family: str, rows: list[list], padding_side: str = "left", seed: int = 0) -> dict:
    """Rows of items: an int is that many words, ("image", (H, W)) an image, ("video", (frames, H, W)) a video.

    Returns the model inputs (`mm_token_type_ids` as the processor writes them) and, under "units", each visual
    unit's tokens and, under "grids" / "steps", each placeholder run's grid and temporal step (for the reference).
    """
    generator = torch.Generator().manual_seed(seed)
    images = [item[1] for row in rows for item in row if isinstance(item, tuple) and item[0] == "image"]
    videos = [item[1] for row in rows for item in row if isinstance(item, tuple) and item[0] == "video"]
    batch = {}
    if images:
        pictures = []
        for height, width in images:
            pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
            pictures.append(Image.fromarray(pixels.numpy()))
        encoded = IMAGE_PROCESSOR(images=pictures, return_tensors="pt")
        batch.update(pixel_values=encoded["pixel_values"], image_grid_thw=encoded["image_grid_thw"])
    if videos:
        grids = [(frames // 2, height // PATCH, width // PATCH) for frames, height, width in videos]
        patches = sum(t * h * w for t, h, w in grids)
        batch["pixel_values_videos"] = torch.randn(patches, 3 * 2 * PATCH * PATCH, generator=generator)
        batch["video_grid_thw"] = torch.tensor(grids)
        if family == "qwen2_5_vl":
            batch["second_per_grid_ts"] = torch.ones(len(grids))  # 1 s per temporal patch: a step of 2 positions
    image_grids = iter(batch.get("image_grid_thw", torch.zeros(0, 3)).tolist())
    video_grids = iter(batch.get("video_grid_thw", torch.zeros(0, 3)).tolist())
    sequences, units, run_grids, steps = [], [], [], []

    def words(count: int) -> list[int]:
        return torch.randint(WORD_IDS.start, WORD_IDS.stop, (count,), generator=generator).tolist()

    for row in rows:
        tokens = []
        for item in row:
            if isinstance(item, int):
                tokens += words(item)
                continue
            kind, _ = item
            t, h, w = next(image_grids) if kind == "image" else next(video_grids)
            per_frame = h * w // 4
            if kind == "video" and family == "qwen3_vl":  # one run per temporal patch, after its timestamp
                for _ in range(t):
                    tokens += words(1) + [START_ID] + [VIDEO_ID] * per_frame + [END_ID]
                    units.append(per_frame)
                    run_grids.append((1, h, w))
                    steps.append(1)
                continue
            token = IMAGE_ID if kind == "image" else VIDEO_ID
            tokens += [START_ID] + [token] * (t * per_frame) + [END_ID]
            units.append(t * per_frame)
            run_grids.append((t, h, w))
            steps.append(1 if kind == "image" else 2)
        sequences.append(tokens)
    width = max(map(len, sequences))
    input_ids = torch.full((len(rows), width), PAD_ID)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for index, tokens in enumerate(sequences):
        span = slice(width - len(tokens), width) if padding_side == "left" else slice(0, len(tokens))
        input_ids[index, span], attention_mask[index, span] = torch.tensor(tokens), 1
    token_types = (input_ids == IMAGE_ID).int() + 2 * (input_ids == VIDEO_ID).int()
    batch.update(input_ids=input_ids, attention_mask=attention_mask, mm_token_type_ids=token_types)
    return {"inputs": batch, "units": units, "grids": run_grids, "steps": steps}


def rotary_of(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive M-RoPE tables of a batch (`reference_qwen`)."""
    inputs, text = batch["inputs"], model.config.text_config
    positions = reference_positions(
        inputs["input_ids"], inputs["attention_mask"], (IMAGE_ID, VIDEO_ID), batch["grids"], 2, batch["steps"]
    )
    rope = text.rope_parameters
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return reference_rotary(
        positions, head_dim, rope["rope_theta"], rope["mrope_section"], rope.get("mrope_interleaved", False)
    )


GENERATE = dict(max_new_tokens=5, do_sample=False, suppress_tokens=[IMAGE_ID, VIDEO_ID, START_ID, END_ID])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_without_pruning_equals_stock(family, attn):
    """Empty schedule: images of different sizes, two images in a row, a video, a text-only row, left padding."""
    model, stock = models(family, attn)
    inputs = build_batch(family, ROWS)["inputs"]
    with torch.no_grad():
        ours, theirs = model(**inputs).logits, stock(**inputs).logits
    assert ours.shape == theirs.shape and (ours - theirs).abs().max() <= MAX_ABS_DIFF
    assert torch.equal(model.generate(**inputs, **GENERATE), stock.generate(**inputs, **GENERATE))


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_positions_are_stocks(family):
    """The tests' naive positions are stock's `get_rope_index` (so the reference below checks the real M-RoPE)."""
    model, _ = models(family)
    batch = build_batch(family, ROWS)
    inputs = batch["inputs"]
    stock_positions, _ = model.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        inputs.get("image_grid_thw"),
        inputs.get("video_grid_thw"),
        **({"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}),
        attention_mask=inputs["attention_mask"],
    )
    naive = reference_positions(
        inputs["input_ids"], inputs["attention_mask"], (IMAGE_ID, VIDEO_ID), batch["grids"], 2, batch["steps"]
    )
    valid = inputs["attention_mask"].bool()
    assert torch.equal(stock_positions[:, valid], naive[:, valid])


def deepstack_reference(model, inputs: dict):
    """Stock Qwen3-VL's DeepStack injection at full length (None for Qwen2.5-VL)."""
    if not isinstance(model, AdscQwen3VLForConditionalGeneration):
        return None
    masks, features = [], []
    with torch.no_grad():
        if "pixel_values" in inputs:
            outputs = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            masks.append(inputs["input_ids"] == IMAGE_ID)
            features.append([torch.cat(list(layer)) for layer in outputs.deepstack_features])
        if "pixel_values_videos" in inputs:
            outputs = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
            masks.append(inputs["input_ids"] == VIDEO_ID)
            features.append([torch.cat(list(layer)) for layer in outputs.deepstack_features])
    return full_length_deepstack(masks, features)


SCHEDULES = [dict(pruning_layers=[1], drop_ratio=0.5), dict(pruning_layers=[1, 3], drop_ratio=0.7)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("schedule", SCHEDULES, ids=["r0.5@1", "r0.7@1,3"])
def test_pruned_prefill_equals_the_naive_reference(family, schedule):
    """Kept tokens keep their own 3-D positions; Qwen3-VL's DeepStack features follow them (layer 1 prunes between
    the injections after layers 0, 1 and 2)."""
    model, _ = models(family, **schedule)
    batch = build_batch(family, ROWS)
    inputs = batch["inputs"]
    with torch.no_grad():
        output = model.model(**inputs, output_hidden_states=True)
        alive = reference_alive_masks(
            inputs["input_ids"],
            schedule["pruning_layers"],
            schedule["drop_ratio"],
            NUM_LAYERS,
            batch["units"],
            (IMAGE_ID, VIDEO_ID),
        )
        reference = reference_forward(
            model,
            inputs,
            alive,
            inputs_embeds=output.hidden_states[0],
            rotary=rotary_of(model, batch),
            after_layer=deepstack_reference(model, inputs),
        )
    seen = alive[-1] & inputs["attention_mask"].bool()
    assert (alive[-1] != alive[0]).any()  # something was dropped
    assert (output.last_hidden_state[seen] - reference["normed"][seen]).abs().max() <= MAX_ABS_DIFF


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "schedule, padding_side, num_beams",
    [(dict(pruning_layers=[1, 2], drop_ratio=0.6), "left", 1), (dict(pruning_layers=[2], drop_ratio=0.9), "right", 2)],
    ids=["greedy-left", "beam-right"],
)
def test_cached_generation_equals_uncached(family, schedule, padding_side, num_beams):
    """Decode steps take `generate()`'s M-RoPE positions (the last plus one) and the per-layer cache."""
    model, _ = models(family, **schedule)
    inputs = build_batch(family, ROWS, padding_side=padding_side)["inputs"]
    options = dict(GENERATE, num_beams=num_beams)
    cached = model.generate(**inputs, **options, use_cache=True)
    assert torch.equal(cached, model.generate(**inputs, **options, use_cache=False))


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_without_positions_uses_rope_deltas(family):
    """A hand-written decode loop passes no positions: each step's come from the prefill's `rope_deltas` and the
    cache's full length (layer 0 caches every token), and the tokens are those of `generate()`."""
    model, _ = models(family, pruning_layers=[1, 2], drop_ratio=0.6)
    inputs = build_batch(family, ROWS[:1])["inputs"]
    expected = model.generate(**inputs, **GENERATE)[0, inputs["input_ids"].shape[1] :]
    suppressed = torch.tensor(GENERATE["suppress_tokens"])
    with torch.no_grad():
        output = model(**inputs, use_cache=True)
        tokens, cache, mask = [], output.cache, inputs["attention_mask"]
        for _ in range(GENERATE["max_new_tokens"]):
            logits = output.logits[0, -1].index_fill(0, suppressed, -torch.inf)
            tokens.append(int(logits.argmax()))
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
            output = model(input_ids=torch.tensor([[tokens[-1]]]), attention_mask=mask, cache=cache, use_cache=True)
    assert model.model.rope_deltas is not None and int(model.model.rope_deltas) < 0  # images shorten the positions
    assert tokens == expected.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_lengths_are_the_text_plus_each_units_kept_tokens(family):
    model, _ = models(family, pruning_layers=[1, 2], drop_ratio=0.6)
    batch = build_batch(family, ROWS[:2])  # left-padded to one width: every row caches the width's slots
    inputs = batch["inputs"]
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).cache
    for layer in range(NUM_LAYERS):
        kept = [model.config.vision_tokens_per_layer(n)[layer] for n in batch["units"]]
        row_units = [kept[:2], kept[2:]]  # row 0: two images; row 1: one video (Qwen3-VL: one unit per frame)
        rows = [
            int(((ids != IMAGE_ID) & (ids != VIDEO_ID)).sum()) + sum(units)
            for ids, units in zip(inputs["input_ids"], row_units, strict=True)
        ]
        assert cache.get_seq_length(layer) == max(rows), layer


def test_qwen3_video_features_are_one_unit_per_temporal_patch():
    model, stock = models("qwen3_vl")
    inputs = build_batch("qwen3_vl", [[("video", (6, 16, 24))]])["inputs"]
    with torch.no_grad():
        ours = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        theirs = stock.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    assert [len(frame) for frame in ours.pooler_output] == [6, 6, 6] and len(theirs.pooler_output) == 1
    assert torch.equal(torch.cat(ours.pooler_output), theirs.pooler_output[0])
    for our_layer, their_layer in zip(ours.deepstack_features, theirs.deepstack_features, strict=True):
        assert len(our_layer) == 3 and torch.equal(torch.cat(our_layer), their_layer[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_token_types_are_derived_when_missing(family):
    """Without `mm_token_type_ids` the positions are the processor's (stock Qwen2.5-VL would fall back to 1-D)."""
    model, _ = models(family, pruning_layers=[1], drop_ratio=0.5)
    inputs = build_batch(family, ROWS)["inputs"]
    without = {key: value for key, value in inputs.items() if key != "mm_token_type_ids"}
    with torch.no_grad():
        assert torch.equal(model(**without).logits, model(**inputs).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_baseline_keep_policies_are_refused(family):
    model, _ = models(family, pruning_layers=[1], drop_ratio=0.5)
    model.config.adsc_keep_policy = "fastv"
    with pytest.raises(ValueError, match="supports ADSC's 'uniform' keep policy"):
        model(**build_batch(family, ROWS[:1])["inputs"])


QWEN_QUESTION = "what is in the image ?"


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_runs_as_remote_code_in_a_fresh_process(family, tmp_path):
    """Saved with its processor, the checkpoint loads, predicts, answers through `pipeline` and pushes in a process
    that cannot import the project (test_remote_code's child script)."""
    from test_remote_code import CHILD_SCRIPT, PROJECT_MODULES, project_source_paths

    from conftest import run_fresh_process

    model, _ = models(family, attn="sdpa", pruning_layers=[1, 2], drop_ratio=0.5)
    processor = build_qwen_processor(TOKENIZER, patch_size=PATCH)
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    shipped = {path.name for path in checkpoint.glob("*.py")}
    core = {"configuration_adsc_llava.py", "modeling_adsc_llava.py", "processing_qwen_images.py"}
    qwen2_5 = {"configuration_adsc_qwen2_5_vl.py", "modeling_adsc_qwen2_5_vl.py"}
    qwen3 = {"configuration_adsc_qwen3_vl.py", "modeling_adsc_qwen3_vl.py"} if family == "qwen3_vl" else set()
    assert shipped == core | qwen2_5 | qwen3

    image = Image.new("RGB", (40, 24), "red")
    image.save(tmp_path / "image.png")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QWEN_QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = dict(processor(images=[image], text=[prompt], return_tensors="pt"))
    torch.save(inputs, tmp_path / "inputs.pt")
    special = TOKENIZER.convert_tokens_to_ids([*TOKENIZER.all_special_tokens, "user", "assistant", "system", "\n"])
    generate_kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, suppress_tokens=special)
    with torch.no_grad():
        expected_logits = model(**inputs).logits
        generated = model.generate(**inputs, **generate_kwargs)
    expected_answer = processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    request = {
        "checkpoint": str(checkpoint),
        "project_modules": PROJECT_MODULES,
        "project_source_paths": project_source_paths(),
        "num_threads": 1,
        "question": QWEN_QUESTION,
        "generate_kwargs": generate_kwargs,
        "repo_id": "someone/tiny-adsc-qwen",
    }
    report = run_fresh_process(CHILD_SCRIPT, tmp_path, request)
    assert report["importable"] == dict.fromkeys(PROJECT_MODULES, False) and report["project_modules_loaded"] == []
    assert report["config"]["class"] == type(model.config).__name__
    assert report["config"]["vision_tokens_per_layer"] == model.config.vision_tokens_per_layer()
    for auto_class in ("AutoModelForImageTextToText", "AutoModel"):
        loaded = report["models"][auto_class]
        assert loaded["class"] == type(model).__name__ and loaded["module"].startswith("transformers_modules.")
        assert torch.equal(torch.load(tmp_path / f"logits_{auto_class}.pt"), expected_logits)
    assert report["pipeline"]["model_module"].startswith("transformers_modules.")
    assert report["pipeline"]["generated_text"].split() == expected_answer.split()  # spacing: the decoders differ
    model_code = shipped - {"processing_qwen_images.py"}  # the model pushes its own code; the processor, its own
    assert {"config.json", "model.safetensors", *model_code} <= set(report["pushed"]["files"])


@pytest.mark.parametrize("family, layout", [("qwen2_5_vl", "current"), ("qwen2_5_vl", "hub"), ("qwen3_vl", "current")])
def test_convert_takes_stock_checkpoints(family, layout, tmp_path):
    """`adsc-llava convert` on a stock folder: every weight in place, the budget solved for the reference image.
    "hub": Qwen2.5-VL's released key layout (`model.layers.*`, `visual.*`), which transformers renames on load."""
    from safetensors.torch import load_file, save_file

    from adsc_llava.convert import main as convert_main

    model, stock = models(family, attn="sdpa")
    source = tmp_path / "stock"
    stock.save_pretrained(source)
    if layout == "hub":
        weights = load_file(source / "model.safetensors")
        renamed = {
            key.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1): tensor
            for key, tensor in weights.items()
        }
        assert any(key.startswith("visual.") for key in renamed) and any(
            key.startswith("model.layers.") for key in renamed
        )
        save_file(renamed, source / "model.safetensors", metadata={"format": "pt"})
    reference = model.config.reference_vision_tokens
    assert convert_main([str(source), str(tmp_path / "adsc"), "--budget", str(reference / 3)]) == 0
    config_class, adsc_class, _ = FAMILIES[family]
    converted = adsc_class.from_pretrained(tmp_path / "adsc").eval()
    assert isinstance(converted.config, config_class) and converted.config.average_vision_tokens() <= reference / 3
    for name, tensor in stock.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor), name


@pytest.mark.parametrize("family", FAMILIES)
def test_fine_tunes_with_lora_and_the_curriculum(family, tmp_path):
    """`adsc-llava train`'s run on a stock Qwen-VL folder: images of different sizes in one batch (different patch
    counts), LoRA merged into the LLM, the patch merger(s) trained, the vision tower frozen, the target schedule."""
    import json

    from safetensors.torch import load_file

    from adsc_llava.train.args import AdscTrainConfig
    from adsc_llava.train.trainer import run_training

    _, _, stock_class = FAMILIES[family]
    processor = build_qwen_processor(TOKENIZER, patch_size=PATCH)
    torch.manual_seed(0)
    base = tmp_path / "base"
    stock_class(tiny_qwen_vl_config(family, TOKENIZER)).save_pretrained(base)
    processor.save_pretrained(base)
    (tmp_path / "images").mkdir()
    records = []
    for index, ((width, height), color) in enumerate(
        zip([(16, 16), (40, 24), (24, 40), (32, 32)], ("red", "blue", "green", "red"), strict=True)
    ):
        Image.new("RGB", (width, height), color).save(tmp_path / "images" / f"{index}.png")
        conversation = [
            {"from": "human", "value": "<image>\nwhat color is the shape ?"},
            {"from": "gpt", "value": color},
        ]
        records.append({"id": str(index), "image": f"images/{index}.png", "conversations": conversation})
    (tmp_path / "data.json").write_text(json.dumps(records))
    config_class, adsc_class, _ = FAMILIES[family]
    # 70% of the reference photo (1196 or 880 tokens; layer 2 first prunes, so 0.8 x the budget is at least half):
    # the tiny images have fewer tokens, the same r applies.
    budget = 0.7 * config_class.from_stock_config(tiny_qwen_vl_config(family, TOKENIZER)).reference_vision_tokens
    final = run_training(
        AdscTrainConfig(
            model=str(base),
            data=str(tmp_path / "data.json"),
            output_dir=str(tmp_path / "out"),
            budget=budget,
            # Layer 2 prunes between DeepStack's injections (after layers 0, 1, 2); pruning at layer 1, these tiny
            # images would keep no token there, so the later injections would train nothing.
            pruning_layers=[2, 3],
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
    assert isinstance(trained.config, config_class) and trained.config.average_vision_tokens() <= budget
    weights, before = load_file(final / "model.safetensors"), load_file(base / "model.safetensors")
    changed = {name for name in weights if not torch.equal(weights[name], before[name])}
    # Saved as the stock classes save (Qwen2.5-VL: the released `model.layers.*` / `visual.*` key layout).
    assert any("visual.merger." in name for name in changed)  # trained
    if family == "qwen3_vl":
        assert {f"model.visual.deepstack_merger_list.{i}.linear_fc1.weight" for i in range(3)} <= changed
    assert any("layers.0.self_attn.q_proj" in name for name in changed)  # LoRA merged
    assert not any("visual.blocks." in name or "patch_embed" in name for name in changed)  # frozen
