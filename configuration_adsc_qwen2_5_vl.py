"""Configuration of ADSC-Qwen2.5-VL: Qwen2.5-VL (native-resolution images, video, M-RoPE) with in-LLM pruning.

Shipped inside every ADSC-Qwen2.5-VL checkpoint with `configuration_adsc_llava.py`, which it imports relatively.
A visual unit is one image or one video: its run of placeholder tokens between `<|vision_start|>` and
`<|vision_end|>` (a video's run holds all its frames). At each pruning layer a unit keeps `floor((1 - r) * n)` of its
`n` alive tokens at uniformly spaced positions of that run, which spreads them evenly over every frame of a video.
As `n` depends on the image's size, budgets refer to a reference image of `adsc_reference_tokens` tokens (default
1196: a 1280 x 720 photo with Qwen2.5-VL's processor, a 26 x 46 grid of merged 28-px patches).
"""

from huggingface_hub.dataclasses import strict
from transformers import Qwen2_5_VLConfig

from .configuration_adsc_llava import AdscScheduleMixin

ADSC_QWEN2_5_VL_AUTO_MAP = {
    "AutoConfig": "configuration_adsc_qwen2_5_vl.AdscQwen2_5_VLConfig",
    "AutoModel": "modeling_adsc_qwen2_5_vl.AdscQwen2_5_VLForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_adsc_qwen2_5_vl.AdscQwen2_5_VLForConditionalGeneration",
}
# Tokens of a 1280 x 720 photo under Qwen2.5-VL's processor (resized to 1288 x 728: 26 x 46 merged patches).
QWEN2_5_VL_REFERENCE_TOKENS = 1196


@strict
class AdscQwen2_5_VLConfig(AdscScheduleMixin, Qwen2_5_VLConfig):
    r"""
    Configuration of [`AdscQwen2_5_VLForConditionalGeneration`]: a [`Qwen2_5_VLConfig`] plus the ADSC schedule.

    Args:
        adsc_pruning_layers (`list[int]`, *optional*, defaults to `[]`): as for `AdscLlavaConfig`.
        adsc_drop_ratio (`float`, *optional*, defaults to 0.0): as for `AdscLlavaConfig`, per image or video.
        adsc_keep_policy (`str`, *optional*, defaults to `"uniform"`): as for `AdscLlavaConfig`.
        adsc_reference_tokens (`int`, *optional*, defaults to 1196):
            The tokens of the reference image that budgets (`with_budget`, `vision_tokens_per_layer()`) refer to.
    """

    model_type = "adsc_qwen2_5_vl"
    STOCK_CONFIG_CLASS = Qwen2_5_VLConfig
    AUTO_MAP = ADSC_QWEN2_5_VL_AUTO_MAP
    EXTRA_FIELDS = ("adsc_reference_tokens",)

    adsc_pruning_layers: list[int] | None = None
    adsc_drop_ratio: float | int = 0.0
    adsc_keep_policy: str = "uniform"
    adsc_reference_tokens: int = QWEN2_5_VL_REFERENCE_TOKENS


AdscQwen2_5_VLConfig.register_for_auto_class("AutoConfig")

__all__ = ["AdscQwen2_5_VLConfig"]
