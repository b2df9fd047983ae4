"""The demo's Table I / Table III in Markdown and its accuracy-vs-tokens plot (the paper's Figure 2 in miniature)."""

from pathlib import Path

from adsc_llava.shapes_demo.evaluate import Result

# Table I's methods in the plot, the baselines (training-free heuristics) dotted.
METHOD_MARKERS = {"FastV": "v", "PyramidDrop": "^", "ADSC, training-free": "s", "ADSC + LoRA (reverse)": "o"}


def markdown_tables(table_one: list[Result], table_three: list[Result]) -> str:
    full_accuracy = table_one[0].accuracy
    kinds = list(table_one[0].accuracy_by_type)
    lines = [
        "Table I in miniature: accuracy on the held-out test split",
        "",
        "| method | pruning layers | budget (avg vision tokens/layer) | accuracy | vs full | "
        + "".join(f"{kind} | " for kind in kinds)
        + "FLOPs | KV cache |",
        "|---|---|---|---|---|" + "---|" * len(kinds) + "---|---|",
    ]
    for row in table_one:
        lines.append(
            f"| {row.method} | {', '.join(map(str, row.pruning_layers)) or '-'} | {row.vision_tokens:.1f} | "
            f"{row.accuracy:.1%} | "
            f"{row.accuracy / max(full_accuracy, 1e-9):.1%} | "
            + "".join(f"{row.accuracy_by_type[kind]:.1%} | " for kind in kinds)
            + f"{row.flops_ratio:.1%} | {row.kv_ratio:.1%} |"
        )
    lines += [
        "",
        f"Table III in miniature: curricula at budget {table_three[0].budget:g}, same steps",
        "",
        "| curriculum | accuracy | vs full |",
        "|---|---|---|",
    ]
    for row in table_three:
        lines.append(f"| {row.curriculum} | {row.accuracy:.1%} | {row.accuracy / max(full_accuracy, 1e-9):.1%} |")
    return "\n".join(lines) + "\n"


def plot(table_one: list[Result], path: Path) -> Path | None:
    """Accuracy vs average vision tokens per method, like the paper's Figure 2."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'): no plot written", flush=True)
        return None
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.axhline(table_one[0].accuracy, linestyle="--", color="gray", label="full model (144 tokens)")
    for method, marker in METHOD_MARKERS.items():
        rows = [row for row in table_one if row.method == method]
        style = "-" if method.startswith("ADSC") else ":"
        axes.plot([r.vision_tokens for r in rows], [r.accuracy for r in rows], style, marker=marker, label=method)
    axes.set_xlabel("average vision tokens per LLM layer")
    axes.set_ylabel("test accuracy")
    axes.set_ylim(0, 1)
    axes.legend()
    axes.set_title("ADSC in miniature: accuracy vs vision-token budget")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
