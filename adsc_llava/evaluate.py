"""adsc-llava eval: one checkpoint through lmms-eval at several budgets and keep policies; a table and a plot.

Each (method, budget) is one `lmms-eval --model adsc_llava` run (the plugin re-solves the schedule at load time, so
nothing is converted or saved); the scores come from each run's results file, never from its exit status, which is
0 even when an evaluation fails. lmms-eval lives in its own environment (`bash eval/lmms_eval_env.sh`); this module
only starts it.

```bash
adsc-llava eval llava-1.5-7b-adsc-192/ --tasks mme gqa --budgets 192 128 64 --methods uniform fastv pyramiddrop \\
    --device cuda:0 --batch-size 8 --output-dir runs/eval --plot runs/eval/scores.png
```
"""

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from adsc_llava.cli import prog
from adsc_llava.configuration_adsc_llava import (
    KEEP_POLICIES,
    policy_pruning_layers,
    reachable_budget_range,
)
from adsc_llava.families import family_of

DEFAULT_LMMS_EVAL = Path(__file__).resolve().parents[1] / ".venv-lmms-eval" / "bin" / "lmms-eval"
METHOD_NAMES = {"uniform": "ADSC", "fastv": "FastV", "pyramiddrop": "PyramidDrop"}


@dataclass
class EvalRun:
    """One lmms-eval run: a method at a budget (None: the checkpoint's own schedule) and its scores."""

    method: str | None
    budget: float | None
    layers: list[int] | None
    scores: dict[str, float]

    @property
    def label(self) -> str:
        return "checkpoint" if self.method is None else METHOD_NAMES[self.method]


def planned_runs(checkpoint: Path, budgets: list[float], methods: list[str]) -> tuple[list[EvalRun], list[str]]:
    """The checkpoint as it is, then every method at every budget its layers reach; and notes on what is left out.

    ADSC ("uniform") keeps the checkpoint's pruning layers (or the paper's, scaled, if it has none); the baselines
    use their own (`POLICY_LAYERS_OF_32`, scaled to the depth).
    """
    model_type = json.loads((checkpoint / "config.json").read_text()).get("model_type")
    family = family_of(model_type)
    if model_type != family.adsc_type:
        raise ValueError(f"{checkpoint} is a stock {family.name} checkpoint: `adsc-llava convert` it first.")
    config = family.config_class.from_pretrained(checkpoint)
    num_layers, reference = config.text_config.num_hidden_layers, config.reference_vision_tokens
    runs, notes = [EvalRun(None, None, None, {})], []
    for method in methods:
        layers = policy_pruning_layers(method, num_layers)
        if method == "uniform":
            layers = config.adsc_pruning_layers or layers
        lowest, highest = reachable_budget_range(num_layers, layers, reference)
        for budget in budgets:
            if lowest <= budget < highest:
                runs.append(EvalRun(method, budget, layers, {}))
            else:
                notes.append(f"{METHOD_NAMES[method]} {budget:g}: its layers {layers} reach [{lowest:g}, {highest:g})")
    return runs, notes


def resolve_schedule(config, budget: float | None, method: str | None, layers: str | int | None) -> dict:
    """The schedule keys for `config.update`: the checkpoint's, with the policy, layers and budget asked for.

    A budget for another policy than the checkpoint's, without `layers`, goes to that policy's own layers
    (`policy_pruning_layers`: FastV's K = 2 of 32, PyramidDrop's 8, 16, 24), not to the checkpoint's.
    """
    if layers is not None and budget is None:
        raise ValueError(f"layers={layers!r} needs a budget: the drop ratio is solved for the budget on those layers.")
    switched = method is not None and method != config.adsc_keep_policy
    # from_dict validates the policy's name; with_budget keeps it.
    config = type(config).from_dict({**config.to_dict(), **({"adsc_keep_policy": method} if method else {})})
    if budget is not None:
        pruning_layers = [int(layer) for layer in str(layers).split("/")] if layers is not None else None
        if pruning_layers is None and switched:
            pruning_layers = policy_pruning_layers(method, config.text_config.num_hidden_layers)
        config = config.with_budget(float(budget), pruning_layers)
    return config.schedule


# model_args that `adsc-llava eval` sets itself for each run.
OWN_MODEL_ARGS = ("pretrained", "budget", "method", "layers")


def model_args(checkpoint: Path, run: EvalRun, extra: str | None = None) -> str:
    """lmms-eval's `--model_args` for `run`, then `extra` (e.g. "attn_implementation=sdpa,max_new_tokens=128")."""
    args = [f"pretrained={checkpoint}"]
    if run.method is not None:
        layers = "/".join(str(layer) for layer in run.layers)  # lmms-eval splits its arguments at commas
        args += [f"budget={run.budget:g}", f"method={run.method}", f"layers={layers}"]
    return ",".join(args + ([extra] if extra else []))


def task_names(results_file: dict, task: str) -> list[str]:
    """`task` and, for a group (e.g. `textvqa`), its subtasks, depth first (`group_subtasks` of lmms-eval)."""
    names = [task]
    for subtask in results_file.get("group_subtasks", {}).get(task, []):
        names += task_names(results_file, subtask)
    return names


def read_scores(output_dir: Path, tasks: list[str], since: float = 0.0) -> dict[str, float]:
    """`{"task metric": value}` from the one results file lmms-eval wrote under `output_dir` at or after `since`
    (a time stamp; older files are earlier runs into the same folder). A group task gives its own scores, if it
    aggregates any, and every subtask's."""
    results_files = [path for path in output_dir.glob("**/*_results.json") if path.stat().st_mtime >= since]
    if len(results_files) != 1:
        raise RuntimeError(
            f"expected one new lmms-eval results file under {output_dir}, found {len(results_files)}: "
            f"{sorted(str(path) for path in results_files)}"
        )
    results_file = json.loads(results_files[0].read_text())
    results, scores = results_file["results"], {}
    for task in tasks:
        names = [name for name in task_names(results_file, task) if name in results]
        if not names:
            raise RuntimeError(f"lmms-eval's results in {results_files[0]} have no task {task!r}")
        for name in names:
            for key, value in results[name].items():
                metric, _, _ = key.partition(",")
                if isinstance(value, int | float) and "_stderr" not in metric and key != "alias":
                    scores[f"{name} {metric}"] = float(value)
    return scores


def run_lmms_eval(lmms_eval: str, checkpoint: Path, run: EvalRun, args: argparse.Namespace, output_dir: Path) -> None:
    arguments = model_args(checkpoint, run, args.model_args)
    command = [
        lmms_eval, "--model", "adsc_llava", "--model_args", arguments,
        "--tasks", ",".join(args.tasks), "--batch_size", str(args.batch_size), "--device", args.device,
        "--output_path", str(output_dir), "--verbosity", "DEBUG",  # DEBUG: a failed evaluation raises
    ]  # fmt: skip
    if args.include_path is not None:
        command += ["--include_path", str(args.include_path)]
    if args.limit is not None:
        command += ["--limit", str(args.limit)]
    if args.log_samples:
        command += ["--log_samples"]
    log = output_dir / "lmms-eval.log"
    output_dir.mkdir(parents=True, exist_ok=True)
    # File times can be coarser than time.time(): a run into a used folder takes files from its start on.
    started = time.time() - 1
    with log.open("w") as stream:
        status = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT).returncode
    if status != 0:
        raise RuntimeError(f"lmms-eval failed (exit status {status}) for {arguments}; see {log}")
    run.scores = read_scores(output_dir, args.tasks, since=started)


def format_table(runs: list[EvalRun]) -> str:
    metrics = list(runs[0].scores)
    lines = [
        "| method | budget | pruning layers | " + " | ".join(metrics) + " |",
        "|---|---|---|" + "---|" * len(metrics),
    ]
    for run in runs:
        budget = "checkpoint" if run.budget is None else f"{run.budget:g}"
        layers = "checkpoint" if run.layers is None else str(run.layers)
        scores = " | ".join(f"{run.scores.get(metric, math.nan):.4f}" for metric in metrics)
        lines.append(f"| {run.label} | {budget} | {layers} | {scores} |")
    return "\n".join(lines)


def write_plot(runs: list[EvalRun], path: Path) -> None:
    """Score against budget, one line per method and one panel per metric; the checkpoint as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(runs[0].scores)
    figure, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
    for axis, metric in zip(axes[0], metrics, strict=True):
        for method in dict.fromkeys(run.method for run in runs[1:]):
            points = sorted((run.budget, run.scores[metric]) for run in runs if run.method == method)
            axis.plot(*zip(*points, strict=True), marker="o", label=METHOD_NAMES[method])
        axis.axhline(runs[0].scores[metric], color="gray", linestyle="--", label="checkpoint's schedule")
        axis.set(xlabel="budget (mean vision tokens per LLM layer)", ylabel=metric)
        axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog("eval"),
        description="lmms-eval scores of one ADSC checkpoint at several budgets and keep policies (training-free).",
        epilog=__doc__.split("```bash\n")[1].split("```")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", type=Path, help="An ADSC checkpoint folder (any family).")
    parser.add_argument("--tasks", nargs="+", required=True, help="lmms-eval task names.")
    parser.add_argument("--budgets", type=float, nargs="+", default=[], help="Mean vision tokens per LLM layer.")
    parser.add_argument("--methods", nargs="+", choices=KEEP_POLICIES, default=["uniform"], help="Keep policies.")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/eval"), help="One folder per run.")
    parser.add_argument("--plot", type=Path, default=None, help="Write a PNG of score vs budget (needs matplotlib).")
    parser.add_argument("--device", default="cuda", help="cpu, cuda or cuda:N (lmms-eval's --device).")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--limit", type=float, default=None, help="lmms-eval's --limit: samples per task.")
    parser.add_argument("--include-path", type=Path, default=None, help="lmms-eval's --include_path (own tasks).")
    parser.add_argument(
        "--model-args",
        default=None,
        help="More model_args for every run, comma-separated (attn_implementation=flash_attention_2, "
        "max_new_tokens=128, system_prompt=..., device_map=auto).",
    )
    parser.add_argument(
        "--log-samples", action="store_true", help="lmms-eval's --log_samples: every answer, per task."
    )
    parser.add_argument(
        "--lmms-eval",
        default=None,
        help=f"The lmms-eval executable. Default: {DEFAULT_LMMS_EVAL.relative_to(DEFAULT_LMMS_EVAL.parents[2])} "
        "if it exists (bash eval/lmms_eval_env.sh builds it), else lmms-eval on PATH.",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    lmms_eval = args.lmms_eval or (str(DEFAULT_LMMS_EVAL) if DEFAULT_LMMS_EVAL.exists() else shutil.which("lmms-eval"))
    if lmms_eval is None:
        parser.error("lmms-eval was not found: build its environment with `bash eval/lmms_eval_env.sh`.")
    if not (args.checkpoint / "config.json").is_file():
        parser.error(f"{args.checkpoint} has no config.json: give an ADSC checkpoint folder.")
    own = [arg.split("=")[0] for arg in (args.model_args or "").split(",") if arg.split("=")[0] in OWN_MODEL_ARGS]
    if own:
        parser.error(f"--model-args cannot set {own}: give the checkpoint, --budgets and --methods instead.")
    try:
        runs, notes = planned_runs(args.checkpoint.resolve(), args.budgets, args.methods)
    except ValueError as error:
        parser.error(str(error))
    for index, run in enumerate(runs, start=1):
        name = "checkpoint" if run.method is None else f"{run.method}-{run.budget:g}"
        print(f"[{index}/{len(runs)}] {name}", file=sys.stderr, flush=True)
        run_lmms_eval(lmms_eval, args.checkpoint.resolve(), run, args, args.output_dir.resolve() / name)
    print(format_table(runs))
    for note in notes:
        print(f"left out: {note}")
    if args.plot is not None:
        write_plot(runs, args.plot)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
