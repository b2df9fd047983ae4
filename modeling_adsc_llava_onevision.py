"""ADSC-LLaVA-OneVision: LLaVA-OneVision (images, several images, video) with vision tokens dropped inside the LLM.

Shipped inside every ADSC-LLaVA-OneVision checkpoint with `modeling_adsc_llava.py` (the shared ADSC core, imported
relatively) and both configuration files. The vision side is stock OneVision. Visual units: each image's whole span
(base view, grid rows, newlines; for several images per prompt, 729 + 1 tokens each) and each video's whole span
(every frame's pooled tokens and the video's one newline): the rule stays a function of counts only, which is all a
`generate()` forward gets (it passes no image sizes and no frame counts).
"""

from .configuration_adsc_llava import check_transformers_version

check_transformers_version()  # before the imports below, which an older transformers would break

import torch
from torch import nn
from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel
from transformers.cache_utils import Cache
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionModelOutputWithPast,
    LlavaOnevisionPreTrainedModel,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .configuration_adsc_llava_onevision import AdscLlavaOnevisionConfig
from .modeling_adsc_llava import AdscGenerationMixin, AdscModelMixin, check_text_model_supported


class AdscLlavaOnevisionModel(AdscModelMixin, LlavaOnevisionModel):
    """`LlavaOnevisionModel` whose language model drops vision tokens at `config.adsc_pruning_layers`."""

    config_class = AdscLlavaOnevisionConfig

    def __init__(self, config: AdscLlavaOnevisionConfig):
        check_text_model_supported(config)
        super().__init__(config)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_sizes_videos: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str | None = None,
        batch_num_images: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict | None = None,
        adsc_prompt_length: int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> LlavaOnevisionModelOutputWithPast:
        """Same inputs and outputs as `LlavaOnevisionModel.forward`; `last_hidden_state` is `(batch, seq, hidden)`."""
        pixels = {"pixel_values": pixel_values, "pixel_values_videos": pixel_values_videos}
        pixel_inputs = "/".join(name for name, value in pixels.items() if value is not None) or None
        inputs_embeds, cache, mm_encoder_outputs = self.begin_forward(
            input_ids, inputs_embeds, cache, mm_encoder_outputs, pixel_inputs, kwargs
        )
        if mm_encoder_outputs.get("image") is None and pixel_values is not None:
            mm_encoder_outputs["image"] = self.get_image_features(
                pixel_values,
                image_sizes,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                batch_num_images=batch_num_images,
                return_dict=True,
            )
        if mm_encoder_outputs.get("video") is None and pixel_values_videos is not None:
            mm_encoder_outputs["video"] = self.get_video_features(
                pixel_values_videos,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                return_dict=True,
            )
        image_outputs, video_outputs = mm_encoder_outputs.get("image"), mm_encoder_outputs.get("video")
        visual_features = {}
        if image_outputs is not None:
            visual_features[self.config.image_token_id] = image_outputs.pooler_output
        if video_outputs is not None:  # `(videos, frames x 196 + 1, hidden)`: one unit per video
            visual_features[self.config.video_token_id] = list(video_outputs.pooler_output)
        last_hidden_state, cache, layer_outputs = self.run_language_model(
            input_ids,
            inputs_embeds,
            visual_features,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            adsc_prompt_length=adsc_prompt_length,
            **kwargs,
        )
        return LlavaOnevisionModelOutputWithPast(
            last_hidden_state=last_hidden_state,
            cache=cache,
            image_outputs=image_outputs,
            video_outputs=video_outputs,
            **layer_outputs,
        )


class AdscLlavaOnevisionForConditionalGeneration(AdscGenerationMixin, LlavaOnevisionForConditionalGeneration):
    """`LlavaOnevisionForConditionalGeneration` with ADSC: same parameters and outputs, fewer tokens deeper in."""

    config_class = AdscLlavaOnevisionConfig

    def __init__(self, config: AdscLlavaOnevisionConfig):
        LlavaOnevisionPreTrainedModel.__init__(self, config)
        self.model = AdscLlavaOnevisionModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


# Stock llava-hf OneVision checkpoints load with every weight in place (see modeling_adsc_llava.py for why).
register_checkpoint_conversion_mapping(
    "adsc_llava_onevision", get_checkpoint_conversion_mapping("llava_onevision"), overwrite=True
)
register_checkpoint_conversion_mapping(
    "AdscLlavaOnevisionModel", get_checkpoint_conversion_mapping("LlavaOnevisionModel"), overwrite=True
)
AdscLlavaOnevisionForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["AdscLlavaOnevisionForConditionalGeneration", "AdscLlavaOnevisionModel"]
