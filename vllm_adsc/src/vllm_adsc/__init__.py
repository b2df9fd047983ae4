"""vLLM plugin for ADSC-LLaVA checkpoints: `vllm serve CKPT` and `vllm.LLM(CKPT)` run them with no change to vLLM.

vLLM calls `register` in every process it starts (entry point group `vllm.general_plugins`).
"""

ARCHITECTURE = "AdscLlavaForConditionalGeneration"


def register() -> None:
    """Register the ADSC-LLaVA architecture with vLLM's model registry, and its config hook (which selects the
    plugin's scheduler and worker). Lazily: the model module imports vLLM's model code."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "vllm_adsc.model:AdscLlavaForConditionalGeneration")
    # vLLM has no public call for a model's config hook; its own models are listed in this table.
    from vllm_adsc.engine import AdscConfigHook

    hook = MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, AdscConfigHook)
    if hook is not AdscConfigHook:
        raise RuntimeError(f"Another plugin registered a config hook for {ARCHITECTURE}: {hook}.")
