"""Configuration of ADSC-LLaVA-OneVision: LLaVA-OneVision (images, several images, video) with in-LLM pruning.

Shipped inside every ADSC-LLaVA-OneVision checkpoint with `configuration_adsc_llava.py`, which it imports relatively.
Visual units: one image (base view, grid and newline tokens) or one whole video (all frames and its one newline);
each keeps `floor((1 - r) * n)` of its `n` alive tokens at every pruning layer. Budgets refer to a reference image of
`adsc_reference_tokens` tokens (default 2929: a 640 x 480 photo with the OneVision processor).
"""

from huggingface_hub.dataclasses import strict
from transformers import LlavaOnevisionConfig

from .configuration_adsc_llava import AdscScheduleMixin

ADSC_ONEVISION_AUTO_MAP = {
    "AutoConfig": "configuration_adsc_llava_onevision.AdscLlavaOnevisionConfig",
    "AutoModel": "modeling_adsc_llava_onevision.AdscLlavaOnevisionForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_adsc_llava_onevision.AdscLlavaOnevisionForConditionalGeneration",
}
# Tokens of a 640 x 480 image under the OneVision processor (2 x 2 grid: 729 base + 40 rows of 54 + 40 newlines).
ONEVISION_REFERENCE_TOKENS = 2929


@strict
class AdscLlavaOnevisionConfig(AdscScheduleMixin, LlavaOnevisionConfig):
    r"""
    Configuration of [`AdscLlavaOnevisionForConditionalGeneration`]: a [`LlavaOnevisionConfig`] plus the schedule.

    Args:
        adsc_pruning_layers (`list[int]`, *optional*, defaults to `[]`): as for `AdscLlavaConfig`.
        adsc_drop_ratio (`float`, *optional*, defaults to 0.0): as for `AdscLlavaConfig`, per image or video.
        adsc_keep_policy (`str`, *optional*, defaults to `"uniform"`): as for `AdscLlavaConfig`.
        adsc_reference_tokens (`int`, *optional*, defaults to 2929):
            The tokens of the reference image that budgets (`with_budget`, `vision_tokens_per_layer()`) refer to.
    """

    model_type = "adsc_llava_onevision"
    STOCK_CONFIG_CLASS = LlavaOnevisionConfig
    AUTO_MAP = ADSC_ONEVISION_AUTO_MAP
    EXTRA_FIELDS = ("adsc_reference_tokens",)

    adsc_pruning_layers: list[int] | None = None
    adsc_drop_ratio: float | int = 0.0
    adsc_keep_policy: str = "uniform"
    adsc_reference_tokens: int = ONEVISION_REFERENCE_TOKENS


AdscLlavaOnevisionConfig.register_for_auto_class("AutoConfig")

__all__ = ["AdscLlavaOnevisionConfig"]
