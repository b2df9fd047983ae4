"""The LLaVA families ADSC supports: for each, the stock config class and the ADSC config and model classes.

`family_of` answers for a stock or an ADSC `model_type` (e.g. "llava_next" or "adsc_llava_next"), so converting,
training and the cost model take any supported checkpoint by what its `config.json` says, never by its name.
"""

from dataclasses import dataclass

from transformers import LlavaConfig, LlavaNextConfig, LlavaOnevisionConfig


@dataclass(frozen=True)
class Family:
    """One LLaVA family: `stock_type` / `adsc_type` are the two `model_type`s its configs carry."""

    name: str
    stock_type: str
    adsc_type: str

    @property
    def stock_config_class(self) -> type:
        return {"llava": LlavaConfig, "llava_next": LlavaNextConfig, "llava_onevision": LlavaOnevisionConfig}[
            self.stock_type
        ]

    @property
    def config_class(self) -> type:
        from adsc_llava import AdscLlavaConfig, AdscLlavaNextConfig, AdscLlavaOnevisionConfig

        return {
            "llava": AdscLlavaConfig,
            "llava_next": AdscLlavaNextConfig,
            "llava_onevision": AdscLlavaOnevisionConfig,
        }[self.stock_type]

    @property
    def model_class(self) -> type:
        from adsc_llava import (
            AdscLlavaForConditionalGeneration,
            AdscLlavaNextForConditionalGeneration,
            AdscLlavaOnevisionForConditionalGeneration,
        )

        return {
            "llava": AdscLlavaForConditionalGeneration,
            "llava_next": AdscLlavaNextForConditionalGeneration,
            "llava_onevision": AdscLlavaOnevisionForConditionalGeneration,
        }[self.stock_type]


FAMILIES = (
    Family("LLaVA-1.5", "llava", "adsc_llava"),
    Family("LLaVA-NeXT", "llava_next", "adsc_llava_next"),
    Family("LLaVA-OneVision", "llava_onevision", "adsc_llava_onevision"),
)


def family_of(model_type: str) -> Family:
    """The family whose stock or ADSC `model_type` this is; a `ValueError` listing the supported ones otherwise."""
    for family in FAMILIES:
        if model_type in (family.stock_type, family.adsc_type):
            return family
    supported = ", ".join(f"'{f.stock_type}' / '{f.adsc_type}' ({f.name})" for f in FAMILIES)
    raise ValueError(f"model_type '{model_type}' is not a supported LLaVA family; supported: {supported}.")


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
