"""What the speed benchmark prints and plots: ratios to stock next to their ideals, and the machine it ran on."""

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from adsc_llava.benchmarks.pruning_step import FORWARD_KINDS, PROFILER_RANGES, PruningStepTimes
from adsc_llava.cost import CostReport, format_schedule


@dataclass
class Variant:
    """One model of the comparison: stock LLaVA (`budget=None`), or ADSC or a baseline policy at a budget."""

    label: str
    budget: float | None
    drop_ratio: float
    pruning_layers: list[int]
    schedule: list[int]
    keep_policy: str = "uniform"


@dataclass
class BenchmarkRow:
    """Measured and analytic figures of one variant at one batch size."""

    variant: Variant
    batch_size: int
    report: CostReport
    prefill_seconds: float
    decode_seconds_per_token: float
    peak_memory_bytes: int
    kv_bytes_per_layer: list[int]
    decode_weight_bytes: int
    pruning_step: PruningStepTimes | None = None  # None for stock LLaVA
    syncs: tuple[int, int] | None = None  # host-device syncs of a prefill and of a decode step (`step_syncs`)

    @property
    def kv_bytes(self) -> int:
        return sum(self.kv_bytes_per_layer)

    @property
    def kv_matches_analytic(self) -> bool:
        return self.kv_bytes_per_layer == self.report.kv_cache_bytes_per_layer()

    def pruning_share(self, kind: str, extra_only: bool = False) -> float | None:
        """Share of the profiled prefill / decode step spent in ADSC's bookkeeping (None for stock)."""
        return None if self.pruning_step is None else self.pruning_step.share(kind, extra_only)


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights a decode step reads: every decoder layer, the final norm and the lm_head.

    The token embedding (one row read) and the vision tower (idle while decoding) are left out.
    """
    language_model = model.model.language_model
    modules = [language_model.layers, language_model.norm, model.lm_head]
    return sum(param.nbytes for module in modules for param in module.parameters())


def decode_moved_bytes(report: CostReport, weight_bytes: int) -> float:
    """Mean bytes one decode step moves: the weights once, and the KV cache three times.

    Step `s` appends one position to every layer with `torch.cat` (`DynamicCache`), which reads the `s`-step cache
    and writes the `s + 1`-step one; attention then reads the `s + 1`-step cache.
    """
    if report.num_decode_steps == 0:
        return float(weight_bytes)
    kv_traffic = [
        (2 * sum(report.cache_lengths(step + 1)) + sum(report.cache_lengths(step))) * report.kv_bytes_per_position
        for step in range(report.num_decode_steps)
    ]
    return weight_bytes + sum(kv_traffic) / len(kv_traffic)


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.3f}" if baseline else "-"


def prefill_ideal_flops(row: BenchmarkRow, vision_tower: bool) -> int:
    """The prefill FLOPs of what was timed: the LLM, plus the vision tower and projector when they ran."""
    return row.report.prefill_flops if vision_tower else row.report.llm_prefill_flops


def mean_decode_flops(report: CostReport) -> float:
    return report.decode_flops / report.num_decode_steps if report.num_decode_steps else 0.0


def format_percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.2f}%"


def format_table(rows: list[BenchmarkRow], weight_bytes: int, vision_tower: bool) -> str:
    """The Markdown table: one row per (batch size, model), ratios to the stock row of the same batch size."""
    header = [
        "batch",
        "model",
        "r",
        "vision tokens per layer",
        "prefill ms",
        "x stock",
        "ideal (FLOPs)",
        "decode ms/token",
        "x stock",
        "ideal (FLOPs)",
        "ideal (bytes moved)",
        "peak MB",
        "x stock",
        "KV MB held",
        "x stock",
        "KV = analytic",
        "pruning step, % of prefill",
        "syncs: prefill",
        "syncs: decode step",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    stock_rows = {row.batch_size: row for row in rows if row.variant.budget is None}
    for row in rows:
        stock = stock_rows[row.batch_size]
        cells = [
            str(row.batch_size),
            row.variant.label,
            f"{row.variant.drop_ratio:.4g}",
            format_schedule(row.variant.schedule),
            f"{1e3 * row.prefill_seconds:.1f}",
            ratio(row.prefill_seconds, stock.prefill_seconds),
            ratio(prefill_ideal_flops(row, vision_tower), prefill_ideal_flops(stock, vision_tower)),
            f"{1e3 * row.decode_seconds_per_token:.2f}",
            ratio(row.decode_seconds_per_token, stock.decode_seconds_per_token),
            ratio(mean_decode_flops(row.report), mean_decode_flops(stock.report)),
            ratio(decode_moved_bytes(row.report, weight_bytes), decode_moved_bytes(stock.report, weight_bytes)),
            f"{row.peak_memory_bytes / 1e6:.1f}",
            ratio(row.peak_memory_bytes, stock.peak_memory_bytes),
            f"{row.kv_bytes / 1e6:.2f}",
            ratio(row.kv_bytes, stock.kv_bytes),
            "yes" if row.kv_matches_analytic else "NO",
            format_percent(row.pruning_share("prefill")),
            *(["-", "-"] if row.syncs is None else [str(count) for count in row.syncs]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_pruning_table(rows: list[BenchmarkRow]) -> str:
    """Where ADSC's bookkeeping time goes: per profiler range, in the profiled prefill and decode step."""
    names = list(PROFILER_RANGES.values())
    header = ["batch", "model", "kind", "forward ms", *[f"{name} ms" for name in names], "all %", "extra over stock %"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        times = row.pruning_step
        if times is None:
            continue
        for kind in FORWARD_KINDS:
            cells = [
                str(row.batch_size),
                row.variant.label,
                kind,
                f"{1e3 * times.forward_seconds[kind]:.2f}",
                *[f"{1e3 * times.range_seconds[kind][name]:.3f}" for name in names],
                format_percent(row.pruning_share(kind)),
                format_percent(row.pruning_share(kind, extra_only=True)),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_average() -> float | None:
    """The 1-minute load average (processes running or waiting for a CPU), where the system reports one."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def describe_machine(device: torch.device, load_at_start: float | None) -> str:
    """One line on what ran the benchmark: device, threads, load, library versions."""
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        where = f"CPU {cpu_model_name()} x{os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"
    load = (
        ""
        if load_at_start is None
        else f", 1-min load average {load_at_start:.2f} at start, {load_average():.2f} at end"
    )
    return (
        f"{where}{load} | {platform.system()} {platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )


def busy_machine_warning(device: torch.device, load_at_start: float | None) -> str | None:
    """A warning when other processes used the CPU at the start of a multi-threaded CPU run, else None.

    With more than one torch thread, every parallel operator waits for its slowest thread; on a CPU that other
    processes also use, a thread is often descheduled, and small operators then take milliseconds instead of
    microseconds. Such timings say little about the models.
    """
    if device.type != "cpu" or torch.get_num_threads() == 1 or load_at_start is None or load_at_start < 0.5:
        return None
    return (
        f"WARNING: the load average was {load_at_start:.2f} when the run started ({os.cpu_count()} logical cores): "
        f"other processes competed for the CPU, which distorts timings with {torch.get_num_threads()} threads. "
        "Rerun on an idle machine, or with --threads 1."
    )


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one, else what `platform` says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def write_plot(rows: list[BenchmarkRow], path: Path, weight_bytes: int, vision_tower: bool) -> None:
    """A PNG per batch size: measured ratios to stock (prefill, decode, peak memory, KV) next to their ideals."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit(
            f"--plot needs matplotlib, which is not installed ({error}): `pip install matplotlib`."
        ) from error
    batch_sizes = sorted({row.batch_size for row in rows})
    figure, axes = plt.subplots(1, len(batch_sizes), figsize=(7 * len(batch_sizes), 4), squeeze=False)
    for axis, batch_size in zip(axes[0], batch_sizes, strict=True):
        batch_rows = [row for row in rows if row.batch_size == batch_size]
        stock = next(row for row in batch_rows if row.variant.budget is None)
        pruned = [row for row in batch_rows if row.variant.budget is not None]
        budgets = [row.variant.budget for row in pruned]
        series = {
            "prefill time": [row.prefill_seconds / stock.prefill_seconds for row in pruned],
            "prefill FLOPs (ideal)": [
                prefill_ideal_flops(row, vision_tower) / prefill_ideal_flops(stock, vision_tower) for row in pruned
            ],
            "decode time": [row.decode_seconds_per_token / stock.decode_seconds_per_token for row in pruned],
            "decode bytes moved (ideal)": [
                decode_moved_bytes(row.report, weight_bytes) / decode_moved_bytes(stock.report, weight_bytes)
                for row in pruned
            ],
            "peak memory": [row.peak_memory_bytes / stock.peak_memory_bytes for row in pruned],
            "KV cache": [row.kv_bytes / stock.kv_bytes for row in pruned],
        }
        for name, values in series.items():
            axis.plot(budgets, values, "--x" if "ideal" in name else "-o", label=name)
        axis.set(
            xlabel="budget (average vision tokens per layer)",
            ylabel="ratio to stock LLaVA",
            title=f"batch {batch_size}",
            ylim=(0, 1.1),
        )
        axis.invert_xaxis()
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
