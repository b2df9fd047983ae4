"""Configuration of ADSC-LLaVA-NeXT: LLaVA-NeXT (anyres) that drops vision tokens inside its language model.

Shipped inside every ADSC-LLaVA-NeXT checkpoint with `configuration_adsc_llava.py`, which it imports relatively.
One image (its base view, every crop of the grid and the grid rows' newline tokens) is one visual unit: at each
pruning layer it keeps `floor((1 - r) * n)` of its `n` alive tokens. As `n` depends on the image's size, a budget
refers to a reference image of `adsc_reference_tokens` tokens (default 2340: a 640 x 480 photo with the llava-v1.6
processor); the drop ratio `r` it gives applies to every image.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlavaNextConfig

from .configuration_adsc_llava import AdscScheduleMixin

ADSC_NEXT_AUTO_MAP = {
    "AutoConfig": "configuration_adsc_llava_next.AdscLlavaNextConfig",
    "AutoModel": "modeling_adsc_llava_next.AdscLlavaNextForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_adsc_llava_next.AdscLlavaNextForConditionalGeneration",
}
# Tokens of a 640 x 480 image under llava-v1.6's processor (2 x 2 grid: 576 base + 36 rows of 48 + 36 newlines).
NEXT_REFERENCE_TOKENS = 2340


@strict
class AdscLlavaNextConfig(AdscScheduleMixin, LlavaNextConfig):
    r"""
    Configuration of [`AdscLlavaNextForConditionalGeneration`]: a [`LlavaNextConfig`] plus the ADSC schedule.

    Args:
        adsc_pruning_layers (`list[int]`, *optional*, defaults to `[]`): as for `AdscLlavaConfig`.
        adsc_drop_ratio (`float`, *optional*, defaults to 0.0): as for `AdscLlavaConfig`, per image.
        adsc_keep_policy (`str`, *optional*, defaults to `"uniform"`): as for `AdscLlavaConfig`.
        adsc_reference_tokens (`int`, *optional*, defaults to 2340):
            The tokens of the reference image that budgets (`with_budget`, `vision_tokens_per_layer()`) refer to.
    """

    model_type = "adsc_llava_next"
    STOCK_CONFIG_CLASS = LlavaNextConfig
    AUTO_MAP = ADSC_NEXT_AUTO_MAP
    EXTRA_FIELDS = ("adsc_reference_tokens",)

    adsc_pruning_layers: list[int] | None = None
    adsc_drop_ratio: float | int = 0.0
    adsc_keep_policy: str = "uniform"
    adsc_reference_tokens: int = NEXT_REFERENCE_TOKENS


AdscLlavaNextConfig.register_for_auto_class("AutoConfig")

__all__ = ["AdscLlavaNextConfig"]
