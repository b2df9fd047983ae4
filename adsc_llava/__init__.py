"""adsc-llava: LLaVA models that compute on fewer vision tokens inside their language model (ADSC).

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

from .configuration_adsc_llava import AdscLlavaConfig  # noqa: E402

_MODELING_NAMES = ("AdscLlavaForConditionalGeneration", "uniform_keep_indices")


def __getattr__(name: str):
    # The modeling file (and torch's model code it pulls in) is imported on first use, so that config-only tools
    # such as the cost model start fast.
    if name in _MODELING_NAMES:
        from . import modeling_adsc_llava

        return getattr(modeling_adsc_llava, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def shipped_file(name: str) -> Path:
    """A file that travels with the package: `model_card.md`, the modeling files (source checkout or wheel)."""
    for folder in __path__:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise FileNotFoundError(f"{name} is not in the adsc_llava package ({', '.join(__path__)}): a broken install?")


def register_auto_classes() -> None:
    """Register ADSC-LLaVA with the Auto classes so local code can use them without `trust_remote_code`."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    from .modeling_adsc_llava import AdscLlavaForConditionalGeneration

    AutoConfig.register(AdscLlavaConfig.model_type, AdscLlavaConfig, exist_ok=True)
    AutoModel.register(AdscLlavaConfig, AdscLlavaForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(AdscLlavaConfig, AdscLlavaForConditionalGeneration, exist_ok=True)


__all__ = [
    "AdscLlavaConfig",
    "AdscLlavaForConditionalGeneration",
    "register_auto_classes",
    "shipped_file",
    "uniform_keep_indices",
]
