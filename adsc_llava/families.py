"""The model families ADSC supports: for each, the stock config class and the ADSC config and model classes.

`family_of` answers for a stock or an ADSC `model_type` (e.g. "llava_next" or "adsc_llava_next"), so converting,
training and the cost model take any supported checkpoint by what its `config.json` says, never by its name.
"""

import importlib
from dataclasses import dataclass

import transformers


@dataclass(frozen=True)
class Family:
    """One model family: `stock_type` / `adsc_type` are the two `model_type`s its configs carry.

    Attributes:
        name: what people call it.
        stock_type: the stock checkpoints' `model_type`.
        adsc_type: the ADSC checkpoints' `model_type`.
        stock_config_name: the stock config class, in `transformers`.
        config_name: the ADSC config class, in `adsc_llava`.
        model_name: the ADSC generation class, in `adsc_llava`.
        projector_modules: the modules between the vision tower and the LLM (trained with LoRA, not frozen).
    """

    name: str
    stock_type: str
    adsc_type: str
    stock_config_name: str
    config_name: str
    model_name: str
    projector_modules: tuple[str, ...] = ("multi_modal_projector",)

    @property
    def stock_config_class(self) -> type:
        return getattr(transformers, self.stock_config_name)

    @property
    def config_class(self) -> type:
        return getattr(importlib.import_module("adsc_llava"), self.config_name)

    @property
    def model_class(self) -> type:
        return getattr(importlib.import_module("adsc_llava"), self.model_name)


FAMILIES = (
    Family(
        "LLaVA-1.5",
        "llava",
        "adsc_llava",
        "LlavaConfig",
        "AdscLlavaConfig",
        "AdscLlavaForConditionalGeneration",
    ),
    Family(
        "LLaVA-NeXT",
        "llava_next",
        "adsc_llava_next",
        "LlavaNextConfig",
        "AdscLlavaNextConfig",
        "AdscLlavaNextForConditionalGeneration",
    ),
    Family(
        "LLaVA-OneVision",
        "llava_onevision",
        "adsc_llava_onevision",
        "LlavaOnevisionConfig",
        "AdscLlavaOnevisionConfig",
        "AdscLlavaOnevisionForConditionalGeneration",
    ),
    # Qwen's projector is the vision tower's patch merger; Qwen3-VL's DeepStack mergers project the features its
    # first LLM layers receive.
    Family(
        "Qwen2.5-VL",
        "qwen2_5_vl",
        "adsc_qwen2_5_vl",
        "Qwen2_5_VLConfig",
        "AdscQwen2_5_VLConfig",
        "AdscQwen2_5_VLForConditionalGeneration",
        projector_modules=("merger",),
    ),
    Family(
        "Qwen3-VL",
        "qwen3_vl",
        "adsc_qwen3_vl",
        "Qwen3VLConfig",
        "AdscQwen3VLConfig",
        "AdscQwen3VLForConditionalGeneration",
        projector_modules=("merger", "deepstack_merger_list"),
    ),
)


def family_of(model_type: str) -> Family:
    """The family whose stock or ADSC `model_type` this is; a `ValueError` listing the supported ones otherwise."""
    for family in FAMILIES:
        if model_type in (family.stock_type, family.adsc_type):
            return family
    supported = ", ".join(f"'{f.stock_type}' / '{f.adsc_type}' ({f.name})" for f in FAMILIES)
    raise ValueError(f"model_type '{model_type}' is not a supported model family; supported: {supported}.")


def adsc_config_for(config):
    """`config` (stock or ADSC, of any supported family) as its family's ADSC config class (same schedule if any)."""
    family = family_of(config.model_type)
    if isinstance(config, family.config_class):
        return config
    schedule = getattr(config, "schedule", None) or {}
    return family.config_class.from_stock_config(
        config,
        pruning_layers=schedule.get("adsc_pruning_layers"),
        drop_ratio=schedule.get("adsc_drop_ratio"),
        keep_policy=schedule.get("adsc_keep_policy", "uniform"),
    )
