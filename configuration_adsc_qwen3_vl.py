"""Configuration of ADSC-Qwen3-VL: Qwen3-VL (native resolution, video, interleaved M-RoPE, DeepStack) with in-LLM
pruning.

Shipped inside every ADSC-Qwen3-VL checkpoint with `configuration_adsc_llava.py`, which it imports relatively.
A visual unit is one run of placeholder tokens between `<|vision_start|>` and `<|vision_end|>`: one image, or one
frame (temporal patch) of a video, since Qwen3-VL's processor writes each frame as its own run after a timestamp.
At each pruning layer a unit keeps `floor((1 - r) * n)` of its `n` alive tokens at uniformly spaced positions; the
DeepStack features injected into the first layers follow the kept tokens. Budgets refer to a reference image of
`adsc_reference_tokens` tokens (default 880: a 1280 x 720 photo with Qwen3-VL's processor, 22 x 40 merged 32-px
patches).
"""

from huggingface_hub.dataclasses import strict
from transformers import Qwen3VLConfig

from .configuration_adsc_llava import AdscScheduleMixin

ADSC_QWEN3_VL_AUTO_MAP = {
    "AutoConfig": "configuration_adsc_qwen3_vl.AdscQwen3VLConfig",
    "AutoModel": "modeling_adsc_qwen3_vl.AdscQwen3VLForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_adsc_qwen3_vl.AdscQwen3VLForConditionalGeneration",
}
# Tokens of a 1280 x 720 photo under Qwen3-VL's processor (resized to 1280 x 704: 22 x 40 merged patches).
QWEN3_VL_REFERENCE_TOKENS = 880


@strict
class AdscQwen3VLConfig(AdscScheduleMixin, Qwen3VLConfig):
    r"""
    Configuration of [`AdscQwen3VLForConditionalGeneration`]: a [`Qwen3VLConfig`] plus the ADSC schedule.

    Args:
        adsc_pruning_layers (`list[int]`, *optional*, defaults to `[]`): as for `AdscLlavaConfig`.
        adsc_drop_ratio (`float`, *optional*, defaults to 0.0): as for `AdscLlavaConfig`, per image or video frame.
        adsc_keep_policy (`str`, *optional*, defaults to `"uniform"`): as for `AdscLlavaConfig`.
        adsc_reference_tokens (`int`, *optional*, defaults to 880):
            The tokens of the reference image that budgets (`with_budget`, `vision_tokens_per_layer()`) refer to.
    """

    model_type = "adsc_qwen3_vl"
    STOCK_CONFIG_CLASS = Qwen3VLConfig
    AUTO_MAP = ADSC_QWEN3_VL_AUTO_MAP
    EXTRA_FIELDS = ("adsc_reference_tokens",)

    adsc_pruning_layers: list[int] | None = None
    adsc_drop_ratio: float | int = 0.0
    adsc_keep_policy: str = "uniform"
    adsc_reference_tokens: int = QWEN3_VL_REFERENCE_TOKENS


AdscQwen3VLConfig.register_for_auto_class("AutoConfig")

__all__ = ["AdscQwen3VLConfig"]
