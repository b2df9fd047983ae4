"""Offline builders for tiny LLaVA pieces: a word-level tokenizer, a processor and a random-weight model config.

Used by the tests, the CPU training run and the demo. Nothing here downloads anything: every object is built from
code and round-trips through `save_pretrained` / `Auto*.from_pretrained` from a local folder.

The tokenizer mimics what matters of LLaVA-1.5's Llama tokenizer for our pipeline: `<s>` is prepended to every
sequence (no `</s>` appended), `<image>` is a single special token, `</s>` ends assistant turns and `<pad>` pads.
"""

import math
from collections.abc import Iterable

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
IMAGE_TOKEN = "<image>"
# Order fixes the ids: <unk>=0, <s>=1, </s>=2 as in Llama; <pad>=3, <image>=4.
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN)
# Words of the prompt format that must stay single tokens whatever the pre-tokenizer does.
PROMPT_WORDS = ("USER:", "ASSISTANT:", "\n")

# The chat template of llava-hf/llava-1.5-{7,13}b-hf (chat_template.json), reproduced token for token:
#   USER: <image>\n<question> ASSISTANT: <answer> USER: <question 2> ASSISTANT:
# It emits no `</s>` after an answer; `adsc_llava.train.data` appends the end-of-turn token when a template does not.
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}"
    "{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}"
    "{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}"
    "{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}"
    "{{ content['text'] + ' '}}"
    "{% endgeneration %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ 'ASSISTANT:' }}"
    "{% endif %}"
)

# A small vocabulary for demos and smoke runs (tests pass their own words).
DEMO_WORDS = (
    "what", "is", "in", "the", "image", "?", "describe", "it", "a", "an", "red", "green", "blue", "white", "black",
    "square", "circle", "on", "background", "color", "of", "shape", "there", "yes", "no", "and", "this", "picture",
    "shows", "how", "many", "one", "two", "three", ".", ",",
)  # fmt: skip


def word_level_backend(
    special_tokens: Iterable[str], prompt_words: Iterable[str], words: Iterable[str]
) -> tuple[Tokenizer, dict[str, int]]:
    """A word-level `tokenizers` backend over the special tokens, the prompt words and `words` (ids in that order,
    duplicates dropped), splitting on spaces and tabs and keeping "\\n" as its own token; and its vocabulary."""
    special_tokens, prompt_words = tuple(special_tokens), tuple(prompt_words)
    vocab: dict[str, int] = {}
    for token in (*special_tokens, *prompt_words, *words):
        if not isinstance(token, str) or not token:
            raise ValueError(f"Vocabulary entries must be non-empty strings, got {token!r}")
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Split on horizontal whitespace (dropped) and isolate "\n" so the prompt's "<image>\n" stays two tokens.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
            pre_tokenizers.Split("\n", behavior="isolated"),
        ]
    )
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special_tokens])
    # Added (non-special) tokens are matched before pre-tokenization, so these are single tokens in any context.
    backend.add_tokens([AddedToken(token, special=False, normalized=False) for token in prompt_words])
    return backend, vocab


def build_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer over `words` plus the special tokens and LLaVA's prompt words.

    Returns a `TokenizersBackend` (transformers 5.x's name for `PreTrainedTokenizerFast`, kept as an alias).

    Ids: `<unk>`=0, `<s>`=1, `</s>`=2, `<pad>`=3, `<image>`=4, then "USER:", "ASSISTANT:", "\\n", then `words`
    in order (duplicates dropped). Text splits on spaces and tabs; "\\n" is kept as its own token. Encoding
    prepends `<s>` (like Llama's `add_bos_token`); decoding joins tokens with single spaces.
    """
    backend, vocab = word_level_backend(SPECIAL_TOKENS, PROMPT_WORDS, words)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
    )
    # The WordPiece decoder without cleanup joins tokens with spaces (no "##" pieces exist in this vocabulary).
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="right",
    )


def build_image_processor(image_size: int) -> CLIPImageProcessorPil:
    """PIL (torchvision-free) CLIP image processor: resize the shortest edge to `image_size`, centre-crop a square."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def build_processor(
    tokenizer: PreTrainedTokenizerFast,
    image_size: int,
    patch_size: int,
    chat_template: str = LLAVA_HF_CHAT_TEMPLATE,
) -> LlavaProcessor:
    """LLaVA-1.5 style processor: `<image>` expands to `(image_size // patch_size) ** 2` tokens (CLS dropped)."""
    if image_size % patch_size != 0:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    return LlavaProcessor(
        image_processor=build_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        # CLIP adds a CLS token (+1) that the "default" strategy drops again (-1), as in llava-hf checkpoints.
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template,
    )


def tiny_llava_config(
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int,
    *,
    bos_token_id: int | None = 1,
    eos_token_id: int | None = 2,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    text_hidden: int = 64,
    text_layers: int = 4,
    text_heads: int = 4,
    text_kv_heads: int | None = None,
    text_intermediate: int = 128,
    max_position_embeddings: int = 4096,
    rope_theta: float = 10000.0,
    text_initializer_range: float = 0.02,
    vision_feature_layer: int = -2,
) -> LlavaConfig:
    """A LLaVA-1.5-shaped config small enough for CPU tests: CLIP vision tower + Llama LM, untied embeddings.

    Same structure as llava-1.5-7b-hf (feature layer -2 by default, "default" strategy, 2-layer GELU projector with
    bias, MHA unless `text_kv_heads` asks for GQA), so each image yields `(image_size // patch_size) ** 2` vision
    tokens in the LM.
    `vision_feature_layer` is the CLIP layer whose output feeds the projector (LLaVA-1.5's -2, the second-to-last;
    -1 lets a shallow from-scratch tower use all its layers), so `vision_layers` must be >= -vision_feature_layer.
    `rope_theta` is the LM's RoPE base (Llama's 10,000 by default).
    `text_initializer_range` is the std of the LM's and projector's initial weights (Llama's 0.02, tuned for
    4096-wide models; a narrow model trained from scratch learns faster from a larger one).
    """
    if not -vision_layers <= vision_feature_layer <= -1:
        raise ValueError(
            f"vision_feature_layer must lie in [-{vision_layers}, -1] for a {vision_layers}-layer tower, "
            f"got {vision_feature_layer} (vision_layers must be >= -vision_feature_layer)"
        )
    if image_size % patch_size != 0:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    if not 0 <= image_token_id < vocab_size or not 0 <= pad_token_id < vocab_size:
        raise ValueError(
            f"image_token_id ({image_token_id}) and pad_token_id ({pad_token_id}) must lie in [0, {vocab_size})"
        )
    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=text_intermediate,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads or text_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        rms_norm_eps=1e-5,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
        initializer_range=text_initializer_range,
    )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=vision_feature_layer,
        tie_word_embeddings=False,
        pad_token_id=pad_token_id,
    )


def build_tiny_processor(
    words: Iterable[str] = DEMO_WORDS, image_size: int = 32, patch_size: int = 8
) -> LlavaProcessor:
    """Tokenizer + processor in one call (the demo and smoke runs use this)."""
    return build_processor(build_word_tokenizer(words), image_size=image_size, patch_size=patch_size)


def tiny_llava_config_for(
    processor: LlavaProcessor, image_size: int = 32, patch_size: int = 8, **kwargs
) -> LlavaConfig:
    """`tiny_llava_config` with vocabulary size and special ids read from `processor.tokenizer`."""
    tokenizer = processor.tokenizer
    return tiny_llava_config(
        vocab_size=len(tokenizer),
        image_token_id=processor.image_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        image_size=image_size,
        patch_size=patch_size,
        **kwargs,
    )


def sincos_2d_position_embeddings(grid_size: int, dim: int, scale: float = 1.0) -> torch.Tensor:
    """Fixed 2-D sin-cos codes `[grid_size ** 2, dim]` for the patches of a `grid_size` x `grid_size` grid, row-major.

    The first half of the channels encodes the row, the second half the column, each as sines and cosines of
    `dim // 4` frequencies (as in MAE / ViT-style 2-D embeddings), times `scale`. Used to start a from-scratch CLIP
    tower with the spatial layout a pretrained one has already learned.
    """
    if dim % 4 != 0:
        raise ValueError(f"dim must be a multiple of 4 (sin and cos of rows and columns), got {dim}")
    frequencies = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coordinates = torch.arange(grid_size, dtype=torch.float64) * (4 * math.pi / grid_size)
    rows, columns = torch.meshgrid(coordinates, coordinates, indexing="ij")
    codes = []
    for coordinate in (rows.flatten(), columns.flatten()):
        angles = coordinate[:, None] * frequencies[None, :]
        codes += [angles.sin(), angles.cos()]
    return (torch.cat(codes, dim=1) * scale).float()


@torch.no_grad()
def init_patch_position_embeddings(model: LlavaForConditionalGeneration, scale: float) -> None:
    """Set the CLIP tower's patch position embeddings of `model` to `sincos_2d_position_embeddings` (CLS unchanged)."""
    embeddings = model.model.vision_tower.embeddings
    grid_size = embeddings.image_size // embeddings.patch_size
    weight = embeddings.position_embedding.weight
    weight[1:] = sincos_2d_position_embeddings(grid_size, weight.shape[1], scale).to(weight)


def build_next_processor(
    tokenizer: PreTrainedTokenizerFast,
    crop_size: int,
    patch_size: int,
    grid_pinpoints: list[list[int]],
    chat_template: str = LLAVA_HF_CHAT_TEMPLATE,
) -> LlavaNextProcessor:
    """LLaVA-NeXT style processor (PIL, offline): images cut into a size-dependent grid of `crop_size` crops."""
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": crop_size},
        crop_size={"height": crop_size, "width": crop_size},
        image_grid_pinpoints=grid_pinpoints,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, dropped again by the "default" strategy
        chat_template=chat_template,
    )


# Qwen-VL: special tokens in Qwen's order of use; `<|im_end|>` ends turns (EOS), `<|endoftext|>` pads, no BOS.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN_PROMPT_WORDS = ("user", "assistant", "system", "\n")
# Qwen2-VL's chat template without the default system turn, with generation markers around the answers:
#   <|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>question<|im_end|>\n<|im_start|>assistant\n
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] + '<|im_end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% generation %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ '<|im_end|>' }}"
    "{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% else %}{{ ' ' + content['text'] + ' ' }}{% endif %}"
    "{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_qwen_tokenizer(words: Iterable[str] = DEMO_WORDS) -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer shaped like Qwen's: its special tokens (ids 0..6 in `QWEN_SPECIAL_TOKENS` order),
    `<unk>`, the chat roles and "\\n", then `words`. No BOS; `<|im_end|>` is EOS, `<|endoftext|>` pads."""
    backend, _ = word_level_backend((*QWEN_SPECIAL_TOKENS, UNK_TOKEN), QWEN_PROMPT_WORDS, words)
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=UNK_TOKEN,
        padding_side="right",
    )


def build_qwen_processor(
    tokenizer: PreTrainedTokenizerFast, patch_size: int = 4, max_pixels: int = 64 * 64, min_pixels: int = 64
):
    """An offline Qwen-VL processor for images (`QwenVLImageProcessor`: torchvision-free, no video processor).

    Images are resized to multiples of `2 * patch_size` within `[min_pixels, max_pixels]` pixels, as Qwen's
    `smart_resize` does; each 2 x 2 block of patches is one `<|image_pad|>` token.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from adsc_llava.processing_qwen_images import QwenVLImageProcessor

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size, merge_size=2, temporal_patch_size=2, min_pixels=min_pixels, max_pixels=max_pixels
    )
    return QwenVLImageProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE)


def tiny_qwen_vl_config(family: str, tokenizer: PreTrainedTokenizerFast, *, patch_size: int = 4, text_layers: int = 4):
    """A Qwen2.5-VL (`family="qwen2_5_vl"`) or Qwen3-VL (`"qwen3_vl"`) config small enough for CPU tests.

    Text model: 4 layers x 64, 4 heads (GQA: 2 KV heads) of 16, M-RoPE sections over the 8 rotary frequencies as in
    the real models (Qwen2.5-VL contiguous `[2, 3, 3]`, Qwen3-VL interleaved `[4, 2, 2]`). Vision tower: 2 (Qwen3-VL:
    3, each feeding DeepStack) layers of 32 on `patch_size` px patches merged 2 x 2, Qwen2.5-VL attending in 16 px
    windows except in its last layer.
    """
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=text_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=48,
        num_heads=2,
        patch_size=patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=64,
    )
    tokens = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    if family == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
        vision.update(depth=2, window_size=4 * patch_size, fullatt_block_indexes=[1], tokens_per_second=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    if family == "qwen3_vl":
        text.update(head_dim=16)
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        }
        vision.update(depth=3, num_position_embeddings=16, deepstack_visual_indexes=[0, 1, 2])
        return Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
    raise ValueError(f"family must be 'qwen2_5_vl' or 'qwen3_vl', got {family!r}")
