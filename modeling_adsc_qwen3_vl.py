"""ADSC-Qwen3-VL: Qwen3-VL (interleaved M-RoPE, DeepStack) whose language model drops vision tokens at the pruning
layers.

Shipped inside every ADSC-Qwen3-VL checkpoint with `modeling_adsc_qwen2_5_vl.py` (the Qwen-VL forward it shares),
`modeling_adsc_llava.py` (the ADSC core) and the configuration files. Beyond ADSC-Qwen2.5-VL:

- **Video units.** Qwen3-VL's processor writes each temporal patch of a video as its own run
  (`<t seconds><|vision_start|> frame tokens <|vision_end|>`), so each is one visual unit: `get_video_features`
  returns one feature entry per temporal patch (stock: one per video; concatenated, they are the same rows).
- **DeepStack.** Stock adds the vision tower's intermediate features (one set per `deepstack_visual_indexes` entry)
  to the visual tokens' hidden states after the first LLM layers. Here they follow the kept tokens: after layer `l`
  every token still alive receives its own feature row, looked up by its input position, so a pruning layer may
  come before or between the injection layers (the default `[2, 9, 18, 27]` of 36 prunes before the third).
"""

from .configuration_adsc_llava import check_transformers_version

check_transformers_version()  # before the imports below, which an older transformers would break

from collections.abc import Callable

import torch
from torch import nn
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLModel
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLPreTrainedModel

from .configuration_adsc_qwen3_vl import AdscQwen3VLConfig
from .modeling_adsc_llava import AdscGenerationMixin
from .modeling_adsc_qwen2_5_vl import AdscQwenVLModelMixin


class DeepStackInjection:
    """`after_layer` hook adding DeepStack features to the visual tokens alive after each of the first layers.

    Args:
        features: per injected layer, `(num_visual, hidden)` rows of every visual token of the forward, kinds in
            `feature_kinds` order, each kind's rows in its placeholders' batch-row-major order.
        feature_row: `(batch, seq + 1)` each input position's row in `features`, -1 for text; the last column
            answers for filler slots (source index `seq`).
    """

    def __init__(self, features: list[torch.Tensor], feature_row: torch.LongTensor):
        self.features, self.feature_row = features, feature_row

    @classmethod
    def for_forward(
        cls, placeholder_masks: list[torch.BoolTensor], deepstack: list[list[list[torch.Tensor]]]
    ) -> "DeepStackInjection":
        """From each kind's `(batch, seq)` placeholder mask and its DeepStack features (layer, then unit)."""
        batch_size, sequence_length = placeholder_masks[0].shape
        device = placeholder_masks[0].device
        feature_row = torch.full((batch_size * (sequence_length + 1),), -1, dtype=torch.long, device=device)
        first_row = 0
        for mask, layers in zip(placeholder_masks, deepstack, strict=True):
            count = sum(len(unit) for unit in layers[0])
            positions = torch.nonzero_static(mask.flatten(), size=count).flatten()  # no sync: the size is known
            rows = torch.arange(first_row, first_row + count, device=device)
            feature_row.index_copy_(0, positions + positions // sequence_length, rows)  # skip each row's last column
            first_row += count
        features = [
            torch.cat([torch.cat(list(layers[index])) for layers in deepstack]) for index in range(len(deepstack[0]))
        ]
        return cls(features, feature_row.view(batch_size, sequence_length + 1))

    def __call__(self, layer_idx: int, hidden_states: torch.Tensor, source_index: torch.LongTensor) -> torch.Tensor:
        if layer_idx >= len(self.features):
            return hidden_states
        rows = self.feature_row.to(source_index.device).gather(1, source_index)
        injected = self.features[layer_idx].to(hidden_states.device, hidden_states.dtype)[rows.clamp(min=0)]
        return torch.where((rows >= 0)[..., None], hidden_states + injected, hidden_states)


class AdscQwen3VLModel(AdscQwenVLModelMixin, Qwen3VLModel):
    """`Qwen3VLModel` whose language model drops vision tokens at `config.adsc_pruning_layers`."""

    config_class = AdscQwen3VLConfig

    def get_video_features(
        self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.LongTensor | None = None, **kwargs
    ):
        """Stock's video features, as one entry per temporal patch (each its own run of placeholders: one unit).

        `pooler_output` and every DeepStack layer's features are split alike; concatenated they are stock's rows.
        """
        kwargs["return_dict"] = True
        outputs = super().get_video_features(pixel_values_videos, video_grid_thw, **kwargs)
        merge = self.visual.spatial_merge_size
        frame_tokens = (video_grid_thw[:, 1:].prod(-1) // merge**2).repeat_interleave(video_grid_thw[:, 0]).tolist()
        outputs.pooler_output = torch.split(torch.cat(list(outputs.pooler_output)), frame_tokens)
        outputs.deepstack_features = [
            torch.split(torch.cat(list(layer)), frame_tokens) for layer in outputs.deepstack_features
        ]
        return outputs

    def after_layer_hook(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, outputs_by_token: dict
    ) -> Callable | None:
        """DeepStack: the visual features of this forward's images and videos, added after the first layers."""
        kinds = [
            (token_id, outputs)
            for token_id, outputs in outputs_by_token.items()
            if outputs is not None and getattr(outputs, "deepstack_features", None)
        ]
        if not kinds:
            return None
        masks = [self.placeholder_mask(input_ids, inputs_embeds, token_id) for token_id, _ in kinds]
        return DeepStackInjection.for_forward(masks, [list(outputs.deepstack_features) for _, outputs in kinds])


class AdscQwen3VLForConditionalGeneration(AdscGenerationMixin, Qwen3VLForConditionalGeneration):
    """`Qwen3VLForConditionalGeneration` with ADSC: same parameters and outputs, fewer tokens in deeper layers."""

    config_class = AdscQwen3VLConfig

    def __init__(self, config: AdscQwen3VLConfig):
        Qwen3VLPreTrainedModel.__init__(self, config)
        self.model = AdscQwen3VLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


AdscQwen3VLForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["AdscQwen3VLForConditionalGeneration", "AdscQwen3VLModel", "DeepStackInjection"]
