"""Print the paper's Table IV (FLOPs and KV cache per vision-token budget) for a LLaVA or Qwen-VL config; plot it.

Usage:

```bash
adsc-llava cost                                  # LLaVA-1.5-7B, budgets 192 / 128 / 64, T = 58, G = 64
adsc-llava cost --config llava-1.5-13b --plot table_iv_13b.png
adsc-llava cost --config path/to/checkpoint --budgets 288 144 --kv-dtype bfloat16
adsc-llava cost --measure cpu                    # then measure stock vs ADSC speed (adsc-llava bench)
```

Every number comes from the analytic model in `adsc_llava.cost` (DeepSpeed flops-profiler conventions); for the 7B
config at the paper's settings the paper's figures and the differences are printed alongside.
"""

import argparse
import sys
from pathlib import Path

from adsc_llava.cli import prog
from adsc_llava.configuration_adsc_llava import default_pruning_layers, validate_schedule
from adsc_llava.cost import (
    PAPER_KV_DTYPE_BYTES,
    PAPER_NEW_TOKENS,
    PAPER_PROMPT_TOKENS,
    PAPER_PRUNING_LAYERS,
    PAPER_REFERENCE_CONFIG,
    PAPER_TABLE_IV,
    REFERENCE_CONFIGS,
    CostReport,
    LlavaDims,
    adsc_config,
    config_schedule,
    dtype_num_bytes,
    estimate_cost,
    format_schedule,
    load_config,
    load_reference_config,
    reference_image_size,
    stock_and_adsc_costs,
)
from adsc_llava.cost_qwen import is_qwen


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("cost"),
        description="Analytic FLOPs and KV cache of (ADSC-)LLaVA per vision-token budget (the paper's Table IV).",
    )
    parser.add_argument(
        "--config",
        default=PAPER_REFERENCE_CONFIG,
        help=f"{' or '.join(REFERENCE_CONFIGS)} (shipped), a config.json, or a checkpoint folder.",
    )
    parser.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=None,
        help="Average vision tokens per layer to solve r for; stock is always the first row. Default: 192 128 64 "
        "for LLaVA-1.5, a third, 2/9 and 1/9 of the reference image's tokens for NeXT / OneVision.",
    )
    parser.add_argument(
        "--image-size",
        type=image_size_arg,
        default=None,
        help="NeXT / OneVision / Qwen-VL: the images' size as HxW, e.g. 480x640 (default: the family's reference "
        "photo, 640 x 480 or, for Qwen-VL, 1280 x 720); Qwen-VL videos: each frame's.",
    )
    parser.add_argument(
        "--video-frames", type=int, default=None, help="OneVision / Qwen-VL: a video of N frames instead."
    )
    parser.add_argument("--prompt-tokens", type=int, default=PAPER_PROMPT_TOKENS, help="Text tokens per prompt (T).")
    parser.add_argument("--new-tokens", type=int, default=PAPER_NEW_TOKENS, help="Generated tokens (G).")
    parser.add_argument(
        "--pruning-layers",
        type=int,
        nargs="+",
        default=None,
        help="Decoder layers at whose input tokens are dropped. Default: the config's own ADSC layers, else the "
        "paper's [2, 8, 16, 24] scaled to the depth.",
    )
    parser.add_argument("--num-images", type=int, default=1, help="Images per prompt.")
    parser.add_argument("--batch-size", type=int, default=1, help="Sequences per batch.")
    parser.add_argument(
        "--kv-dtype", default="float32", help="KV-cache dtype (the paper's figures behave like float32)."
    )
    parser.add_argument(
        "--lm-head-positions",
        choices=["all", "last"],
        default="all",
        help="lm_head on every prefill position (the paper / DeepSpeed) or the last one (transformers generate).",
    )
    parser.add_argument("--plot", type=Path, default=None, help="Write a PNG of FLOPs and KV cache vs budget here.")
    parser.add_argument(
        "--measure",
        choices=["cpu", "cuda"],
        default=None,
        help="Then run the speed benchmark (adsc-llava bench, progress shown) with the same budgets, T, G, "
        "images and batch size, on this device: on cuda with this config (random weights), on cpu with the "
        "benchmark's random CPU-sized model (a 7B model is no CPU run) and its default pruning layers.",
    )
    return parser


def image_size_arg(text: str) -> tuple[int, int]:
    """`"480x640"` -> `(480, 640)`: height x width."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 480x640, got {text!r}") from None
    if height <= 0 or width <= 0:
        raise argparse.ArgumentTypeError(f"image sides must be positive, got {text!r}")
    return height, width


# Inputs the anyres table compares (H, W) and, for OneVision, videos by frame count.
TYPICAL_IMAGE_SIZES = ((336, 336), (480, 640), (768, 1024), (1080, 1920))
TYPICAL_VIDEO_FRAMES = (8, 16, 32)
# Qwen-VL runs images at their native resolution and videos of any frame size: (frames, (H, W)).
TYPICAL_QWEN_IMAGE_SIZES = ((480, 640), (720, 1280), (1080, 1920), (2160, 3840))
TYPICAL_QWEN_VIDEOS = ((8, (360, 640)), (32, (360, 640)), (32, (720, 1280)))


def typical_inputs(config) -> list[tuple[str, dict]]:
    """(label, `estimate_cost` keywords) of the typical inputs of the config's family."""
    if is_qwen(config):
        inputs = [
            (f"{height}x{width} image", {"image_size": (height, width)}) for height, width in TYPICAL_QWEN_IMAGE_SIZES
        ]
        return inputs + [
            (f"{frames}-frame {height}x{width} video", {"video_frames": frames, "image_size": (height, width)})
            for frames, (height, width) in TYPICAL_QWEN_VIDEOS
        ]
    inputs = [(f"{height}x{width} image", {"image_size": (height, width)}) for height, width in TYPICAL_IMAGE_SIZES]
    if getattr(config, "video_token_id", None) is not None:
        inputs += [(f"{frames}-frame video", {"video_frames": frames}) for frames in TYPICAL_VIDEO_FRAMES]
    return inputs


def typical_inputs_table(config, drop_ratio: float, pruning_layers: list[int], args) -> str:
    """Stock vs ADSC at one drop ratio for typical image sizes (and videos): the savings by input.

    `vision tokens` counts all of an input's tokens (a Qwen3-VL video: every frame's); `avg per layer` their mean
    over the decoder layers.
    """
    solved = adsc_config(config).with_budget(None)
    solved.update({"adsc_pruning_layers": pruning_layers, "adsc_drop_ratio": drop_ratio})
    inputs = typical_inputs(config)
    header = ["input", "vision tokens", "avg per layer", "TFLOPs stock", "TFLOPs ADSC", "x stock", "KV MB stock"]
    lines = ["| " + " | ".join(header + ["KV MB ADSC", "x stock"]) + " |", "|" + "---|" * (len(header) + 2)]
    for label, visual in inputs:
        stock, adsc = stock_and_adsc_costs(
            solved, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, kv_dtype=args.kv_dtype, **visual
        )
        vision_tokens = [tokens - args.prompt_tokens for tokens in adsc.prefill_tokens_per_layer]
        cells = [label, str(stock.prefill_tokens_per_layer[0] - args.prompt_tokens)]
        cells.append(f"{sum(vision_tokens) / len(vision_tokens):.0f}")
        cells += [f"{stock.tflops:.2f}", f"{adsc.tflops:.2f}", f"{adsc.total_flops / stock.total_flops:.3f}"]
        cells += [
            f"{stock.kv_megabytes:.1f}",
            f"{adsc.kv_megabytes:.1f}",
            f"{adsc.kv_cache_bytes / stock.kv_cache_bytes:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def benchmark_argv(args: argparse.Namespace) -> list[str]:
    """The `adsc-llava bench` arguments that measure what this table computes, as far as the device allows."""
    argv = ["--device", args.measure]
    if args.budgets is not None:  # else the benchmark's own default for its model
        argv += ["--budgets", *[f"{budget:g}" for budget in args.budgets]]
    argv += ["--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    argv += ["--num-images", str(args.num_images), "--batch-sizes", str(args.batch_size)]
    if args.measure == "cuda":
        argv += ["--config", str(args.config)]
        if args.pruning_layers is not None:
            argv += ["--pruning-layers", *map(str, args.pruning_layers)]
    return argv


def paper_applies(config, args: argparse.Namespace, pruning_layers: list[int]) -> bool:
    """Whether the run matches the paper's Table IV setting, so that its figures can be printed alongside."""
    reference = LlavaDims.from_config(load_reference_config(PAPER_REFERENCE_CONFIG))
    return (
        config.model_type in ("llava", "adsc_llava")
        and LlavaDims.from_config(config) == reference
        and args.prompt_tokens == PAPER_PROMPT_TOKENS
        and args.new_tokens == PAPER_NEW_TOKENS
        and pruning_layers == PAPER_PRUNING_LAYERS
        and args.num_images == 1
        and args.batch_size == 1
        and args.lm_head_positions == "all"
    )


def percent_change(value: float, baseline: float) -> str:
    return f"{100 * (value / baseline - 1):+.1f}%"


def format_table(
    rows: list[tuple[float, float, CostReport]], paper: dict[int, tuple[float, float]] | None, show_paper_kv: bool
) -> str:
    """The Markdown table: one row per `(budget, drop_ratio, report)`, the first being stock LLaVA."""
    stock = rows[0][2]
    header = ["budget", "r", "vision tokens per layer", "TFLOPs", "vs stock", "prefill TFLOPs", "KV MB", "vs stock"]
    if paper is not None:
        header += ["paper TFLOPs", "diff"]
        if show_paper_kv:
            header += ["paper KV MB", "diff"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for budget, drop_ratio, report in rows:
        cells = [
            f"{budget:g}" + (" (stock)" if report is stock else ""),
            f"{drop_ratio:.4g}",
            format_schedule(report.vision_tokens_per_layer),
            f"{report.tflops:.3f}",
            percent_change(report.total_flops, stock.total_flops),
            f"{report.prefill_flops / 1e12:.3f}",
            f"{report.kv_megabytes:.1f}",
            percent_change(report.kv_cache_bytes, stock.kv_cache_bytes),
        ]
        if paper is not None:
            # Float budgets hash like ints, so 192.0 finds the paper's 192 row.
            paper_tflops, paper_kv = paper.get(budget, (None, None))
            if paper_tflops is None:
                cells += ["-", "-"] + (["-", "-"] if show_paper_kv else [])
            else:
                cells += [f"{paper_tflops:.2f}", f"{report.tflops - paper_tflops:+.3f}"]
                if show_paper_kv:
                    cells += [f"{paper_kv:.1f}", f"{report.kv_megabytes - paper_kv:+.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paper_savings_note(rows: list[tuple[float, float, CostReport]]) -> list[str]:
    """Relative savings of each budget the paper reports, next to the paper's own."""
    stock = rows[0][2]
    paper_tflops_stock, paper_kv_stock = PAPER_TABLE_IV[576]
    notes = []
    for budget, _, report in rows[1:]:
        if budget not in PAPER_TABLE_IV:
            continue
        paper_tflops, paper_kv = PAPER_TABLE_IV[budget]
        notes.append(
            f"- budget {budget:g}: FLOPs {percent_change(report.total_flops, stock.total_flops)} "
            f"(paper {percent_change(paper_tflops, paper_tflops_stock)}), KV "
            f"{percent_change(report.kv_cache_bytes, stock.kv_cache_bytes)} "
            f"(paper {percent_change(paper_kv, paper_kv_stock)})"
        )
    return notes


def paper_kv_note(rows: list[tuple[float, float, CostReport]]) -> list[str]:
    """How the paper's (measured) KV figures relate to the analytic cache: their slope and their offset."""
    pruned = [(budget, report) for budget, _, report in rows[1:] if budget in PAPER_TABLE_IV]
    notes = []
    if len(pruned) >= 2:
        (high_budget, high), (low_budget, low) = (
            max(pruned, key=lambda row: row[0]),
            min(pruned, key=lambda row: row[0]),
        )
        tokens = high.average_vision_tokens - low.average_vision_tokens
        paper_slope = (PAPER_TABLE_IV[high_budget][1] - PAPER_TABLE_IV[low_budget][1]) / tokens
        analytic_slope = (high.kv_megabytes - low.kv_megabytes) / tokens
        notes.append(
            f"KV per average vision token between budgets {low_budget:g} and {high_budget:g}: paper "
            f"{paper_slope:.3f} MB, analytic fp32 {analytic_slope:.3f} MB: the paper's cache behaves like fp32."
        )
    offsets = ", ".join(
        f"{budget:g}: {PAPER_TABLE_IV[budget][1] - report.kv_megabytes:+.1f} MB"
        for budget, _, report in rows
        if budget in PAPER_TABLE_IV
    )
    notes.append(
        f"The paper's KV figures (measured with PyTorch) exceed the analytic peak cache by {offsets}; "
        "the analytic figure counts keys and values only."
    )
    return notes


def write_plot(rows: list[tuple[float, float, CostReport]], paper: dict | None, path: Path, title: str) -> None:
    """A PNG with two panels: total TFLOPs and peak KV-cache MB against the budget (paper points when given)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit(
            f"--plot needs matplotlib, which is not installed ({error}): `pip install matplotlib` "
            "(or the `plot` extra)."
        ) from error
    budgets = [budget for budget, _, _ in rows]
    figure, (flops_axis, kv_axis) = plt.subplots(1, 2, figsize=(10, 4))
    flops_axis.plot(budgets, [report.tflops for _, _, report in rows], "o-", label="analytic")
    kv_axis.plot(budgets, [report.kv_megabytes for _, _, report in rows], "o-", label="analytic")
    if paper is not None:
        paper_budgets = [budget for budget in budgets if budget in paper]
        flops_axis.plot(paper_budgets, [paper[b][0] for b in paper_budgets], "x", markersize=9, label="paper")
        kv_axis.plot(paper_budgets, [paper[b][1] for b in paper_budgets], "x", markersize=9, label="paper")
    flops_axis.set(xlabel="budget (average vision tokens per layer)", ylabel="TFLOPs per generate", title="Compute")
    kv_axis.set(
        xlabel="budget (average vision tokens per layer)", ylabel="peak KV cache (MB = 1e6 B)", title="KV cache"
    )
    for axis in (flops_axis, kv_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        dims = LlavaDims.from_config(config).for_input(config, args.image_size, args.video_frames)
        reference = adsc_config(config).reference_vision_tokens
        anyres = dims.vision_tokens_per_image != LlavaDims.from_config(config).vision_tokens_per_image or (
            config.model_type not in ("llava", "adsc_llava")
        )
        if args.budgets is None:
            args.budgets = [192, 128, 64] if not anyres else [round(reference * f, 1) for f in (1 / 3, 2 / 9, 1 / 9)]
        kv_dtype_bytes = dtype_num_bytes(args.kv_dtype)
        pruning_layers = args.pruning_layers
        if pruning_layers is None:
            pruning_layers = list(getattr(config, "adsc_pruning_layers", None) or []) or default_pruning_layers(
                dims.num_layers
            )
        validate_schedule(dims.num_layers, pruning_layers, 0.0)

        def report_for(schedule: list[int]) -> CostReport:
            return estimate_cost(
                config,
                prompt_tokens=args.prompt_tokens,
                new_tokens=args.new_tokens,
                schedule=schedule,
                num_images=args.num_images,
                batch_size=args.batch_size,
                kv_dtype=kv_dtype_bytes,
                lm_head_positions=args.lm_head_positions,
                image_size=args.image_size,
                video_frames=args.video_frames,
            )

        stock_budget = dims.vision_tokens_per_image
        rows = [(float(stock_budget), 0.0, report_for([stock_budget] * dims.num_layers))]
        for budget in args.budgets:
            solved = adsc_config(config).with_budget(budget, pruning_layers)
            rows.append((budget, solved.adsc_drop_ratio, report_for(config_schedule(solved, dims))))
    except ValueError as error:
        parser.error(str(error))

    paper = PAPER_TABLE_IV if paper_applies(config, args, pruning_layers) else None
    show_paper_kv = paper is not None and kv_dtype_bytes == PAPER_KV_DTYPE_BYTES
    print(
        f"config: {args.config} ({dims.num_layers} layers, hidden {dims.hidden_size}, "
        f"{dims.vision_tokens_per_image} vision tokens per image) | T = {args.prompt_tokens} text tokens, "
        f"G = {args.new_tokens} new tokens, {args.num_images} image(s), batch {args.batch_size} | pruning layers "
        f"{pruning_layers} | KV cache {args.kv_dtype} ({kv_dtype_bytes} B) | lm_head on {args.lm_head_positions} "
        "prefill positions\n"
    )
    print(format_table(rows, paper, show_paper_kv))
    print(
        "\nFLOPs: one prefill + G-1 decode steps, DeepSpeed conventions (2 x in x out per token per linear, full "
        "Lq x Lk attention, no element-wise ops).\nKV MB: peak cache after the last decode step, T + images x vision "
        "tokens + G-1 positions per layer, MB = 10^6 bytes."
    )
    if paper is not None:
        print("\nRelative savings vs stock (here vs paper):")
        print("\n".join(paper_savings_note(rows)))
        if show_paper_kv:
            print("\n".join(paper_kv_note(rows)))
    if anyres:
        height, width = reference_image_size(config)
        units = f" in {dims.units_per_input} units" if dims.units_per_input > 1 else ""
        print(
            f"\nBudgets refer to the reference image of {reference} tokens ({width} x {height}); the rows above are "
            f"for {dims.units_per_input * dims.vision_tokens_per_image} tokens per input{units}. The same schedule "
            f"(r = {rows[1][1]:.4g}) on typical inputs:\n"
        )
        print(typical_inputs_table(config, rows[1][1], pruning_layers, args))
    if args.plot is not None:
        write_plot(rows, paper, args.plot, f"{args.config}: T={args.prompt_tokens}, G={args.new_tokens}")
        print(f"\nplot written to {args.plot}")
    if args.measure is not None:
        from adsc_llava.benchmarks import speed  # torch and the models are only needed for measured runs

        print(f"\nMeasured (adsc-llava bench {' '.join(benchmark_argv(args))}):\n", flush=True)
        return speed.main(benchmark_argv(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
