"""Importable home of the two top-level modeling files.

`configuration_adsc_llava.py` and `modeling_adsc_llava.py` live at the repository's top level because every
checkpoint ships them as remote code, where they import each other relatively. This package makes them importable
as `adsc_llava.*` with those relative imports intact: from a source checkout it adds the top level to its path; a
built wheel carries copies (see `setup.py`).
"""

from pathlib import Path

_SOURCE_ROOT = Path(__file__).resolve().parent.parent
if (_SOURCE_ROOT / "modeling_adsc_llava.py").is_file():
    __path__.append(str(_SOURCE_ROOT))

from .configuration_adsc_llava import AdscLlavaConfig  # noqa: E402

_MODELING_NAMES = ("AdscLlavaForConditionalGeneration", "uniform_keep_indices")


def __getattr__(name: str):
    # The modeling file (and torch's model code it pulls in) is imported on first use, so that config-only tools
    # such as the cost model start fast.
    if name in _MODELING_NAMES:
        from . import modeling_adsc_llava

        return getattr(modeling_adsc_llava, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_auto_classes() -> None:
    """Register ADSC-LLaVA with the Auto classes so local code can use them without `trust_remote_code`."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    from .modeling_adsc_llava import AdscLlavaForConditionalGeneration

    AutoConfig.register(AdscLlavaConfig.model_type, AdscLlavaConfig, exist_ok=True)
    AutoModel.register(AdscLlavaConfig, AdscLlavaForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(AdscLlavaConfig, AdscLlavaForConditionalGeneration, exist_ok=True)


__all__ = ["AdscLlavaConfig", "AdscLlavaForConditionalGeneration", "register_auto_classes", "uniform_keep_indices"]
