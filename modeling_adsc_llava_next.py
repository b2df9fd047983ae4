"""ADSC-LLaVA-NeXT: LLaVA-NeXT (anyres) whose language model drops vision tokens at the pruning layers.

Shipped inside every ADSC-LLaVA-NeXT checkpoint with `modeling_adsc_llava.py` (the shared ADSC core, imported
relatively) and both configuration files. The vision side is stock LLaVA-NeXT: its `get_image_features` builds each
image's span (base view, unpadded grid, one newline per grid row); the ADSC pass then treats every image's whole span
as one visual unit (`modeling_adsc_llava.locate_visual_units`), whatever its length.
"""

from .configuration_adsc_llava import check_transformers_version

check_transformers_version()  # before the imports below, which an older transformers would break

import torch
from torch import nn
from transformers import LlavaNextForConditionalGeneration, LlavaNextModel
from transformers.cache_utils import Cache
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextModelOutputWithPast,
    LlavaNextPreTrainedModel,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .configuration_adsc_llava_next import AdscLlavaNextConfig
from .modeling_adsc_llava import AdscGenerationMixin, AdscModelMixin, check_text_model_supported


class AdscLlavaNextModel(AdscModelMixin, LlavaNextModel):
    """`LlavaNextModel` whose language model drops vision tokens at `config.adsc_pruning_layers`."""

    config_class = AdscLlavaNextConfig

    def __init__(self, config: AdscLlavaNextConfig):
        check_text_model_supported(config)
        super().__init__(config)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict | None = None,
        adsc_prompt_length: int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> LlavaNextModelOutputWithPast:
        """Same inputs and outputs as `LlavaNextModel.forward`; `last_hidden_state` is `(batch, seq, hidden)`."""
        pixel_inputs = "pixel_values" if pixel_values is not None else None
        inputs_embeds, cache, mm_encoder_outputs = self.begin_forward(
            input_ids, inputs_embeds, cache, mm_encoder_outputs, pixel_inputs, kwargs
        )
        if mm_encoder_outputs.get("image") is None and pixel_values is not None and pixel_values.size(0) > 0:
            mm_encoder_outputs["image"] = self.get_image_features(
                pixel_values,
                image_sizes,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                return_dict=True,
            )
        image_outputs = mm_encoder_outputs.get("image")
        visual_features = (
            {self.config.image_token_id: image_outputs.pooler_output} if image_outputs is not None else {}
        )
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
        return LlavaNextModelOutputWithPast(
            last_hidden_state=last_hidden_state, cache=cache, image_outputs=image_outputs, **layer_outputs
        )


class AdscLlavaNextForConditionalGeneration(AdscGenerationMixin, LlavaNextForConditionalGeneration):
    """`LlavaNextForConditionalGeneration` with ADSC: same parameters and outputs, fewer tokens in deeper layers."""

    config_class = AdscLlavaNextConfig

    def __init__(self, config: AdscLlavaNextConfig):
        LlavaNextPreTrainedModel.__init__(self, config)
        self.model = AdscLlavaNextModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


# Stock llava-hf NeXT checkpoints load with every weight in place (see modeling_adsc_llava.py for why).
register_checkpoint_conversion_mapping(
    "adsc_llava_next", get_checkpoint_conversion_mapping("llava_next"), overwrite=True
)
register_checkpoint_conversion_mapping(
    "AdscLlavaNextModel", get_checkpoint_conversion_mapping("LlavaNextModel"), overwrite=True
)
AdscLlavaNextForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["AdscLlavaNextForConditionalGeneration", "AdscLlavaNextModel"]
