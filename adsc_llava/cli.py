"""The `adsc-llava` command (also `python -m adsc_llava`): one subcommand per job.

Each subcommand is the `main(argv)` of one module, imported only when it runs, so `adsc-llava --help` and the
analytic `cost` start without loading torch models.
"""

import argparse
import importlib
import sys

# name -> (module whose `main(argv)` runs it, one line of help)
SUBCOMMANDS = {
    "convert": ("adsc_llava.convert", "turn a llava-hf checkpoint folder into an ADSC-LLaVA one (training-free)"),
    "cost": ("adsc_llava.cost_table", "analytic FLOPs and KV cache per budget (the paper's Table IV), --plot"),
    "bench": ("adsc_llava.benchmarks.speed", "measured prefill / decode speed and memory, stock vs ADSC, one run"),
    "train": ("adsc_llava.train.cli", "LoRA fine-tuning with the reverse budget curriculum"),
    "demo": ("adsc_llava.shapes_demo.run", "the paper's experiment in miniature, on CPU, nothing downloaded"),
    "serve": ("adsc_llava.serve", "transformers' OpenAI-compatible server for an ADSC checkpoint"),
    "eval": ("adsc_llava.evaluate", "lmms-eval scores at several budgets and keep policies: a table and a plot"),
}

EXAMPLES = """examples:
  adsc-llava convert llava-1.5-7b-hf/ llava-1.5-7b-adsc-192/ --budget 192
  adsc-llava cost --config llava-1.5-7b --budgets 192 128 64 --plot cost.png
  adsc-llava bench --threads 1
  adsc-llava train --model llava-1.5-7b-adsc-192/ --data mix665k.json --budget 192 --output-dir out/
  adsc-llava demo --quick
  adsc-llava serve llava-1.5-7b-adsc-192/ --port 8000
  adsc-llava eval llava-1.5-7b-adsc-192/ --tasks mme --budgets 192 64 --methods uniform fastv --plot scores.png

`adsc-llava COMMAND --help` shows each command's options."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adsc-llava",
        description="ADSC-LLaVA: LLaVA models that drop vision tokens inside their language model.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in SUBCOMMANDS.items():
        # Each command parses its own options: these subparsers only name it.
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv)  # prints help or the usage error and exits
    module_name, _ = SUBCOMMANDS[argv[0]]
    result = importlib.import_module(module_name).main(argv[1:])
    return result if isinstance(result, int) else 0


def prog(command: str) -> str:
    """The program name a subcommand's own parser shows in its usage line."""
    return f"adsc-llava {command}"
