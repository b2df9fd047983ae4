"""KV cache blocks per request in vLLM: stock LLaVA vs ADSC at several budgets, from vLLM's own KV cache grouping.

    python -m vllm_adsc.blocks CHECKPOINT [--budgets 192 128 64] [--text-tokens 64] [--block-size 16]

CHECKPOINT is any ADSC-LLaVA checkpoint folder (only its config is read). For each schedule the layers get the specs
the plugin gives them (`kv_cache.AdscStageSpec`), vLLM groups them (`get_kv_cache_groups`, as at engine start), and
each group's manager rule (`stages.RequestImages.kept`) gives the blocks one request holds after its prefill. The
KV bytes are blocks x page size x layers per group; stock LLaVA is the empty schedule (one stage).
"""

import argparse
import math
from dataclasses import dataclass

import torch
from transformers import AutoConfig
from vllm.config import VllmConfig
from vllm.v1.core.kv_cache_utils import get_kv_cache_groups
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_adsc.kv_cache import AdscStageSpec
from vllm_adsc.stages import RequestImages, VisionSchedule, layer_stages


@dataclass
class RequestBlocks:
    name: str
    groups: list[tuple[int, int]]  # (stage, layers) of each KV cache group
    blocks: list[int]  # blocks the request holds in each group
    kv_bytes: int


def request_blocks(config, name: str, block_size: int, prompt_tokens: int, image_offsets: list[int]) -> RequestBlocks:
    """The KV cache groups vLLM makes for `config`'s schedule and the blocks one request holds in each."""
    text = config.text_config
    head_size = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    base = FullAttentionSpec(
        block_size=block_size, num_kv_heads=text.num_key_value_heads, head_size=head_size, dtype=torch.float16
    )
    schedule = VisionSchedule.from_config(config)
    specs = {
        f"layers.{layer}": AdscStageSpec.from_spec(base, stage)
        for layer, stage in enumerate(layer_stages(text.num_hidden_layers, schedule.pruning_layers))
    }
    vllm_config = VllmConfig()
    vllm_config.cache_config.kv_cache_layout = "LBHNC"  # resolved by the engine at start; groups do not depend on it
    groups = get_kv_cache_groups(vllm_config, specs)
    images = RequestImages(schedule, image_offsets)
    blocks = [math.ceil(images.kept(prompt_tokens, group.kv_cache_spec.stage) / block_size) for group in groups]
    kv_bytes = sum(
        count * group.kv_cache_spec.page_size_bytes * len(group.layer_names)
        for count, group in zip(blocks, groups, strict=True)
    )
    layout = [(group.kv_cache_spec.stage, len(group.layer_names)) for group in groups]
    return RequestBlocks(name, layout, blocks, kv_bytes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vllm_adsc.blocks", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="an ADSC-LLaVA checkpoint folder (its config is read)")
    parser.add_argument("--budgets", type=float, nargs="*", default=[192, 128, 64], help="re-solve r for these")
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens of the prompt (one image)")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block (vLLM's GPU default)")
    args = parser.parse_args(argv)
    config = AutoConfig.from_pretrained(args.checkpoint, trust_remote_code=True)
    prompt_tokens, image_offsets = args.text_tokens + config.image_seq_length, [args.text_tokens // 2]
    rows = [request_blocks(config.with_budget(None), "stock", args.block_size, prompt_tokens, image_offsets)]
    for budget in args.budgets:
        rows.append(
            request_blocks(
                config.with_budget(budget), f"ADSC {budget:g}", args.block_size, prompt_tokens, image_offsets
            )
        )
    print(
        f"One request: {config.image_seq_length} image tokens + {args.text_tokens} text tokens, blocks of "
        f"{args.block_size} tokens, fp16"
    )
    print(f"{'schedule':<10} {'groups (stage x layers)':<34} {'blocks per group':<52} {'KV MB':>7} {'vs stock':>8}")
    for row in rows:
        layout = ", ".join(f"{stage}x{layers}" for stage, layers in sorted(set(row.groups)))
        counts = " ".join(map(str, row.blocks))
        megabytes, ratio = row.kv_bytes / 2**20, row.kv_bytes / rows[0].kv_bytes
        print(f"{row.name:<10} {len(row.groups):>2} groups: {layout:<23} {counts:<52} {megabytes:>7.1f} {ratio:>8.3f}")


if __name__ == "__main__":
    main()
