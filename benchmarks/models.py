"""Random-weight models and inputs of the speed benchmark: one set of weights shared by stock LLaVA and ADSC-LLaVA."""

import gc

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from adsc_llava import AdscLlavaConfig, AdscLlavaForConditionalGeneration
from adsc_llava.cost import LlavaDims, load_config

# Vision tokens per image of the presets: CLIP ViT-L/14 at 336 px, the CLS token dropped.
PRESET_IMAGE_SIZE, PRESET_PATCH_SIZE = 336, 14
PRESETS = ("cpu", "tiny")
# Text tokens placed before the image(s), like "<s> USER:" in LLaVA's prompt; the rest of the prompt follows them.
PROMPT_PREFIX_TOKENS = 5
FIRST_WORD_ID = 3  # after <unk>, <s>, </s>


def preset_config(name: str) -> LlavaConfig:
    """The random-weight configs of the CPU benchmark (`"cpu"`) and of its smoke test (`"tiny"`).

    Both have 576 vision tokens per image. Their CLIP tower is minimal: by default it never runs (the image features
    are fed precomputed) and with `--vision-tower` it stays cheap next to the LLM.
    """
    if name == "cpu":
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
        **text, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=vocab_size - 1
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
) -> tuple[LlavaForConditionalGeneration, AdscLlavaForConditionalGeneration]:
    """A stock LLaVA with random weights and an ADSC-LLaVA (empty schedule) sharing the very same weight tensors."""
    torch.manual_seed(seed)
    with torch.device(device):
        stock = LlavaForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
        adsc = AdscLlavaForConditionalGeneration._from_config(
            AdscLlavaConfig.from_llava_config(config), dtype=dtype, attn_implementation=attn_implementation
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
) -> dict:
    """Identical prompts of `prompt_tokens` random words with `num_images` images after the first few words.

    Returns the forward's keyword arguments: `input_ids` and `attention_mask` `(batch, T + images x tokens)`, and
    either `pixel_values` `(batch x images, 3, H, W)` (`vision_tower`) or `mm_encoder_outputs` holding the projected
    features, one `(tokens_per_image, hidden)` tensor per image.
    """
    dims = LlavaDims.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    high = min(config.text_config.vocab_size, config.image_token_id)
    words = torch.randint(FIRST_WORD_ID, high, (prompt_tokens,), generator=generator)
    image_tokens = torch.full((num_images * dims.vision_tokens_per_image,), config.image_token_id)
    split = min(PROMPT_PREFIX_TOKENS, prompt_tokens)
    row = torch.cat([words[:split], image_tokens, words[split:]])
    input_ids = row.repeat(batch_size, 1).to(device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if num_images == 0:
        return inputs
    if vision_tower:
        pixels = torch.randn(batch_size * num_images, 3, dims.image_size, dims.image_size, generator=generator)
        inputs["pixel_values"] = pixels.to(device, dtype)
    else:
        # Projected features of the scale of the token embeddings (`initializer_range`).
        features = torch.randn(num_images, dims.vision_tokens_per_image, dims.hidden_size, generator=generator)
        features = (features * config.text_config.initializer_range).to(device, dtype)
        pooled = [features[image] for _ in range(batch_size) for image in range(num_images)]
        inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=pooled)}
    return inputs
