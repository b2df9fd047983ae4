"""ADSC-Qwen2.5-VL: Qwen2.5-VL whose language model drops vision tokens at the pruning layers.

Shipped inside every ADSC-Qwen2.5-VL checkpoint with `modeling_adsc_llava.py` (the shared ADSC core, imported
relatively) and the configuration files; ADSC-Qwen3-VL checkpoints ship it too (`AdscQwenVLModelMixin`).

The vision side is stock Qwen2.5-VL. What ADSC needs beyond the LLaVA families:

- **Visual units.** Each image and each video is one run of placeholder tokens between `<|vision_start|>` and
  `<|vision_end|>`; its features' length is the run's length, so the core finds units as for LLaVA. Uniform
  positions over a video's run (frames in order, each frame row-major) give every frame the same share of the kept
  tokens, within one, without knowing the grid: `generate()` hands the prefill its features but no grid.
- **M-RoPE.** Positions are `(3, batch, seq)`: temporal, height and width per token, from `get_rope_index` and the
  grids, as in stock. The core gathers them with the tokens, so kept tokens keep their own 3-D positions, and text
  after an image continues from the image's largest position plus one, exactly as in stock (text positions are
  computed before anything is dropped). Decode steps take `generate()`'s positions (the last plus one) or, in a
  forward without them, `rope_deltas` from the prefill plus the cache's full length (layer 0 caches every token),
  or the padding mask's count of real tokens.
- **Modality types.** A forward without `mm_token_type_ids` derives them from the placeholder ids (what the
  processor writes), so training batches need no extra field; stock would fall back to 1-D positions.
"""

from .configuration_adsc_llava import check_transformers_version

check_transformers_version()  # before the imports below, which an older transformers would break

from collections.abc import Callable

import torch
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel
from transformers.cache_utils import Cache
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.modeling_outputs import MultimodalBaseModelOutputWithPast
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .configuration_adsc_qwen2_5_vl import AdscQwen2_5_VLConfig
from .modeling_adsc_llava import AdscGenerationMixin, AdscModelMixin, check_text_model_supported

# `mm_token_type_ids` values, as the processors write them.
TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE = 0, 1, 2


def mrope_position_ids(position_ids: torch.LongTensor) -> torch.LongTensor:
    """`(3, batch, seq)` M-RoPE positions from what stock Qwen-VL models accept.

    `generate()` passes `(4, batch, seq)` (a text row first, which stock reads only to detect packed sequences; the
    ADSC loop builds its masks itself), users may pass `(3, batch, seq)`, and `(batch, seq)` means text positions.
    """
    if position_ids.ndim == 3 and position_ids.shape[0] == 4:
        return position_ids[1:]
    if position_ids.ndim == 2:
        return position_ids[None].expand(3, -1, -1)
    return position_ids


class AdscQwenVLModelMixin(AdscModelMixin):
    """The ADSC forward of a Qwen-VL model: stock's visual features and 3-D positions, then the core's layer loop.

    A family sets `position_kwargs` (the names its `compute_3d_position_ids` takes beyond stock Qwen3-VL's) and may
    override `after_layer_hook` (Qwen3-VL's DeepStack).
    """

    position_kwargs: tuple[str, ...] = ()

    def __init__(self, config):
        check_text_model_supported(config)
        super().__init__(config)

    def check_keep_policy(self) -> None:
        """Refuse FastV / PyramidDrop: their scoring re-derives attention for Llama-shaped layers only."""
        if self.config.adsc_keep_policy != "uniform" and self.config.adsc_pruning_layers:
            raise ValueError(
                f"adsc_keep_policy={self.config.adsc_keep_policy!r} is a baseline implemented for the LLaVA families; "
                f"{type(self).__name__} supports ADSC's 'uniform' keep policy."
            )

    def modality_token_types(self, input_ids: torch.LongTensor) -> torch.IntTensor:
        """`mm_token_type_ids` as the processors write them: 1 at image placeholders, 2 at video ones, 0 elsewhere."""
        types = (input_ids == self.config.image_token_id).int() * IMAGE_TYPE
        return types + (input_ids == self.config.video_token_id).int() * VIDEO_TYPE

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        adsc_prompt_length: int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MultimodalBaseModelOutputWithPast:
        """Same inputs and outputs as the stock model's `forward`; `last_hidden_state` is `(batch, seq, hidden)`.

        `second_per_grid_ts` is Qwen2.5-VL's (ignored by Qwen3-VL, whose videos carry timestamps in the text).
        """
        self.check_keep_policy()
        pixels = {"pixel_values": pixel_values, "pixel_values_videos": pixel_values_videos}
        pixel_inputs = "/".join(name for name, value in pixels.items() if value is not None) or None
        inputs_embeds, cache, mm_encoder_outputs = self.begin_forward(
            input_ids, inputs_embeds, cache, mm_encoder_outputs, pixel_inputs, kwargs
        )
        if mm_encoder_outputs.get("image") is None and pixel_values is not None:
            mm_encoder_outputs["image"] = self.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        if mm_encoder_outputs.get("video") is None and pixel_values_videos is not None:
            mm_encoder_outputs["video"] = self.get_video_features(
                pixel_values_videos, video_grid_thw, return_dict=True
            )
        outputs_by_token = {
            self.config.image_token_id: mm_encoder_outputs.get("image"),
            self.config.video_token_id: mm_encoder_outputs.get("video"),
        }
        visual_features = {
            token_id: outputs.pooler_output for token_id, outputs in outputs_by_token.items() if outputs is not None
        }
        if position_ids is None:
            if mm_token_type_ids is None and input_ids is not None:
                mm_token_type_ids = self.modality_token_types(input_ids)
            extra = {"second_per_grid_ts": second_per_grid_ts} if "second_per_grid_ts" in self.position_kwargs else {}
            position_ids = self.compute_3d_position_ids(
                input_ids=input_ids,
                image_grid_thw=image_grid_thw,
                video_grid_thw=video_grid_thw,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache,
                mm_token_type_ids=mm_token_type_ids,
                **extra,
            )
            if position_ids is not None:
                # With a padding mask over past + new tokens, stock (5.24) returns positions for all of them.
                position_ids = position_ids[..., -inputs_embeds.shape[1] :]
        last_hidden_state, cache, layer_outputs = self.run_language_model(
            input_ids,
            inputs_embeds,
            visual_features,
            attention_mask=attention_mask,
            position_ids=mrope_position_ids(position_ids) if position_ids is not None else None,
            cache=cache,
            use_cache=use_cache,
            adsc_prompt_length=adsc_prompt_length,
            after_layer=self.after_layer_hook(input_ids, inputs_embeds, outputs_by_token),
            **kwargs,
        )
        return MultimodalBaseModelOutputWithPast(
            last_hidden_state=last_hidden_state,
            cache=cache,
            image_outputs=mm_encoder_outputs.get("image"),
            video_outputs=mm_encoder_outputs.get("video"),
            **layer_outputs,
        )

    def after_layer_hook(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, outputs_by_token: dict
    ) -> Callable | None:
        """What the layer loop adds to the hidden states after each layer (`run_language_model(after_layer=...)`)."""
        return None


class AdscQwen2_5_VLModel(AdscQwenVLModelMixin, Qwen2_5_VLModel):
    """`Qwen2_5_VLModel` whose language model drops vision tokens at `config.adsc_pruning_layers`."""

    config_class = AdscQwen2_5_VLConfig
    position_kwargs = ("second_per_grid_ts",)


class AdscQwen2_5_VLForConditionalGeneration(AdscGenerationMixin, Qwen2_5_VLForConditionalGeneration):
    """`Qwen2_5_VLForConditionalGeneration` with ADSC: same parameters and outputs, fewer tokens in deeper layers."""

    config_class = AdscQwen2_5_VLConfig

    def __init__(self, config: AdscQwen2_5_VLConfig):
        Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.model = AdscQwen2_5_VLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


# Stock Qwen2.5-VL checkpoints (`model.*` / `visual.*` keys) load with every weight in place, as the stock classes do.
register_checkpoint_conversion_mapping(
    "AdscQwen2_5_VLForConditionalGeneration",
    get_checkpoint_conversion_mapping("Qwen2_5_VLForConditionalGeneration"),
    overwrite=True,
)
register_checkpoint_conversion_mapping(
    "AdscQwen2_5_VLModel", get_checkpoint_conversion_mapping("Qwen2_5_VLModel"), overwrite=True
)
AdscQwen2_5_VLForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "AdscQwen2_5_VLForConditionalGeneration",
    "AdscQwen2_5_VLModel",
    "AdscQwenVLModelMixin",
    "mrope_position_ids",
]
