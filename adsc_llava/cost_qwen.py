"""What Qwen2.5-VL and Qwen3-VL inputs cost: placeholder tokens per image or video, and the vision side's FLOPs.

Token counts follow the processors of transformers 5.24 with the hub checkpoints' settings (`preprocessor_config.json`
and `video_preprocessor_config.json`, which `config.json` does not hold, so they are `PROCESSOR_PIXELS` here):
`smart_resize` rounds each side to a multiple of `patch_size * merge_size` and rescales the whole picture into
`[min_pixels, max_pixels]` (Qwen3-VL's video processor bounds the pixels of all frames together); `temporal_patch_size`
frames make one temporal patch (a last odd frame is repeated); every `merge_size x merge_size` patches are one LLM
token. The grids are in patches, `(t, h, w)`, as `image_grid_thw` / `video_grid_thw`.

FLOPs follow `adsc_llava.cost`'s conventions (2 x in x out per token per linear, biases not counted, `4 L^2 d` for
the attention matmuls of one `L`-token sequence, element-wise work not counted):

- Qwen2.5-VL's ViT: a `C x T x p x p -> d` patch embedding, then `depth` blocks of q/k/v/o and a gated MLP; the
  `fullatt_block_indexes` blocks attend over each frame, the others within windows of `window_size` px (tiles of
  `window_size / patch_size / merge_size` merged tokens per side, smaller at the right and bottom edges); the patch
  merger `4d -> 4d -> out`;
- Qwen3-VL's ViT: the same embedding, `depth` blocks of q/k/v/o and a two-layer MLP attending over each frame, the
  merger and one DeepStack merger per `deepstack_visual_indexes` entry (same shapes).
"""

import math

# (min_pixels, max_pixels) of the hub processors. Qwen2.5-VL ships no video_preprocessor_config.json, so transformers
# builds its video processor from preprocessor_config.json: frames get the images' limits.
PROCESSOR_PIXELS = {
    "qwen2_5_vl": {"image": (3136, 12845056), "video": (3136, 12845056)},
    "qwen3_vl": {"image": (65536, 16777216), "video": (4096, 25165824)},
}
# The photo budgets refer to (`adsc_reference_tokens`), (H, W).
REFERENCE_IMAGE_SIZE = (720, 1280)


def qwen_family(config) -> str:
    """`"qwen2_5_vl"` or `"qwen3_vl"` for a stock or ADSC config of either family."""
    return config.model_type.removeprefix("adsc_")


def is_qwen(config) -> bool:
    return qwen_family(config) in PROCESSOR_PIXELS


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int, frames: int = 1):
    """The processors' resize: sides multiples of `factor`, `frames x H x W` pixels within `[min, max]` (H, W)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"Qwen-VL processors refuse aspect ratios above 200, got {height} x {width}.")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if frames * h_bar * w_bar > max_pixels:
        beta = math.sqrt(frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif frames * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_grid(config, height: int, width: int) -> tuple[int, int, int]:
    """`image_grid_thw` of one `height x width` image: `(1, h, w)` patches."""
    vision = config.vision_config
    factor = vision.patch_size * vision.spatial_merge_size
    h_bar, w_bar = smart_resize(height, width, factor, *PROCESSOR_PIXELS[qwen_family(config)]["image"])
    return 1, h_bar // vision.patch_size, w_bar // vision.patch_size


def video_grid(config, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """`video_grid_thw` of `frames` frames of `height x width`: `(temporal patches, h, w)`."""
    vision = config.vision_config
    factor, temporal = vision.patch_size * vision.spatial_merge_size, vision.temporal_patch_size
    min_pixels, max_pixels = PROCESSOR_PIXELS[qwen_family(config)]["video"]
    # Qwen3-VL bounds all frames' pixels together (its smart_resize rounds the frame count to temporal patches).
    together = round(frames / temporal) * temporal if qwen_family(config) == "qwen3_vl" else 1
    h_bar, w_bar = smart_resize(height, width, factor, min_pixels, max_pixels, frames=together)
    return math.ceil(frames / temporal), h_bar // vision.patch_size, w_bar // vision.patch_size


def visual_units(config, grid: tuple[int, int, int], video: bool) -> list[int]:
    """Tokens of each visual unit of one input: an image or a Qwen2.5-VL video is one unit; a Qwen3-VL video is one
    unit per temporal patch (its processor writes each as its own `<|vision_start|> ... <|vision_end|>` run)."""
    t, h, w = grid
    per_frame = h * w // config.vision_config.spatial_merge_size**2
    if video and qwen_family(config) == "qwen3_vl":
        return [per_frame] * t
    return [t * per_frame]


def _linear(tokens: int, in_features: int, out_features: int) -> int:
    return 2 * tokens * in_features * out_features


def _attention(length: int, dim: int) -> int:
    return 4 * length * length * dim


def window_lengths(config, grid: tuple[int, int, int]) -> list[int]:
    """Qwen2.5-VL's attention windows of one input: the patches in each, frame by frame."""
    vision = config.vision_config
    merge = vision.spatial_merge_size
    side = vision.window_size // merge // vision.patch_size  # merged tokens per window side
    t, h, w = grid
    rows, columns = h // merge, w // merge
    tiles = [
        min(side, rows - top) * min(side, columns - left)
        for top in range(0, rows, side)
        for left in range(0, columns, side)
    ]
    return [merge * merge * tile for tile in tiles] * t


def vision_flops(config, grid: tuple[int, int, int]) -> tuple[int, int]:
    """(vision tower, projector) FLOPs of one input of `grid` patches; the projector is the patch merger(s)."""
    vision = config.vision_config
    t, h, w = grid
    patches, hidden = t * h * w, vision.hidden_size
    merged_hidden = hidden * vision.spatial_merge_size**2
    embedding = _linear(patches, vision.in_channels * vision.temporal_patch_size * vision.patch_size**2, hidden)
    projections = _linear(patches, hidden, 3 * hidden) + _linear(patches, hidden, hidden)
    frame_attention = t * _attention(h * w, hidden)
    if qwen_family(config) == "qwen2_5_vl":
        mlp = 3 * _linear(patches, hidden, vision.intermediate_size)  # gate, up, down
        window_attention = sum(_attention(length, hidden) for length in window_lengths(config, grid))
        full_layers = len(vision.fullatt_block_indexes)
        attention = full_layers * frame_attention + (vision.depth - full_layers) * window_attention
        mergers = 1
    else:
        mlp = 2 * _linear(patches, hidden, vision.intermediate_size)
        attention = vision.depth * frame_attention
        mergers = 1 + len(vision.deepstack_visual_indexes)
    tower = embedding + vision.depth * (projections + mlp) + attention
    merged = patches // vision.spatial_merge_size**2
    merger = _linear(merged, merged_hidden, merged_hidden) + _linear(merged, merged_hidden, vision.out_hidden_size)
    return tower, mergers * merger


__all__ = [
    "PROCESSOR_PIXELS",
    "REFERENCE_IMAGE_SIZE",
    "image_grid",
    "is_qwen",
    "video_grid",
    "vision_flops",
    "visual_units",
]
