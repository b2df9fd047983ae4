"""Measured speed of stock LLaVA vs ADSC-LLaVA at several budgets: same weights, same inputs, one run.

Usage:

```bash
adsc-llava bench                                   # CPU: a random LLaVA whose LLM dominates (see below)
adsc-llava bench --threads 2 --plot benchmark.png  # also draw measured vs ideal ratios
adsc-llava bench --device cuda                     # GPU: LLaVA-1.5-7B-shaped, bf16, sdpa, batch 1 and 8
adsc-llava bench --config tiny --repeats 1         # seconds: a smoke run
```

For every batch size the script builds ONE set of random weights, shared (the same tensors) by a stock
`transformers.LlavaForConditionalGeneration` and an `AdscLlavaForConditionalGeneration` whose schedule is switched
between the budgets (`AdscLlavaConfig.with_budget`).
Each run is the loop `generate` runs, greedy: one prefill (`logits_to_keep=1`) and `G - 1` decode steps with a
`DynamicCache` (ADSC: its `AdscCache`), without the all-ones attention mask that `generate` drops too. After
`--warmup` untimed rounds, `--repeats` rounds time every model in turn (interleaved, so a change of machine load hits
all of them alike) and the medians are reported, each as a ratio to stock next to its ideal:

- prefill time vs the analytic prefill FLOPs ratio (`adsc_llava.cost.estimate_cost`, `lm_head_positions="last"`);
- decode time per token vs the decode FLOPs ratio, and vs the bytes a decode step moves: the LLM's weights, read
  once, plus three times the KV cache (`DynamicCache` appends with `torch.cat`, which reads the old cache and writes
  the new one, and attention reads it). At batch 1 a decode step is bound by memory traffic, not FLOPs, so that is
  its realistic ideal;
- peak memory above the weights, measured in an extra untimed run (`generation.peak_memory_bytes` says how);
- the KV cache bytes actually held by the cache at the end (keys + values of every layer), which must equal the
  analytic figure exactly (the table says so, per row);
- the host-device syncs of a prefill and of a decode step (`benchmarks/syncs.py`: the calls that make the host wait
  for a device value, counted on any device), as `generate` runs them: an all-ones attention mask is dropped.

By default the image features are fed precomputed (`mm_encoder_outputs`), so the vision tower and projector are not
timed: they do the same work in both models (ADSC starts inside the LLM) and would only add the same constant to
every row. `--vision-tower` runs them on random pixels instead (the FLOPs ideal then includes them).

ADSC's own bookkeeping (finding image tokens, compaction, per-stage masks and rotary embeddings, the final scatter)
is read from the modeling file's `torch.profiler` ranges in one more prefill and decode step (`pruning_step`) and
reported as a share of that forward.

Defaults: on CPU a random LLaVA with 576 vision tokens per image, a Llama LLM of hidden 1024, 16 layers (so the
paper's `[2, 8, 16, 24]` of 32 scale to `[1, 4, 8, 12]` and budgets 192 / 128 / 64 give the paper's schedules), 16
heads, intermediate 2752, vocab 32064, fp32, sdpa, T = 58, G = 32, batch 1. With `--device cuda`: the shipped
LLaVA-1.5-7B config in bf16 with random weights, sdpa, G = 64, batch 1 and 8.

On a CPU that other processes use, multi-threaded timings are unreliable: every parallel operator waits for its
slowest thread, and a descheduled thread turns microseconds into milliseconds. The output reports the load average
and warns when it was high at the start; `--threads 1` stays meaningful on a busy machine.
"""

import argparse
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlavaConfig

from adsc_llava.benchmarks.generation import GenerationTiming, greedy_generate, peak_memory_bytes, step_syncs
from adsc_llava.benchmarks.models import PRESET_INPUTS, PRESETS, benchmark_config, build_models, make_inputs
from adsc_llava.benchmarks.pruning_step import measure_pruning_step
from adsc_llava.benchmarks.report import (
    BenchmarkRow,
    Variant,
    busy_machine_warning,
    decode_weight_bytes,
    describe_machine,
    format_pruning_table,
    format_table,
    load_average,
    write_plot,
)
from adsc_llava.cli import prog
from adsc_llava.configuration_adsc_llava import (
    default_pruning_layers,
    policy_pruning_layers,
    reachable_budget_range,
    validate_schedule,
)
from adsc_llava.cost import LlavaDims, adsc_config, config_schedule, estimate_cost

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BenchmarkSettings:
    config_name: str
    device: torch.device
    dtype: torch.dtype
    attn_implementation: str
    prompt_tokens: int
    new_tokens: int
    num_images: int
    batch_sizes: list[int]
    budgets: list[float]
    pruning_layers: list[int]
    repeats: int
    warmup: int
    vision_tower: bool
    seed: int
    visual_input: dict  # {"image_size": (H, W)} or {"video_frames": N} for the anyres presets, else {}
    baselines: tuple[str, ...] = ()  # keep policies compared beside ADSC, on their own layers


BASELINES = {"fastv": "FastV", "pyramiddrop": "PyramidDrop"}


def benchmark_variants(
    config: LlavaConfig,
    budgets: list[float],
    pruning_layers: list[int],
    visual_input: dict | None = None,
    baselines: tuple[str, ...] = (),
) -> list[Variant]:
    """Stock first, then ADSC at each budget (`r` solved by `with_budget`), then each baseline at the budgets its
    layers can reach, with the schedules of `visual_input`."""
    dims = LlavaDims.from_config(config).for_input(config, **(visual_input or {}))
    variants = [Variant("stock", None, 0.0, [], [dims.vision_tokens_per_image] * dims.num_layers)]
    base_config = adsc_config(config)
    for policy in ("uniform", *baselines):
        if policy == "uniform":
            name, layers = "ADSC", pruning_layers
        else:
            name, layers = BASELINES[policy], policy_pruning_layers(policy, dims.num_layers)
        lowest, highest = reachable_budget_range(dims.num_layers, layers, base_config.reference_vision_tokens)
        for budget in budgets:
            if policy != "uniform" and not lowest <= budget < highest:
                continue  # main() lists what was left out
            solved = base_config.with_budget(budget, layers)
            schedule = config_schedule(solved, dims)
            variants.append(
                Variant(f"{name} {budget:g}", budget, solved.adsc_drop_ratio, list(layers), schedule, policy)
            )
    return variants


@contextmanager
def variant_model(variant: Variant, stock, adsc) -> Iterator:
    """The model that runs `variant`: the stock model, or the ADSC model with the variant's schedule."""
    if variant.budget is None:
        yield stock
        return
    saved = adsc.config.schedule
    adsc.config.update(
        {
            "adsc_pruning_layers": variant.pruning_layers,
            "adsc_drop_ratio": variant.drop_ratio,
            "adsc_keep_policy": variant.keep_policy,
        }
    )
    try:
        yield adsc
    finally:
        adsc.config.update(saved)


def run_benchmark(settings: BenchmarkSettings, progress: bool = True) -> list[BenchmarkRow]:
    """Run every variant at every batch size; see the module docstring for what is measured and how."""
    config = benchmark_config(settings.config_name)
    variants = benchmark_variants(
        config, settings.budgets, settings.pruning_layers, settings.visual_input, settings.baselines
    )
    stock, adsc = build_models(config, settings.device, settings.dtype, settings.attn_implementation, settings.seed)
    rounds = settings.warmup + settings.repeats
    steps_per_batch = rounds * len(variants) + 2 * len(variants) - 1  # timed rounds, memory runs, pruning timers
    rows = []
    with (
        torch.inference_mode(),
        tqdm(total=steps_per_batch * len(settings.batch_sizes), desc="benchmark", disable=not progress) as bar,
    ):
        for batch_size in settings.batch_sizes:
            inputs = make_inputs(
                config,
                prompt_tokens=settings.prompt_tokens,
                num_images=settings.num_images,
                batch_size=batch_size,
                device=settings.device,
                dtype=settings.dtype,
                vision_tower=settings.vision_tower,
                visual_input=settings.visual_input,
                seed=settings.seed,
            )
            timings: dict[str, list[GenerationTiming]] = {variant.label: [] for variant in variants}
            for round_index in range(rounds):
                for variant in variants:
                    phase = (
                        "warm-up" if round_index < settings.warmup else f"round {round_index - settings.warmup + 1}"
                    )
                    bar.set_postfix_str(f"batch {batch_size}, {phase}, {variant.label}")
                    with variant_model(variant, stock, adsc) as model:
                        timing = greedy_generate(model, inputs, settings.new_tokens, settings.device)
                    timing.cache = None  # free it before the next run
                    if round_index >= settings.warmup:
                        timings[variant.label].append(timing)
                    bar.update()
            for variant in variants:
                bar.set_postfix_str(f"batch {batch_size}, peak memory, {variant.label}")
                with variant_model(variant, stock, adsc) as model:
                    peak, kv_bytes = peak_memory_bytes(model, inputs, settings.new_tokens, settings.device)
                    syncs = step_syncs(model, inputs)
                bar.update()
                row = BenchmarkRow(
                    variant=variant,
                    batch_size=batch_size,
                    report=estimate_cost(
                        config,
                        prompt_tokens=settings.prompt_tokens,
                        new_tokens=settings.new_tokens,
                        schedule=variant.schedule,
                        num_images=settings.num_images,
                        batch_size=batch_size,
                        kv_dtype=settings.dtype,
                        lm_head_positions="last",  # the prefill keeps the last logits, as generate does
                        **settings.visual_input,
                    ),
                    prefill_seconds=statistics.median(t.prefill_seconds for t in timings[variant.label]),
                    decode_seconds_per_token=statistics.median(
                        t.decode_seconds_per_token for t in timings[variant.label]
                    ),
                    peak_memory_bytes=peak,
                    kv_bytes_per_layer=kv_bytes,
                    decode_weight_bytes=decode_weight_bytes(stock),
                    syncs=syncs,
                )
                if variant.budget is not None:
                    bar.set_postfix_str(f"batch {batch_size}, pruning step, {variant.label}")
                    with variant_model(variant, stock, adsc) as model:
                        row.pruning_step = measure_pruning_step(model, inputs, settings.device, settings.repeats)
                    bar.update()
                rows.append(row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("bench"),
        description="Measured prefill / decode time and memory of stock LLaVA vs ADSC-LLaVA at several budgets.",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N.")
    parser.add_argument(
        "--config",
        default=None,
        help=f"A preset ({', '.join(PRESETS)}), a shipped config (llava-1.5-7b, llava-1.5-13b), a config.json or a "
        "checkpoint folder (random weights are used in every case). Default: cpu on CPU, llava-1.5-7b on CUDA.",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="Default: float32 on CPU, else bf16.")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="Attention implementation.")
    parser.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=None,
        help="ADSC budgets to compare. Default: 192 128 64 (of 576), or for the NeXT / OneVision presets a third, "
        "2/9 and 1/9 of the reference image's tokens.",
    )
    parser.add_argument(
        "--pruning-layers",
        type=int,
        nargs="+",
        default=None,
        help="Default: the paper's [2, 8, 16, 24] of 32 scaled to the depth (default_pruning_layers).",
    )
    parser.add_argument(
        "--baselines",
        nargs="*",
        choices=sorted(BASELINES),
        default=[],
        help="Also time these keep policies at the same budgets, on their own layers (FastV: K = 2 of 32; "
        "PyramidDrop: 8, 16, 24 of 32; scaled to the depth). Budgets a baseline's layers cannot reach are listed.",
    )
    parser.add_argument("--prompt-tokens", type=int, default=58, help="Text tokens per prompt (T).")
    parser.add_argument("--new-tokens", type=int, default=None, help="Generated tokens (G). Default: 32 CPU, 64 GPU.")
    parser.add_argument("--num-images", type=int, default=1, help="Images per prompt.")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=None, help="Default: 1 on CPU, 1 and 8 on a GPU."
    )
    parser.add_argument("--repeats", type=int, default=3, help="Timed rounds; medians are reported.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed rounds first.")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU).")
    parser.add_argument(
        "--vision-tower",
        action="store_true",
        help="Run the vision tower and projector on random pixels instead of feeding precomputed image features.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=None, help="Write a PNG of the ratios here (needs matplotlib).")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    return parser


def settings_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BenchmarkSettings:
    """Fill the device-dependent defaults and check the arguments; bad values end with a usage error."""
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {error}")
    on_gpu = device.type != "cpu"
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but torch sees no CUDA device.")
    for name in ("prompt_tokens", "num_images"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}.")
    for name, minimum in (("repeats", 1), ("warmup", 0)):
        if getattr(args, name) < minimum:
            parser.error(f"--{name} must be >= {minimum}, got {getattr(args, name)}.")
    new_tokens = args.new_tokens if args.new_tokens is not None else (64 if on_gpu else 32)
    if new_tokens < 2:
        parser.error(f"--new-tokens must be >= 2 (one prefill and at least one decode step), got {new_tokens}.")
    batch_sizes = args.batch_sizes or ([1, 8] if on_gpu else [1])
    if min(batch_sizes) < 1:
        parser.error(f"--batch-sizes must be >= 1, got {batch_sizes}.")
    config_name = args.config or ("llava-1.5-7b" if on_gpu else "cpu")
    visual_input = PRESET_INPUTS.get(config_name, {})
    try:
        config = benchmark_config(config_name)
        if args.budgets is None:
            reference = adsc_config(config).reference_vision_tokens
            args.budgets = [round(reference * fraction, 1) for fraction in (1 / 3, 2 / 9, 1 / 9)]
            args.budgets = [192.0, 128.0, 64.0] if reference == 576 else args.budgets
        num_layers = LlavaDims.from_config(config).num_layers
        pruning_layers = args.pruning_layers or default_pruning_layers(num_layers)
        validate_schedule(num_layers, pruning_layers, 0.0)
        if not args.budgets:
            parser.error("--budgets needs at least one budget.")
        benchmark_variants(config, args.budgets, pruning_layers, visual_input)  # unreachable budgets fail here
    except ValueError as error:
        parser.error(str(error))
    return BenchmarkSettings(
        config_name=config_name,
        device=device,
        dtype=DTYPES[args.dtype or ("bfloat16" if on_gpu else "float32")],
        attn_implementation=args.attn,
        prompt_tokens=args.prompt_tokens,
        new_tokens=new_tokens,
        num_images=args.num_images,
        batch_sizes=batch_sizes,
        budgets=args.budgets,
        pruning_layers=pruning_layers,
        repeats=args.repeats,
        warmup=args.warmup,
        vision_tower=args.vision_tower,
        seed=args.seed,
        visual_input=visual_input,
        baselines=tuple(args.baselines),
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}.")
        torch.set_num_threads(args.threads)
    settings = settings_from_args(args, parser)
    load_at_start = load_average()
    started = time.perf_counter()
    rows = run_benchmark(settings, progress=not args.no_progress)
    elapsed = time.perf_counter() - started

    config = benchmark_config(settings.config_name)
    dims = LlavaDims.from_config(config).for_input(config, **settings.visual_input)
    weight_bytes = rows[0].decode_weight_bytes
    vision_tower = "timed" if settings.vision_tower else "not run (features fed)"
    print(f"machine: {describe_machine(settings.device, load_at_start)}")
    print(
        f"model: {settings.config_name} with random weights, {dims.num_layers} layers, hidden {dims.hidden_size}, "
        f"{dims.num_attention_heads} heads ({dims.num_key_value_heads} KV), intermediate {dims.intermediate_size}, "
        f"vocab {dims.vocab_size}, {dims.vision_tokens_per_image} vision tokens per input "
        f"{settings.visual_input or ''} | {settings.dtype}, "
        f"{settings.attn_implementation} attention, device {settings.device}"
    )
    print(
        f"run: T = {settings.prompt_tokens} text tokens, {settings.num_images} image(s), "
        f"G = {settings.new_tokens} new tokens (1 prefill + {settings.new_tokens - 1} decode steps, greedy), "
        f"pruning layers {settings.pruning_layers}, vision tower {vision_tower}, "
        f"median of {settings.repeats} round(s) after {settings.warmup} warm-up round(s); wall time {elapsed:.0f} s\n"
    )
    for policy in settings.baselines:
        name, layers = BASELINES[policy], policy_pruning_layers(policy, dims.num_layers)
        timed = {row.variant.budget for row in rows if row.variant.keep_policy == policy}
        left_out = [budget for budget in settings.budgets if budget not in timed]
        lowest, highest = reachable_budget_range(dims.num_layers, layers, adsc_config(config).reference_vision_tokens)
        print(
            f"{name}: pruning layers {layers}"
            + (f"; budgets {left_out} left out: these layers reach [{lowest:g}, {highest:g})" if left_out else "")
        )
    if settings.baselines:
        print()
    warning = busy_machine_warning(settings.device, load_at_start)
    if warning is not None:
        print(f"{warning}\n")
    print(format_table(rows, weight_bytes, settings.vision_tower))
    print(
        "\nx stock: this row / the stock row of the same batch size. Ideals: analytic FLOPs (adsc_llava.cost, "
        "lm_head on the last prefill position as generate does) and, for decode, bytes moved per step (decoder + "
        f"lm_head weights {weight_bytes / 1e6:.0f} MB, plus 3x the KV cache: read and written by DynamicCache's "
        "torch.cat, read by attention). Peak MB: above the weights, "
        + (
            "torch.cuda.max_memory_allocated."
            if settings.device.type == "cuda"
            else "tensor storages alive at once (a TorchDispatchMode count; see benchmarks/generation.py)."
        )
        + " KV MB held: keys + values in the cache after the last decode step. Syncs: calls that wait for a device "
        "value (.item(), bool(tensor), .tolist(), nonzero, boolean indexing...) in one prefill and one decode step."
    )
    print("\nADSC bookkeeping per forward, from its torch.profiler ranges in one profiled prefill and decode step:\n")
    print(format_pruning_table(rows))
    if args.plot is not None:
        write_plot(rows, args.plot, weight_bytes, settings.vision_tower)
        print(f"\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
