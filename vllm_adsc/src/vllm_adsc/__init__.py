"""vLLM plugin for ADSC-LLaVA checkpoints: `vllm serve CKPT` and `vllm.LLM(CKPT)` run them with no change to vLLM.

vLLM calls `register` in every process it starts (entry point group `vllm.general_plugins`).
"""

ARCHITECTURE = "AdscLlavaForConditionalGeneration"


def register() -> None:
    """Register the ADSC-LLaVA architecture with vLLM's model registry (lazily: the model module imports vLLM)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "vllm_adsc.model:AdscLlavaForConditionalGeneration")
