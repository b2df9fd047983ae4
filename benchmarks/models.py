"""Random-weight models and inputs of the speed benchmark: one set of weights shared by stock LLaVA and ADSC-LLaVA."""

import gc

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
    SiglipVisionConfig,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from adsc_llava import AdscLlavaConfig
from adsc_llava.cost import LlavaDims, load_config
from adsc_llava.cost_qwen import is_qwen
from adsc_llava.families import family_of

STOCK_MODEL_CLASSES = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
}
# Vision tokens per image of the presets: CLIP ViT-L/14 at 336 px, the CLS token dropped.
PRESET_IMAGE_SIZE, PRESET_PATCH_SIZE = 336, 14
PRESETS = ("cpu", "tiny", "cpu-next", "cpu-onevision-video", "cpu-qwen2.5-vl", "cpu-qwen2.5-vl-video")
# The visual input of the anyres presets: a 640 x 480 photo for LLaVA-NeXT (2,340 tokens), a 32-frame video for
# OneVision (6,273 tokens); Qwen2.5-VL: a 1280 x 720 photo (1,196 tokens) and a 32-frame 640 x 360 video (16 temporal
# patches of 13 x 23: 4,784 tokens in one unit). LLaVA-1.5 presets feed 576-token images.
PRESET_INPUTS = {
    "cpu-next": {"image_size": (480, 640)},
    "cpu-onevision-video": {"video_frames": 32},
    "cpu-qwen2.5-vl": {"image_size": (720, 1280)},
    "cpu-qwen2.5-vl-video": {"video_frames": 32, "image_size": (360, 640)},
}
# llava-v1.6's grid pinpoints (H, W) at 336 px crops; OneVision's at 384 px.
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
ONEVISION_PINPOINTS = [[384 * rows, 384 * columns] for rows in range(1, 7) for columns in range(1, 7)]
# Text tokens placed before the image(s), like "<s> USER:" in LLaVA's prompt; the rest of the prompt follows them.
PROMPT_PREFIX_TOKENS = 5
FIRST_WORD_ID = 3  # after <unk>, <s>, </s>


def preset_config(name: str) -> LlavaConfig:
    """The random-weight configs of the CPU benchmark (`"cpu"`) and of its smoke test (`"tiny"`).

    Both have 576 vision tokens per image. Their CLIP tower is minimal: by default it never runs (the image features
    are fed precomputed) and with `--vision-tower` it stays cheap next to the LLM.
    """
    if name.startswith("cpu"):
        text = dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=16, num_attention_heads=16)
        text.update(num_key_value_heads=16, vocab_size=32064)
    elif name == "tiny":
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=10, num_attention_heads=4)
        text.update(num_key_value_heads=4, vocab_size=512)
    else:
        raise ValueError(f"Unknown preset {name!r}: expected one of {', '.join(PRESETS)}.")
    vocab_size = text["vocab_size"]
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        image_size=PRESET_IMAGE_SIZE,
        patch_size=PRESET_PATCH_SIZE,
    )
    text_config = LlamaConfig(
        **text, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=vocab_size - 1
    )
    if name == "cpu-next":
        return LlavaNextConfig(
            vision_config=vision.to_dict(),
            text_config=text_config.to_dict(),
            image_token_index=vocab_size - 64,
            image_grid_pinpoints=NEXT_PINPOINTS,
            tie_word_embeddings=False,
        )
    if name.startswith("cpu-qwen2.5-vl"):
        # The CPU LLM with M-RoPE over its 32 rotary frequencies in Qwen2.5-VL's 1 : 1.5 : 1.5 split.
        rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}
        qwen_text = dict(text, max_position_embeddings=32768, rope_parameters=rope, pad_token_id=vocab_size - 1)
        qwen_vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=1, out_hidden_size=1024)
        qwen_vision.update(patch_size=14, window_size=112, fullatt_block_indexes=[0])
        return Qwen2_5_VLConfig(
            text_config=qwen_text,
            vision_config=qwen_vision,
            image_token_id=vocab_size - 64,
            video_token_id=vocab_size - 63,
            vision_start_token_id=vocab_size - 62,
            vision_end_token_id=vocab_size - 61,
            tie_word_embeddings=False,
        )
    if name == "cpu-onevision-video":
        siglip = SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1, image_size=384
        )
        siglip.patch_size, siglip.vision_use_head = 14, False
        return LlavaOnevisionConfig(
            vision_config=siglip.to_dict(),
            text_config=text_config.to_dict(),
            image_token_index=vocab_size - 64,
            video_token_index=vocab_size - 63,
            image_grid_pinpoints=ONEVISION_PINPOINTS,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            tie_word_embeddings=False,
        )
    return LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=vocab_size - 64,  # 32000 for the 32064 vocabulary, as in LLaVA-1.5
        image_seq_length=(PRESET_IMAGE_SIZE // PRESET_PATCH_SIZE) ** 2,
        tie_word_embeddings=False,
    )


def benchmark_config(name_or_path: str) -> LlavaConfig:
    """A preset (`"cpu"`, `"tiny"`), a shipped reference config (`"llava-1.5-7b"`, ...) or a config path."""
    config = preset_config(name_or_path) if name_or_path in PRESETS else load_config(name_or_path)
    # The benchmark sets the schedules itself, from the stock config.
    return config.to_llava_config() if isinstance(config, AdscLlavaConfig) else config


def share_parameters(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Make every parameter of `target` the very tensor of `source` with the same name (freeing target's own).

    Raises:
        ValueError: if the two models do not have the same parameter names and shapes.
    """
    source_parameters = dict(source.named_parameters(remove_duplicate=False))
    target_shapes = {name: param.shape for name, param in target.named_parameters(remove_duplicate=False)}
    if {name: param.shape for name, param in source_parameters.items()} != target_shapes:
        raise ValueError("The stock and ADSC models do not have the same parameters; they cannot share weights.")
    for name, param in source_parameters.items():
        module_name, _, param_name = name.rpartition(".")
        setattr(target.get_submodule(module_name), param_name, param)


def build_models(
    config: LlavaConfig, device: torch.device, dtype: torch.dtype, attn_implementation: str, seed: int
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A stock model of the config's family with random weights and its ADSC twin (empty schedule) sharing the very
    same weight tensors."""
    family = family_of(config.model_type)
    torch.manual_seed(seed)
    with torch.device(device):
        stock = STOCK_MODEL_CLASSES[family.stock_type]._from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
        adsc = family.model_class._from_config(
            family.config_class.from_stock_config(config), dtype=dtype, attn_implementation=attn_implementation
        )
    share_parameters(stock, adsc)
    gc.collect()
    return stock.eval(), adsc.eval()


def make_inputs(
    config: LlavaConfig,
    *,
    prompt_tokens: int,
    num_images: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    vision_tower: bool,
    seed: int,
    visual_input: dict | None = None,
) -> dict:
    """Identical prompts of `prompt_tokens` random words with `num_images` images after the first few words.

    Returns the forward's keyword arguments: `input_ids` and `attention_mask` `(batch, T + images x tokens)`, and
    either `pixel_values` `(batch x images, 3, H, W)` (`vision_tower`) or `mm_encoder_outputs` holding the projected
    features, one `(tokens_per_image, hidden)` tensor per image. `visual_input` (`{"image_size": (H, W)}` or
    `{"video_frames": N}`) sizes the inputs of LLaVA-NeXT / OneVision configs, whose features are always fed.
    """
    visual_input = visual_input or {}
    dims = LlavaDims.from_config(config).for_input(config, **visual_input)
    video = "video_frames" in visual_input
    placeholder = config.video_token_id if video else config.image_token_id
    generator = torch.Generator().manual_seed(seed)
    high = min(config.text_config.vocab_size, config.image_token_id)
    words = torch.randint(FIRST_WORD_ID, high, (prompt_tokens,), generator=generator)
    image_tokens = torch.full((num_images * dims.vision_tokens_per_image,), placeholder)
    split = min(PROMPT_PREFIX_TOKENS, prompt_tokens)
    row = torch.cat([words[:split], image_tokens, words[split:]])
    input_ids = row.repeat(batch_size, 1).to(device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if num_images == 0:
        return inputs
    if vision_tower:
        if visual_input:
            raise ValueError("--vision-tower runs LLaVA-1.5 presets only: NeXT / OneVision presets feed features.")
        pixels = torch.randn(batch_size * num_images, 3, dims.image_size, dims.image_size, generator=generator)
        inputs["pixel_values"] = pixels.to(device, dtype)
    else:
        # Projected features of the scale of the token embeddings (`initializer_range`).
        features = torch.randn(num_images, dims.vision_tokens_per_image, dims.hidden_size, generator=generator)
        features = (features * config.text_config.initializer_range).to(device, dtype)
        pooled = [features[image] for _ in range(batch_size) for image in range(num_images)]
        if video and not is_qwen(config):  # OneVision's video tower returns one `(videos, tokens, hidden)` tensor
            inputs["mm_encoder_outputs"] = {"video": BaseModelOutputWithPooling(pooler_output=torch.stack(pooled))}
        else:
            kind = "video" if video else "image"
            inputs["mm_encoder_outputs"] = {kind: BaseModelOutputWithPooling(pooler_output=pooled)}
    return inputs
