"""Turn a stock llava-hf checkpoint folder into an ADSC-LLaVA checkpoint folder.

    adsc-llava convert SRC DST --budget 192
    adsc-llava convert SRC DST --drop-ratio 0.418 --pruning-layers 2 8 16 24

SRC is a local checkpoint folder of `LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration` or
`LlavaOnevisionForConditionalGeneration` (config.json, safetensors weights in the current `model.language_model.*` or
the older `language_model.model.*` key layout, processor files) or of its ADSC twin (to change the schedule). For
NeXT and OneVision, `--budget` refers to the config's reference image (`adsc_reference_tokens`). DST receives:

- config.json: the source config as an `AdscLlavaConfig` with the schedule, and an `auto_map` for remote code;
- the weights, unchanged and in the source dtype, as safetensors;
- the processor (tokenizer, image processor, chat template), when SRC has one;
- configuration_adsc_llava.py and modeling_adsc_llava.py, so that `trust_remote_code=True` loads it anywhere.

Every weight of the model must come from SRC: a missing, unexpected or wrongly shaped tensor stops the conversion
before anything is written.
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoProcessor

from adsc_llava import AdscLlavaConfig
from adsc_llava.cli import prog
from adsc_llava.families import family_of

SHIPPED_MODELING_FILES = ("configuration_adsc_llava.py", "modeling_adsc_llava.py")  # every family ships these
# Any of these in SRC means it has a processor (or at least a tokenizer) that DST should carry too.
PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer_config.json",
    "tokenizer.json",
    "chat_template.json",
    "chat_template.jinja",
)
MAX_KEYS_IN_ERROR = 10


class CorruptCheckpointError(ValueError):
    """The source weights do not fill the model exactly: missing, unexpected or wrongly shaped tensors."""


def read_source_config(src: Path):
    """The stock or ADSC config of the checkpoint folder `src`, of the family its `model_type` names."""
    config_file = src / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{src} has no config.json: expected a Hugging Face LLaVA checkpoint folder.")
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    try:
        family = family_of(model_type)
    except ValueError as error:
        raise ValueError(f"{src} holds a checkpoint of model_type '{model_type}': {error}") from None
    config_class = family.config_class if model_type == family.adsc_type else family.stock_config_class
    return config_class.from_pretrained(src)


def adsc_config_with_schedule(
    source, *, budget: float | None = None, drop_ratio: float | None = None, pruning_layers: list[int] | None = None
):
    """`source` (a stock or ADSC config of a supported family) as its family's ADSC config, with the schedule asked.

    An ADSC source keeps what it has unless told otherwise: with nothing asked, its whole schedule; with a budget or
    a drop ratio, its keep policy and (unless `pruning_layers` are given) its pruning layers. A stock source gets the
    schedule asked for, or none.
    """
    family = family_of(source.model_type)
    if source.model_type != family.adsc_type:
        return family.config_class.from_stock_config(
            source, pruning_layers=pruning_layers, drop_ratio=drop_ratio, budget=budget
        )
    source = family.config_class.from_dict(source.to_dict())  # the installed class, also for a remote-code config
    if budget is None and drop_ratio is None and pruning_layers is None:
        return source
    return family.config_class.from_stock_config(
        source,
        pruning_layers=pruning_layers if pruning_layers is not None else source.adsc_pruning_layers or None,
        drop_ratio=drop_ratio,
        budget=budget,
        keep_policy=source.adsc_keep_policy,
    )


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse to write into SRC itself, into a file, or into a non-empty folder unless `overwrite`."""
    if dst.resolve() == src.resolve():
        raise ValueError(f"DST must differ from SRC ({src}): the converted checkpoint is written to a new folder.")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"DST {dst} exists and is not a folder.")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"DST {dst} is not empty; pass --overwrite (overwrite=True) to write into it anyway.")


def loading_problems(loading_info: dict) -> list[str]:
    """Human-readable list of what did not load cleanly, from `from_pretrained(..., output_loading_info=True)`."""

    def listed(keys) -> str:
        keys = sorted(str(key) for key in keys)
        more = f" and {len(keys) - MAX_KEYS_IN_ERROR} more" if len(keys) > MAX_KEYS_IN_ERROR else ""
        return ", ".join(keys[:MAX_KEYS_IN_ERROR]) + more

    problems = []
    if loading_info.get("missing_keys"):
        problems.append(f"missing tensors (the model needs them): {listed(loading_info['missing_keys'])}")
    if loading_info.get("unexpected_keys"):
        problems.append(f"unexpected tensors (no place in the model): {listed(loading_info['unexpected_keys'])}")
    if loading_info.get("mismatched_keys"):
        mismatches = [
            f"{key} (checkpoint {tuple(checkpoint_shape)}, model {tuple(model_shape)})"
            for key, checkpoint_shape, model_shape in loading_info["mismatched_keys"]
        ]
        problems.append(f"tensors of the wrong shape: {listed(mismatches)}")
    if loading_info.get("error_msgs"):
        problems.append(f"loading errors: {listed(loading_info['error_msgs'])}")
    return problems


def load_source_weights(src: str | Path, config, dtype: torch.dtype | str = "auto", **from_pretrained_kwargs):
    """The source weights in the family's ADSC class (`"auto"`: their own dtype); a `CorruptCheckpointError` unless
    all fit. `from_pretrained_kwargs` (e.g. `attn_implementation`) go to `from_pretrained`.

    Both llava-hf key layouts load: the modeling files register their family's checkpoint conversion mapping.
    """
    # Mismatched shapes are collected (not raised one by one) so that the error lists every problem at once.
    model, loading_info = family_of(config.model_type).model_class.from_pretrained(
        src,
        config=config,
        dtype=dtype,
        ignore_mismatched_sizes=True,
        output_loading_info=True,
        **from_pretrained_kwargs,
    )
    problems = loading_problems(loading_info)
    if problems:
        raise CorruptCheckpointError(
            f"Corrupt checkpoint {src}: its weights do not match the LLaVA architecture of its config.json: "
            + "; ".join(problems)
            + ". Nothing was written. Re-download the checkpoint or check that config.json belongs to these weights."
        )
    return model


def copy_processor(src: Path, dst: Path) -> bool:
    """Save SRC's processor (tokenizer, image processor, chat template) into DST; False if SRC has none."""
    if not any((src / name).is_file() for name in PROCESSOR_FILES):
        return False
    AutoProcessor.from_pretrained(src, trust_remote_code=True).save_pretrained(dst)
    return True


def format_schedule(config: AdscLlavaConfig) -> str:
    """The schedule as printed after a conversion: layers, r, vision tokens per layer and their average (budget)."""
    tokens_per_layer = config.vision_tokens_per_layer()
    return "\n".join(
        [
            f"pruning layers: {config.adsc_pruning_layers or 'none'}",
            f"drop ratio r: {config.adsc_drop_ratio:g}",
            f"vision tokens per image seen by each of the {len(tokens_per_layer)} LLM layers: {tokens_per_layer}",
            f"average vision tokens per layer (budget): {config.average_vision_tokens():.2f} "
            f"of {config.reference_vision_tokens}",
        ]
    )


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    budget: float | None = None,
    drop_ratio: float | None = None,
    pruning_layers: list[int] | None = None,
    overwrite: bool = False,
) -> AdscLlavaConfig:
    """Write an ADSC-LLaVA checkpoint of the LLaVA checkpoint folder `src` into `dst`.

    Args:
        src: a local llava-hf (or ADSC-LLaVA) checkpoint folder.
        dst: the output folder; must be empty or absent unless `overwrite`.
        budget: target average vision tokens per LLM layer (e.g. 192 of 576); `r` is solved for `pruning_layers`.
        drop_ratio: the drop ratio `r` instead of a budget. Neither means no pruning (a stock SRC) or SRC's own
            schedule (an ADSC SRC, which also keeps its keep policy and, unless given others, its pruning layers).
        pruning_layers: the pruning layers; default SRC's (ADSC), else the paper's `[2, 8, 16, 24]` scaled to the
            depth.
        overwrite: write into a non-empty `dst`.

    Returns:
        The config saved in `dst`.

    Raises:
        CorruptCheckpointError: if the weights do not fill the model exactly (nothing is written then).
        ValueError: for a bad schedule (e.g. an unreachable budget) or a source that is not LLaVA.
        FileExistsError: if `dst` is not empty and not `overwrite`.
    """
    src, dst = Path(src), Path(dst)
    check_destination(src, dst, overwrite)
    source = read_source_config(src)
    config = adsc_config_with_schedule(source, budget=budget, drop_ratio=drop_ratio, pruning_layers=pruning_layers)
    model = load_source_weights(src, config)
    model.save_pretrained(dst)  # safetensors, config.json with auto_map, and both modeling files
    missing_code = [name for name in SHIPPED_MODELING_FILES if not (dst / name).is_file()]
    if missing_code:
        raise RuntimeError(f"save_pretrained did not write {missing_code} into {dst}: remote code would not load.")
    if not copy_processor(src, dst):
        print(f"note: {src} has no processor files; copy the tokenizer and image processor into {dst} yourself.")
    return model.config


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog=prog("convert"),
        description="Turn a stock llava-hf checkpoint folder into an ADSC-LLaVA checkpoint folder.",
        epilog="examples:\n  adsc-llava convert llava-1.5-7b-hf/ llava-1.5-7b-adsc-192/ --budget 192\n"
        "  adsc-llava convert llava-1.5-7b-hf/ out/ --drop-ratio 0.418 --pruning-layers 2 8 16 24",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", type=Path, help="llava-hf checkpoint folder (config.json, safetensors, processor)")
    parser.add_argument("dst", type=Path, help="output folder (empty or absent unless --overwrite)")
    schedule = parser.add_mutually_exclusive_group()
    schedule.add_argument(
        "--budget", type=float, help="average vision tokens per LLM layer to reach, e.g. 192 (of 576); solves r"
    )
    schedule.add_argument("--drop-ratio", type=float, help="drop ratio r in [0, 1) at each pruning layer")
    parser.add_argument(
        "--pruning-layers",
        type=int,
        nargs="+",
        help="0-based LLM layers that drop vision tokens (default: 2 8 16 24 scaled to the model's depth)",
    )
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty DST")
    args = parser.parse_args(argv)
    if args.pruning_layers is not None and args.budget is None and args.drop_ratio is None:
        parser.error("--pruning-layers needs --budget or --drop-ratio (otherwise nothing is pruned).")
    return parser, args


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    try:
        config = convert_checkpoint(
            args.src,
            args.dst,
            budget=args.budget,
            drop_ratio=args.drop_ratio,
            pruning_layers=args.pruning_layers,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        parser.error(str(error))
    print(f"Wrote the ADSC-LLaVA checkpoint {args.dst} from {args.src}.")
    print(format_schedule(config))
    return 0


if __name__ == "__main__":
    main()
