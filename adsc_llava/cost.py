"""Analytic cost model of (ADSC-)LLaVA and Qwen-VL: FLOPs of every component and KV-cache bytes, per layer.

The counting conventions are those of the DeepSpeed flops profiler, which the paper used for its Table IV:

- a linear layer costs `2 * in_features * out_features` FLOPs per token; biases are not counted;
- attention scores (`Q @ K^T`) and the weighted sum (`A @ V`) each cost `2 * Lq * Lk * num_heads * head_dim`: the
  full `Lq x Lk` square, causality ignored;
- element-wise work (norms, activations, softmax, rotary embeddings, residual adds) is not counted: it grows with
  `tokens x hidden`, not `tokens x hidden^2`. (DeepSpeed adds some of it; `FlopCounterMode` does not.)
- the CLIP patch embedding (a `p x p` convolution with stride `p`, no bias) is a linear `C * p * p -> hidden` per
  patch, which is what both DeepSpeed (`2 x` MACs) and `torch.utils.flop_counter.FlopCounterMode` count for it;
- every vision encoder layer runs on `num_patches + 1` tokens (the CLS token), even with `vision_feature_layer=-2`:
  transformers runs the whole tower and picks a hidden state;
- `generate(max_new_tokens=G)` = one prefill + `G - 1` decode steps: the last generated token is never fed back.
  Decode step `j` (1-based) feeds one token whose keys at layer `l` are the `n_l` prefill positions kept there plus
  the `j` tokens fed so far;
- the lm_head runs on every position the last decoder layer outputs in the prefill (`lm_head_positions="all"`, as in
  the paper; transformers' `generate` keeps only the last one: `lm_head_positions="last"`) and on the one position of
  each decode step. With pruning that is `T + n_last` positions, not `T + 576`: counting all 576 would overshoot the
  paper's pruned rows by 0.13-0.15 TFLOPs.

The KV cache holds, per layer, `2 (K, V) x num_key_value_heads x head_dim x length` values per sequence; `length`
is the layer's prefill positions plus the tokens fed back so far, so it peaks after the last decode step at
`T + num_images * n_l + G - 1`. Megabytes are 10**6 bytes (`kv_megabytes`; `kv_mebibytes` gives 2**20): with an fp32
cache this reproduces the analytic figures 730.9 / 327.7 / 261.1 / 193.9 MB for the paper's four 7B rows.

Every dimension is read from the config (`text_config`, `vision_config`), so llava-hf configs that omit the Llama
defaults from their JSON work as loaded. `T` (`prompt_tokens`) counts the text tokens of the prompt only: the
`<image>` placeholders are expanded to `num_images x vision_tokens_per_image` separately.

Qwen2.5-VL and Qwen3-VL: the language model is counted as above (Qwen3-VL's q/k norms are element-wise); the input's
grid, its visual units and the vision side's FLOPs come from `adsc_llava.cost_qwen`. A Qwen3-VL video is one unit per
temporal patch, so `vision_tokens_per_image` is then a frame's tokens and `units_per_input` the frames.

Example:

```python
>>> from adsc_llava.cost import adsc_config, estimate_cost, load_reference_config
>>> config = adsc_config(load_reference_config("llava-1.5-7b")).with_budget(192)
>>> report = estimate_cost(config, prompt_tokens=58, new_tokens=64)
>>> round(report.tflops, 2), round(report.kv_megabytes, 1)
(4.55, 327.7)
```
"""

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from transformers import LlavaConfig

from adsc_llava import cost_qwen
from adsc_llava.configuration_adsc_llava import (
    AdscLlavaConfig,
)

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"  # package data
REFERENCE_CONFIGS = (
    "llava-1.5-7b",
    "llava-1.5-13b",
    "llava-next-7b",
    "llava-onevision-7b",
    "qwen2.5-vl-7b",
    "qwen3-vl-8b",
)

# Decoder-only text models whose layers are Llama-shaped: q/k/v/o projections and a gated (gate/up/down) MLP.
GATED_MLP_TEXT_MODELS = ("llama", "mistral", "qwen2", "qwen2_5_vl_text", "qwen3_vl_text")
# ViT towers with a bias-free patch convolution, and whether each has a CLS token.
VISION_MODELS = {"clip_vision_model": True, "siglip_vision_model": False}
# The image NeXT / OneVision budgets and tables refer to by default: a 640 x 480 photo, (H, W).
REFERENCE_IMAGE_SIZE = (480, 640)

# Table IV of the paper (LLaVA-1.5-7B, T = 58 text tokens, G = 64 generated tokens, pruning at layers [2, 8, 16, 24]):
# budget (average vision tokens per layer) -> (TFLOPs, KV cache MB). 576 is stock LLaVA.
PAPER_TABLE_IV = {576: (9.85, 784.3), 192: (4.56, 339.5), 128: (3.71, 272.0), 64: (2.85, 205.2)}
PAPER_PROMPT_TOKENS = 58
PAPER_NEW_TOKENS = 64
PAPER_PRUNING_LAYERS = [2, 8, 16, 24]
PAPER_REFERENCE_CONFIG = "llava-1.5-7b"
PAPER_KV_DTYPE_BYTES = 4  # the paper's KV figures grow by ~1.05 MB per average vision token: an fp32 cache

DTYPE_BYTES = {
    "float64": 8,
    "float32": 4,
    "fp32": 4,
    "float16": 2,
    "fp16": 2,
    "half": 2,
    "bfloat16": 2,
    "bf16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "fp8": 1,
    "int8": 1,
}

LmHeadPositions = Literal["all", "last"]


@dataclass(frozen=True)
class LlavaDims:
    """The dimensions of a LLaVA model that its cost depends on, read from a `LlavaConfig`."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_num_layers: int
    image_size: int
    patch_size: int
    num_channels: int
    num_feature_layers: int
    vision_tokens_per_image: int  # placeholders one image (or video) takes in the LLM's sequence
    has_cls: bool = True  # CLIP's class token (SigLIP has none)
    crops_per_image: int = 1  # vision-tower passes per image: NeXT / OneVision crops with the base view, or frames
    projector_tokens_per_image: int | None = None  # features projected per image; default vision_tokens_per_image
    units_per_input: int = 1  # visual units per image or video, of `vision_tokens_per_image` tokens each
    vision_tower_flops_per_input: int | None = None  # Qwen-VL: the tower's FLOPs on one input, by its grid
    projector_flops_per_input: int | None = None  # Qwen-VL: the patch merger(s)

    @property
    def num_patches(self) -> int:
        """Patches per crop: `(image_size // patch_size) ** 2`."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def vision_sequence_length(self) -> int:
        """Tokens each vision encoder layer runs on: the patches, plus the CLS token where the tower has one."""
        return self.num_patches + int(self.has_cls)

    @classmethod
    def from_config(cls, config: LlavaConfig) -> "LlavaDims":
        """Read the dimensions from a (stock or ADSC) LLaVA or Qwen-VL config.

        Raises:
            ValueError: if the text or vision model is of a kind this cost model does not describe, or if
                `vision_feature_select_strategy` is unknown.
        """
        if cost_qwen.is_qwen(config):
            return cls.from_qwen_config(config)
        text, vision = text_dims(config.text_config), config.vision_config
        if vision.model_type not in VISION_MODELS:
            raise ValueError(
                f"vision_config.model_type {vision.model_type!r} is not supported by the cost model: it describes "
                f"ViT towers ({', '.join(VISION_MODELS)})."
            )
        if getattr(vision, "vision_use_head", False):
            raise ValueError(
                "The cost model describes SigLIP towers without their pooling head (vision_use_head=False), as in "
                "LLaVA-OneVision; this config has the head."
            )
        has_cls = VISION_MODELS[vision.model_type]
        num_patches = (vision.image_size // vision.patch_size) ** 2
        strategy = config.vision_feature_select_strategy
        if strategy == "default":  # the CLS token is dropped before the projector
            vision_tokens_per_image = num_patches
        elif strategy == "full":
            vision_tokens_per_image = num_patches + int(has_cls)
        else:
            raise ValueError(f"Unknown vision_feature_select_strategy {strategy!r}: expected 'default' or 'full'.")
        feature_layer = config.vision_feature_layer
        return cls(
            **text,
            vision_hidden_size=vision.hidden_size,
            vision_intermediate_size=vision.intermediate_size,
            vision_num_layers=vision.num_hidden_layers,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            num_channels=vision.num_channels,
            num_feature_layers=1 if isinstance(feature_layer, int) else len(feature_layer),
            vision_tokens_per_image=vision_tokens_per_image,
            has_cls=has_cls,
        )

    @classmethod
    def from_qwen_config(cls, config) -> "LlavaDims":
        """A Qwen2.5-VL / Qwen3-VL config's dimensions, for its reference image (a 1280 x 720 photo)."""
        vision = config.vision_config
        dims = cls(
            **text_dims(config.text_config),
            vision_hidden_size=vision.hidden_size,
            vision_intermediate_size=vision.intermediate_size,
            vision_num_layers=vision.depth,
            image_size=0,  # native resolution: the input's grid, not a fixed crop, sets the vision side's cost
            patch_size=vision.patch_size,
            num_channels=vision.in_channels,
            num_feature_layers=1,
            vision_tokens_per_image=0,
            has_cls=False,
        )
        return dims.for_input(config)

    def for_input(
        self, config: LlavaConfig, image_size: tuple[int, int] | None = None, video_frames: int | None = None
    ):
        """These dimensions for one input of a LLaVA-NeXT / OneVision / Qwen-VL model: an image of `image_size`
        (H, W) or a video of `video_frames` frames (Qwen-VL: of `image_size` each; default: the family's reference
        image, `reference_image_size`). LLaVA-1.5 takes no input size."""
        if cost_qwen.is_qwen(config):
            height, width = image_size if image_size is not None else cost_qwen.REFERENCE_IMAGE_SIZE
            video = video_frames is not None
            grid = (
                cost_qwen.video_grid(config, video_frames, height, width)
                if video
                else cost_qwen.image_grid(config, height, width)
            )
            units = cost_qwen.visual_units(config, grid, video)
            tower, projector = cost_qwen.vision_flops(config, grid)
            return replace(
                self,
                vision_tokens_per_image=units[0],
                units_per_input=len(units),
                crops_per_image=grid[0],
                vision_tower_flops_per_input=tower,
                projector_flops_per_input=projector,
            )
        if config.model_type in ("llava", "adsc_llava"):
            if image_size is not None or video_frames is not None:
                raise ValueError("LLaVA-1.5 turns every image into the same tokens: give no image size, no frames.")
            return self
        if video_frames is not None:
            tokens, passes, projected = (
                video_tokens(config, video_frames),
                video_frames,
                video_frames * self.num_patches,
            )
        else:
            height, width = image_size if image_size is not None else REFERENCE_IMAGE_SIZE
            tokens, passes = anyres_image_tokens(config, height, width)
            projected = passes * self.vision_tokens_per_image
        return replace(
            self, vision_tokens_per_image=tokens, crops_per_image=passes, projector_tokens_per_image=projected
        )


def text_dims(text) -> dict:
    """The language model's dimensions, from a `text_config`."""
    if text.model_type not in GATED_MLP_TEXT_MODELS:
        raise ValueError(
            f"text_config.model_type {text.model_type!r} is not supported by the cost model: it describes "
            f"decoders with q/k/v/o projections and a gated MLP ({', '.join(GATED_MLP_TEXT_MODELS)})."
        )
    num_attention_heads = text.num_attention_heads
    return dict(
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=getattr(text, "num_key_value_heads", None) or num_attention_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // num_attention_heads,
        vocab_size=text.vocab_size,
    )


def reference_image_size(config) -> tuple[int, int]:
    """The (H, W) photo a NeXT / OneVision / Qwen-VL config's budgets refer to: 640 x 480, or 1280 x 720 for Qwen."""
    return cost_qwen.REFERENCE_IMAGE_SIZE if cost_qwen.is_qwen(config) else REFERENCE_IMAGE_SIZE


def anyres_image_tokens(config, height: int, width: int) -> tuple[int, int]:
    """(placeholder tokens, vision-tower passes) of one `height` x `width` image under LLaVA-NeXT / OneVision.

    The processors' count (transformers 5.24): the image's best grid of crops from `image_grid_pinpoints`, each crop
    `p x p` patches; the stitched grid is unpadded back to the image's aspect ratio; every grid row ends in a newline
    token; the base view's `p x p` tokens come first. OneVision (`anyres_max_N`) then shrinks a grid larger than
    `1.1 x N` crops' worth (bilinear) before the newlines are added. The tower runs on every crop and the base view.
    """
    from transformers.image_processing_utils import select_best_resolution

    vision = config.vision_config
    crop, per_side = vision.image_size, vision.image_size // vision.patch_size
    best_height, best_width = select_best_resolution([height, width], config.image_grid_pinpoints)
    grid_height, grid_width = best_height // crop, best_width // crop
    rows, columns = per_side * grid_height, per_side * grid_width
    if width / height > columns / rows:
        rows -= 2 * ((rows - int(round(height * (columns / width), 7))) // 2)
    else:
        columns -= 2 * ((columns - int(round(width * (rows / height), 7))) // 2)
    aspect = getattr(config, "vision_aspect_ratio", None)
    if aspect is not None:  # OneVision
        ratio = math.sqrt(rows * columns / (int(aspect.removeprefix("anyres_max_")) * per_side**2))
        if ratio > 1.1:
            rows, columns = int(rows // ratio), int(columns // ratio)
    return per_side * per_side + rows * columns + rows, grid_height * grid_width + 1


def video_tokens(config, frames: int) -> int:
    """Placeholder tokens of a OneVision video: each frame's grid pooled 2 x 2 (rounding up), then one newline."""
    per_side = config.vision_config.image_size // config.vision_config.patch_size
    return frames * math.ceil(per_side / 2) ** 2 + 1


# ---------------------------------------------------------------------------------------------------------------
# Per-component FLOPs. Each counts one sequence (or one image); multiply by the batch size for a batch. They match
# what `FlopCounterMode` counts for the corresponding transformers module with eager attention.
# ---------------------------------------------------------------------------------------------------------------


def linear_flops(num_tokens: int, in_features: int, out_features: int) -> int:
    """A linear layer on `num_tokens` tokens: `2 * tokens * in * out` (bias not counted)."""
    return 2 * num_tokens * in_features * out_features


def attention_matmul_flops(num_queries: int, num_keys: int, num_heads: int, head_dim: int) -> int:
    """`Q @ K^T` plus `A @ V` over the full `num_queries x num_keys` square: `4 * Lq * Lk * heads * head_dim`."""
    return 2 * 2 * num_queries * num_keys * num_heads * head_dim


def patch_embedding_flops(dims: LlavaDims) -> int:
    """The patch convolution of one image, counted as a linear `C * p * p -> vision_hidden` on every patch."""
    return linear_flops(dims.num_patches, dims.num_channels * dims.patch_size**2, dims.vision_hidden_size)


def vision_layer_flops(dims: LlavaDims) -> int:
    """One CLIP encoder layer on one image (`num_patches + 1` tokens): q/k/v/o, the two MLP linears, attention."""
    tokens, hidden = dims.vision_sequence_length, dims.vision_hidden_size
    projections = 4 * linear_flops(tokens, hidden, hidden)
    mlp = linear_flops(tokens, hidden, dims.vision_intermediate_size) * 2
    # CLIP's heads split the hidden size, so `heads * head_dim == hidden`.
    return projections + mlp + attention_matmul_flops(tokens, tokens, 1, hidden)


def vision_tower_flops(dims: LlavaDims, num_images: int = 1) -> int:
    """The whole vision tower (patch embedding + every encoder layer) on `num_images` images, every crop of each."""
    if dims.vision_tower_flops_per_input is not None:
        return num_images * dims.vision_tower_flops_per_input
    per_crop = patch_embedding_flops(dims) + dims.vision_num_layers * vision_layer_flops(dims)
    return num_images * dims.crops_per_image * per_crop


def projector_flops(dims: LlavaDims, num_images: int = 1) -> int:
    """The multimodal projector (`linear_1`, GELU, `linear_2`) on the selected vision tokens of `num_images` images."""
    if dims.projector_flops_per_input is not None:
        return num_images * dims.projector_flops_per_input
    tokens = num_images * (dims.projector_tokens_per_image or dims.vision_tokens_per_image)
    in_features = dims.vision_hidden_size * dims.num_feature_layers
    linear_1 = linear_flops(tokens, in_features, dims.hidden_size)
    return linear_1 + linear_flops(tokens, dims.hidden_size, dims.hidden_size)


def decoder_layer_flops(dims: LlavaDims, num_queries: int, num_keys: int) -> int:
    """One Llama decoder layer: `num_queries` new tokens attending to `num_keys` keys (cached ones included).

    In the prefill `num_queries == num_keys`; in a decode step `num_queries == 1`.
    """
    hidden, heads_dim = dims.hidden_size, dims.num_attention_heads * dims.head_dim
    kv_dim = dims.num_key_value_heads * dims.head_dim
    projections = (
        linear_flops(num_queries, hidden, heads_dim)  # q_proj
        + 2 * linear_flops(num_queries, hidden, kv_dim)  # k_proj, v_proj
        + linear_flops(num_queries, heads_dim, hidden)  # o_proj
    )
    mlp = 3 * linear_flops(num_queries, hidden, dims.intermediate_size)  # gate_proj, up_proj, down_proj
    # With grouped-query attention the keys are repeated per query head, so the matmuls span all query heads.
    attention = attention_matmul_flops(num_queries, num_keys, dims.num_attention_heads, dims.head_dim)
    return projections + mlp + attention


def lm_head_flops(dims: LlavaDims, num_positions: int) -> int:
    """The lm_head on `num_positions` positions: `2 * positions * hidden * vocab`."""
    return linear_flops(num_positions, dims.hidden_size, dims.vocab_size)


def kv_bytes_per_position(dims: LlavaDims, dtype_bytes: int) -> int:
    """KV-cache bytes of one cached position in one layer of one sequence: `2 * kv_heads * head_dim * bytes`."""
    return 2 * dims.num_key_value_heads * dims.head_dim * dtype_bytes


def prefill_tokens_per_layer(prompt_tokens: int, num_images: int, schedule: list[int]) -> list[int]:
    """Positions each decoder layer processes in the prefill: the text tokens plus every image's alive tokens."""
    return [prompt_tokens + num_images * vision_tokens for vision_tokens in schedule]


def dtype_num_bytes(dtype: Any) -> int:
    """Bytes per element of `dtype`: a name (`"float32"`, `"bf16"`, ...), a `torch.dtype`, or a positive int."""
    if isinstance(dtype, bool):
        raise ValueError(f"Unknown dtype {dtype!r}.")
    if isinstance(dtype, int):
        if dtype <= 0:
            raise ValueError(f"dtype bytes must be positive, got {dtype}.")
        return dtype
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.").lower()
        if name not in DTYPE_BYTES:
            raise ValueError(f"Unknown dtype {dtype!r}: expected one of {', '.join(DTYPE_BYTES)} or a byte count.")
        return DTYPE_BYTES[name]
    itemsize = getattr(dtype, "itemsize", None)  # torch.dtype and numpy dtypes
    if isinstance(itemsize, int) and itemsize > 0:
        return itemsize
    raise ValueError(f"Unknown dtype {dtype!r}: give a name such as 'float32', a torch.dtype, or a byte count.")


# ---------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------


def adsc_config(config: LlavaConfig) -> AdscLlavaConfig:
    """`config` as its family's ADSC config, whose `with_budget` solves schedules (a stock config: empty one)."""
    from adsc_llava.families import adsc_config_for

    return adsc_config_for(config)


def config_schedule(config: LlavaConfig, dims: LlavaDims | None = None) -> list[int]:
    """Vision tokens of one image (default: `dims` of the config) each decoder layer sees under the config's own
    schedule (every token everywhere for a stock config)."""
    dims = LlavaDims.from_config(config) if dims is None else dims
    return adsc_config(config).vision_tokens_per_layer(dims.vision_tokens_per_image)


def format_schedule(schedule: list[int]) -> str:
    """Run-length form of a schedule, as in the paper: `[576, 576, 335, ...]` -> `"576x2, 335x6, ..."`."""
    runs: list[list[int]] = []
    for tokens in schedule:
        if runs and runs[-1][0] == tokens:
            runs[-1][1] += 1
        else:
            runs.append([tokens, 1])
    return ", ".join(f"{tokens}x{count}" for tokens, count in runs)


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostReport:
    """FLOPs and KV-cache bytes of `generate(max_new_tokens=new_tokens)` on a batch, component by component.

    All counts cover the whole batch (`batch_size` identical-length sequences, no padding).

    Attributes:
        prompt_tokens: text tokens of each prompt (`T`), image placeholders excluded.
        new_tokens: generated tokens (`G`); the run is one prefill plus `G - 1` decode steps.
        num_images: images (or videos) per sequence.
        batch_size: sequences in the batch.
        kv_dtype_bytes: bytes per cached key/value element.
        lm_head_positions: `"all"` (every prefill position, DeepSpeed / the paper) or `"last"` (transformers'
            `generate`, which passes `logits_to_keep=1`).
        vision_tokens_per_layer: vision tokens per image each decoder layer sees, `[num_layers]`.
        prefill_tokens_per_layer: positions each decoder layer processes in the prefill, per sequence, `[num_layers]`.
        vision_tower_flops: the vision tower on every image.
        projector_flops: the multimodal projector on every image's selected tokens.
        prefill_layer_flops: each decoder layer in the prefill, `[num_layers]`.
        prefill_lm_head_flops: the lm_head in the prefill.
        decode_layer_flops: each decoder layer in each decode step, `[new_tokens - 1][num_layers]`.
        decode_lm_head_flops: the lm_head in one decode step.
        kv_bytes_per_position: bytes one cached position takes in one layer, over the batch.
    """

    prompt_tokens: int
    new_tokens: int
    num_images: int
    batch_size: int
    kv_dtype_bytes: int
    lm_head_positions: str
    vision_tokens_per_layer: list[int]
    prefill_tokens_per_layer: list[int]
    vision_tower_flops: int
    projector_flops: int
    prefill_layer_flops: list[int]
    prefill_lm_head_flops: int
    decode_layer_flops: list[list[int]]
    decode_lm_head_flops: int
    kv_bytes_per_position: int

    @property
    def num_decode_steps(self) -> int:
        """Decode steps after the prefill: `new_tokens - 1`."""
        return len(self.decode_layer_flops)

    @property
    def average_vision_tokens(self) -> float:
        """The paper's budget: mean over the decoder layers of the vision tokens per image each one sees."""
        return sum(self.vision_tokens_per_layer) / len(self.vision_tokens_per_layer)

    @property
    def llm_prefill_flops(self) -> int:
        """The language model's prefill: every decoder layer plus the lm_head."""
        return sum(self.prefill_layer_flops) + self.prefill_lm_head_flops

    @property
    def prefill_flops(self) -> int:
        """The first forward of `generate`: vision tower, projector and the language model's prefill."""
        return self.vision_tower_flops + self.projector_flops + self.llm_prefill_flops

    @property
    def decode_step_flops(self) -> list[int]:
        """Each decode step: every decoder layer plus the lm_head, `[new_tokens - 1]`."""
        return [sum(step) + self.decode_lm_head_flops for step in self.decode_layer_flops]

    @property
    def decode_flops(self) -> int:
        """All decode steps together."""
        return sum(self.decode_step_flops)

    @property
    def total_flops(self) -> int:
        """The whole `generate`: prefill plus every decode step."""
        return self.prefill_flops + self.decode_flops

    @property
    def tflops(self) -> float:
        """`total_flops` in units of 10**12."""
        return self.total_flops / 1e12

    def cache_lengths(self, decode_steps: int | None = None) -> list[int]:
        """Cached positions per layer after `decode_steps` decode steps (default: all of them, the peak)."""
        steps = self.num_decode_steps if decode_steps is None else decode_steps
        if not 0 <= steps <= self.num_decode_steps:
            raise ValueError(f"decode_steps must be in [0, {self.num_decode_steps}], got {decode_steps}.")
        return [tokens + steps for tokens in self.prefill_tokens_per_layer]

    def kv_cache_bytes_per_layer(self, decode_steps: int | None = None) -> list[int]:
        """KV-cache bytes per layer (whole batch) after `decode_steps` decode steps (default: the peak)."""
        return [length * self.kv_bytes_per_position for length in self.cache_lengths(decode_steps)]

    @property
    def kv_cache_bytes(self) -> int:
        """Peak KV-cache bytes, after the last decode step, over all layers."""
        return sum(self.kv_cache_bytes_per_layer())

    @property
    def kv_megabytes(self) -> float:
        """`kv_cache_bytes` in MB of 10**6 bytes (the unit that reproduces the paper's analytic figures)."""
        return self.kv_cache_bytes / 1e6

    @property
    def kv_mebibytes(self) -> float:
        """`kv_cache_bytes` in MiB of 2**20 bytes."""
        return self.kv_cache_bytes / 2**20


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _check_schedule(schedule: list[int], dims: LlavaDims) -> list[int]:
    schedule = list(schedule)
    if len(schedule) != dims.num_layers:
        raise ValueError(
            f"schedule has {len(schedule)} entries but the language model has {dims.num_layers} layers "
            "(one entry per decoder layer: the vision tokens per image it sees)."
        )
    for tokens in schedule:
        if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 <= tokens <= dims.vision_tokens_per_image:
            raise ValueError(
                f"schedule entries must be integers in [0, {dims.vision_tokens_per_image}] (vision tokens per image), "
                f"got {tokens!r} in {schedule}."
            )
    return schedule


def estimate_cost(
    config: LlavaConfig,
    *,
    prompt_tokens: int,
    new_tokens: int,
    schedule: list[int] | None = None,
    num_images: int = 1,
    batch_size: int = 1,
    kv_dtype: Any = "float32",
    lm_head_positions: LmHeadPositions = "all",
    image_size: tuple[int, int] | None = None,
    video_frames: int | None = None,
) -> CostReport:
    """FLOPs and KV-cache bytes of `generate(max_new_tokens=new_tokens)` with a (stock or ADSC) LLaVA-family model.

    Args:
        config: a `LlavaConfig` or `AdscLlavaConfig`; every dimension is read from it.
        prompt_tokens: text tokens per prompt (`T`), not counting the image placeholders.
        new_tokens: tokens generated per sequence (`G >= 1`): one prefill and `G - 1` decode steps.
        schedule: vision tokens per image seen by each decoder layer, `[num_layers]`. Defaults to the config's own
            schedule (`adsc_pruning_layers` / `adsc_drop_ratio`; every token at every layer for stock LLaVA).
        num_images: images per sequence.
        batch_size: sequences per batch (all of the same length).
        kv_dtype: dtype of the KV cache: a name (`"float32"`, `"bfloat16"`, ...), a `torch.dtype` or a byte count.
        lm_head_positions: `"all"` to run the lm_head on every prefill position (the paper's DeepSpeed count),
            `"last"` for one position per sequence (transformers' `generate`, `logits_to_keep=1`).
        image_size: LLaVA-NeXT / OneVision / Qwen-VL: each image's `(height, width)` (default: the family's
            reference photo, 640 x 480 or, for Qwen-VL, 1280 x 720); Qwen-VL videos: each frame's.
        video_frames: OneVision / Qwen-VL: each visual input is a video of this many frames instead.

    Returns:
        A `CostReport`.
    """
    dims = LlavaDims.from_config(config).for_input(config, image_size, video_frames)
    _check_count("prompt_tokens", prompt_tokens, 0)
    _check_count("new_tokens", new_tokens, 1)
    _check_count("num_images", num_images, 0)
    _check_count("batch_size", batch_size, 1)
    if lm_head_positions not in ("all", "last"):
        raise ValueError(f"lm_head_positions must be 'all' or 'last', got {lm_head_positions!r}.")
    schedule = config_schedule(config, dims) if schedule is None else _check_schedule(schedule, dims)
    if prompt_tokens + num_images * dims.vision_tokens_per_image == 0:
        raise ValueError("The prompt is empty: give prompt_tokens > 0 or num_images > 0.")

    prefill_tokens = prefill_tokens_per_layer(prompt_tokens, num_images * dims.units_per_input, schedule)
    last_layer_positions = prefill_tokens[-1] if lm_head_positions == "all" else 1
    decode_layer_flops = [
        [batch_size * decoder_layer_flops(dims, 1, tokens + step) for tokens in prefill_tokens]
        for step in range(1, new_tokens)
    ]
    return CostReport(
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        num_images=num_images,
        batch_size=batch_size,
        kv_dtype_bytes=dtype_num_bytes(kv_dtype),
        lm_head_positions=lm_head_positions,
        vision_tokens_per_layer=schedule,
        prefill_tokens_per_layer=prefill_tokens,
        vision_tower_flops=batch_size * vision_tower_flops(dims, num_images),
        projector_flops=batch_size * projector_flops(dims, num_images),
        prefill_layer_flops=[batch_size * decoder_layer_flops(dims, tokens, tokens) for tokens in prefill_tokens],
        prefill_lm_head_flops=batch_size * lm_head_flops(dims, last_layer_positions),
        decode_layer_flops=decode_layer_flops,
        decode_lm_head_flops=batch_size * lm_head_flops(dims, 1),
        kv_bytes_per_position=batch_size * kv_bytes_per_position(dims, dtype_num_bytes(kv_dtype)),
    )


# ---------------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------------


def stock_and_adsc_costs(config: LlavaConfig, **estimate_kwargs: Any) -> tuple[CostReport, CostReport]:
    """The same run twice: without pruning (stock LLaVA) and with the config's own schedule.

    `estimate_kwargs` go to `estimate_cost` (prompt_tokens, new_tokens, kv_dtype, ...), except `schedule`.
    """
    image_size, video_frames = estimate_kwargs.get("image_size"), estimate_kwargs.get("video_frames")
    dims = LlavaDims.from_config(config).for_input(config, image_size, video_frames)
    stock = estimate_cost(config, schedule=[dims.vision_tokens_per_image] * dims.num_layers, **estimate_kwargs)
    return stock, estimate_cost(config, **estimate_kwargs)


def load_reference_config(name: str = "llava-1.5-7b") -> LlavaConfig:
    """One of the shipped llava-hf configs (LLaVA-1.5 7B / 13B, LLaVA-NeXT (v1.6 Vicuna) 7B, OneVision 7B), as on
    the hub where it matters for cost, without a download."""
    if name not in REFERENCE_CONFIGS:
        raise ValueError(f"Unknown reference config {name!r}: expected one of {', '.join(REFERENCE_CONFIGS)}.")
    return read_config_file(CONFIGS_DIR / f"{name}.json")


def read_config_file(path: Path):
    """The config in a `config.json` of any supported family, stock or ADSC, by its `model_type`."""
    from adsc_llava.families import family_of

    with open(path, encoding="utf-8") as file:
        model_type = json.load(file).get("model_type")
    try:
        family = family_of(model_type)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    config_class = family.config_class if model_type == family.adsc_type else family.stock_config_class
    return config_class.from_json_file(str(path))


def load_config(name_or_path: str | Path) -> LlavaConfig:
    """A reference config by name, or a `config.json` (or a checkpoint folder holding one) of a LLaVA model.

    `model_type` `"llava"` gives a `LlavaConfig`, `"adsc_llava"` an `AdscLlavaConfig` (with its schedule).
    """
    if str(name_or_path) in REFERENCE_CONFIGS:
        return load_reference_config(str(name_or_path))
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(
            f"No config at {str(name_or_path)!r}: give one of {', '.join(REFERENCE_CONFIGS)}, a config.json or a "
            "checkpoint folder holding one."
        )
    return read_config_file(path)


__all__ = [
    "CostReport",
    "adsc_config",
    "LlavaDims",
    "PAPER_TABLE_IV",
    "config_schedule",
    "decoder_layer_flops",
    "estimate_cost",
    "format_schedule",
    "kv_bytes_per_position",
    "lm_head_flops",
    "load_config",
    "load_reference_config",
    "patch_embedding_flops",
    "projector_flops",
    "stock_and_adsc_costs",
    "vision_layer_flops",
    "vision_tower_flops",
]
