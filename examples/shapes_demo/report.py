"""The demo's tables over seeds (Table I per question category, Table III), which differences exceed the spread, and
the plot: accuracy vs vision tokens, one panel per category (the paper's Figure 2 in miniature)."""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from adsc_llava.shapes_demo.evaluate import CATEGORIES, Result

ALL = "all"  # every question, whatever its category
# Table I's methods at each budget, in table order, with their plot markers; the training-free ones dotted.
METHOD_MARKERS = {"ADSC, training-free": "s", "FastV": "v", "PyramidDrop": "^", "ADSC + LoRA (reverse)": "o"}


@dataclass(frozen=True)
class Spread:
    """An accuracy over seeds: its mean and its range."""

    mean: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        return cls(sum(values) / len(values), min(values), max(values))

    def above(self, other: "Spread") -> bool:
        """Whether every seed of this one scored above every seed of `other` (the ranges do not overlap)."""
        return self.low > other.high

    def __str__(self) -> str:
        if self.low == self.high:
            return f"{100 * self.mean:.1f}"
        return f"{100 * self.mean:.1f} ({100 * self.low:.1f}-{100 * self.high:.1f})"


@dataclass
class Row:
    """One row of a table over seeds: the same method, budget and schedule on every seed."""

    method: str
    budget: float | None
    curriculum: str | None
    vision_tokens: float
    flops_ratio: float
    kv_ratio: float
    pruning_layers: list[int]
    seeds: list[int]
    accuracy: dict[str, Spread]  # ALL and each category


def aggregate(runs: Sequence[Sequence[Result]]) -> list[Row]:
    """Rows over seeds from one table per seed, whose rows are the same methods in the same order."""
    rows = []
    for same in zip(*runs, strict=True):
        first = same[0]
        if any((r.method, r.budget, r.curriculum) != (first.method, first.budget, first.curriculum) for r in same):
            raise ValueError(f"Rows of different methods in one position: {[(r.method, r.budget) for r in same]}.")
        accuracy = {ALL: Spread.of([r.accuracy for r in same])}
        for category in first.accuracy_by_category:
            accuracy[category] = Spread.of([r.accuracy_by_category[category] for r in same])
        rows.append(
            Row(
                method=first.method,
                budget=first.budget,
                curriculum=first.curriculum,
                vision_tokens=first.vision_tokens,
                flops_ratio=first.flops_ratio,
                kv_ratio=first.kv_ratio,
                pruning_layers=first.pruning_layers,
                seeds=[r.seed for r in same],
                accuracy=accuracy,
            )
        )
    return rows


def _columns(rows: Sequence[Row]) -> list[str]:
    return [ALL, *(category for category in CATEGORIES if category in rows[0].accuracy)]


def ranking(rows: Sequence[Row], column: str) -> str:
    """The methods by mean accuracy, `>` between neighbours whose ranges do not overlap, `~` where they do."""
    ordered = sorted(rows, key=lambda row: -row.accuracy[column].mean)
    text = f"{ordered[0].method} {100 * ordered[0].accuracy[column].mean:.1f}"
    for better, worse in zip(ordered, ordered[1:], strict=False):
        sign = ">" if better.accuracy[column].above(worse.accuracy[column]) else "~"
        text += f" {sign} {worse.method} {100 * worse.accuracy[column].mean:.1f}"
    return text


def markdown_tables(table_one: list[Row], table_three: list[Row], num_questions: int) -> str:
    """Table I (accuracy per category, cost ratios), the rankings per budget and category, and Table III."""
    full = table_one[0]
    columns = _columns(table_one)
    seeds = ", ".join(map(str, full.seeds))
    lines = [
        f"Table I in miniature: accuracy (%) on held-out questions ({num_questions} per seed), mean (min-max) over "
        f"seeds {seeds}",
        "",
        "| method | pruning layers | avg vision tokens/layer | "
        + " | ".join(columns)
        + " | vs full | FLOPs | KV cache |",
        "|---|---|---|" + "---|" * len(columns) + "---|---|---|",
    ]
    for row in table_one:
        lines.append(
            f"| {row.method} | {', '.join(map(str, row.pruning_layers)) or '-'} | {row.vision_tokens:.1f} | "
            + " | ".join(str(row.accuracy[column]) for column in columns)
            + f" | {row.accuracy[ALL].mean / max(full.accuracy[ALL].mean, 1e-9):.1%} | {row.flops_ratio:.1%} | "
            f"{row.kv_ratio:.1%} |"
        )
    lines += [
        "",
        "Which differences exceed the spread, per budget and question category: methods by mean accuracy (%); `>`: "
        "every seed of the left method scored above every seed of the right one (their ranges do not overlap), "
        "`~`: the ranges overlap",
        "",
    ]
    for budget in dict.fromkeys(row.budget for row in table_one[1:]):
        rows = [row for row in table_one[1:] if row.budget == budget]
        lines.append(f"- {rows[0].vision_tokens:.0f} tokens:")
        lines += [f"  - {column}: {ranking(rows, column)}" for column in columns]
    lines += [
        "",
        f"Table III in miniature: curricula at budget {table_three[0].budget:g}, same steps, mean (min-max) over "
        f"seeds {seeds}",
        "",
        "| curriculum | " + " | ".join(columns) + " | vs full |",
        "|---|" + "---|" * len(columns) + "---|",
    ]
    for row in table_three:
        lines.append(
            f"| {row.curriculum} | "
            + " | ".join(str(row.accuracy[column]) for column in columns)
            + f" | {row.accuracy[ALL].mean / max(full.accuracy[ALL].mean, 1e-9):.1%} |"
        )
    return "\n".join(lines) + "\n"


def plot(table_one: list[Row], path: Path) -> Path | None:
    """Accuracy vs average vision tokens per method, one panel per category (and one for all questions); the bars
    and the band around the full model span the seeds' min-max."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'): no plot written", flush=True)
        return None
    full, columns = table_one[0], _columns(table_one)
    figure, panels = plt.subplots(1, len(columns), figsize=(3.4 * len(columns), 4.0), sharey=True)
    for axes, column in zip(panels, columns, strict=True):
        spread = full.accuracy[column]
        axes.axhline(spread.mean, linestyle="--", color="gray", label=f"full model ({full.vision_tokens:.0f} tokens)")
        axes.axhspan(spread.low, spread.high, color="gray", alpha=0.15)
        for index, (method, marker) in enumerate(METHOD_MARKERS.items()):
            rows = [row for row in table_one if row.method == method]
            nudge = (index - (len(METHOD_MARKERS) - 1) / 2) * 0.6  # methods at one budget side by side, not stacked
            means = [row.accuracy[column].mean for row in rows]
            errors = [
                [mean - row.accuracy[column].low for mean, row in zip(means, rows, strict=True)],
                [row.accuracy[column].high - mean for mean, row in zip(means, rows, strict=True)],
            ]
            axes.errorbar(
                [row.vision_tokens + nudge for row in rows],
                means,
                yerr=errors,
                fmt=("-" if method.startswith("ADSC") else ":") + marker,
                capsize=3,
                label=method,
            )
        axes.set_title(column if column != ALL else "all questions")
        axes.set_xlabel("avg vision tokens per LLM layer")
        axes.set_ylim(0, 1)
    panels[0].set_ylabel("test accuracy")
    figure.legend(*panels[0].get_legend_handles_labels(), loc="lower center", ncol=len(METHOD_MARKERS) + 1)
    seeds = ", ".join(map(str, full.seeds))
    figure.suptitle(f"ADSC in miniature: accuracy vs vision-token budget (mean and min-max over seeds {seeds})")
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
