"""Render the `model_card.md` template (shipped with the package) into a checkpoint's README.md."""

from pathlib import Path
from string import Template

from adsc_llava import AdscLlavaConfig, shipped_file
from adsc_llava.cost import format_schedule, stock_and_adsc_costs

# Table IV's setting: 58 prompt tokens, 64 generated tokens.
CARD_PROMPT_TOKENS, CARD_NEW_TOKENS = 58, 64


def cost_section(config: AdscLlavaConfig) -> str:
    """FLOPs and KV-cache savings against stock LLaVA from the analytic cost model, as Markdown."""
    stock, adsc = stock_and_adsc_costs(
        config, prompt_tokens=CARD_PROMPT_TOKENS, new_tokens=CARD_NEW_TOKENS, kv_dtype="float16"
    )
    return (
        f"## Cost (analytic: one image, {CARD_PROMPT_TOKENS} prompt + {CARD_NEW_TOKENS} generated tokens)\n\n"
        "| | stock LLaVA | this model | ratio |\n|---|---|---|---|\n"
        f"| TFLOPs | {stock.tflops:.3f} | {adsc.tflops:.3f} | {adsc.total_flops / stock.total_flops:.1%} |\n"
        f"| peak KV cache, fp16 (MB) | {stock.kv_megabytes:.1f} | {adsc.kv_megabytes:.1f} | "
        f"{adsc.kv_cache_bytes / stock.kv_cache_bytes:.1%} |\n"
    )


def render_model_card(
    config: AdscLlavaConfig,
    *,
    base_model: str,
    data: str,
    steps: int,
    curriculum: str | None,
    repo_id: str | None = None,
    license: str = "llama2",
) -> str:
    fields = {
        "license": license,
        "base_model": base_model,
        "model_name": repo_id or "ADSC-LLaVA",
        "repo_id": repo_id or "path/to/this/checkpoint",
        "pruning_layers": config.adsc_pruning_layers,
        "drop_ratio": f"{config.adsc_drop_ratio:.4f}",
        "num_vision_tokens": config.reference_vision_tokens,
        "average_tokens": f"{config.average_vision_tokens():.1f}",
        "tokens_per_layer": format_schedule(config.vision_tokens_per_layer()),
        "cost_section": cost_section(config),
        "data": data,
        "steps": steps,
        "curriculum": curriculum or "none (no pruning)",
    }
    return Template(shipped_file("model_card.md").read_text(encoding="utf-8")).substitute(fields)


def write_model_card(final_dir: Path, config: AdscLlavaConfig, **kwargs) -> Path:
    path = Path(final_dir) / "README.md"
    path.write_text(render_model_card(config, **kwargs), encoding="utf-8")
    return path
