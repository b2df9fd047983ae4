"""adsc-llava: LLaVA and Qwen-VL models that compute on fewer vision tokens inside their language model (ADSC).

The package holds the library (`convert`, `cost`, `model_card`, `testing`, the `adsc-llava` CLI) and, as
subpackages, fine-tuning (`adsc_llava.train`), the speed benchmark (`adsc_llava.benchmarks`) and the demo
(`adsc_llava.shapes_demo`). In a source checkout those live in the top-level folders `train/`, `benchmarks/` and
`examples/shapes_demo/`, next to the two modeling files that every checkpoint ships as remote code (they import each
other relatively, so they must stay side by side). The package's search path then includes those folders; a built
wheel carries copies inside the package instead (see `setup.py`).
"""

from pathlib import Path

_SOURCE_ROOT = Path(__file__).resolve().parent.parent
if (_SOURCE_ROOT / "modeling_adsc_llava.py").is_file():
    __path__ += [str(_SOURCE_ROOT), str(_SOURCE_ROOT / "examples")]

from .configuration_adsc_llava import AdscLlavaConfig, uniform_keep_positions  # noqa: E402
from .configuration_adsc_llava_next import AdscLlavaNextConfig  # noqa: E402
from .configuration_adsc_llava_onevision import AdscLlavaOnevisionConfig  # noqa: E402
from .configuration_adsc_qwen2_5_vl import AdscQwen2_5_VLConfig  # noqa: E402
from .configuration_adsc_qwen3_vl import AdscQwen3VLConfig  # noqa: E402

# name -> modeling module: imported on first use, so that config-only tools such as the cost model start fast.
_MODELING_NAMES = {
    "AdscLlavaForConditionalGeneration": "modeling_adsc_llava",
    "AdscLlavaNextForConditionalGeneration": "modeling_adsc_llava_next",
    "AdscLlavaOnevisionForConditionalGeneration": "modeling_adsc_llava_onevision",
    "AdscQwen2_5_VLForConditionalGeneration": "modeling_adsc_qwen2_5_vl",
    "AdscQwen3VLForConditionalGeneration": "modeling_adsc_qwen3_vl",
}


def __getattr__(name: str):
    if name in _MODELING_NAMES:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_MODELING_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def shipped_file(name: str) -> Path:
    """A file that travels with the package: `model_card.md`, the modeling files (source checkout or wheel)."""
    for folder in __path__:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise FileNotFoundError(f"{name} is not in the adsc_llava package ({', '.join(__path__)}): a broken install?")


def register_auto_classes() -> None:
    """Register every ADSC family with the Auto classes so local code can use them without `trust_remote_code`."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    from .families import FAMILIES

    for family in FAMILIES:
        config_class, model_class = family.config_class, family.model_class
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
        AutoModelForImageTextToText.register(config_class, model_class, exist_ok=True)


__all__ = [
    "AdscLlavaConfig",
    "AdscLlavaForConditionalGeneration",
    "AdscLlavaNextConfig",
    "AdscLlavaNextForConditionalGeneration",
    "AdscLlavaOnevisionConfig",
    "AdscLlavaOnevisionForConditionalGeneration",
    "AdscQwen2_5_VLConfig",
    "AdscQwen2_5_VLForConditionalGeneration",
    "AdscQwen3VLConfig",
    "AdscQwen3VLForConditionalGeneration",
    "register_auto_classes",
    "shipped_file",
    "uniform_keep_positions",
]
