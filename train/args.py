"""Options of `adsc-llava train`: `TrainingArguments` plus ADSC's own, with LLaVA's LoRA recipe as defaults.

`AdscTrainConfig` subclasses `TrainingArguments` (as TRL's `SFTConfig` does): every Trainer option (`--ddp-timeout`,
`--max-grad-norm`, `--run-name`, `--report-to tensorboard wandb`, `--optim`, `--eval-steps`, ...) is accepted as it
is, and only the defaults that LLaVA-1.5's LoRA recipe or the paper (III-C) set differently are overridden here.
"""

import importlib.util
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
from transformers import TrainingArguments

from adsc_llava.train.curriculum import CURRICULUM_FACTORS

# `--deepspeed zero2` / `zero3`: the configs shipped in this package, wherever it is installed.
DEEPSPEED_CONFIGS = {name: Path(__file__).resolve().parent / f"{name}.json" for name in ("zero2", "zero3")}


def default_attn_implementation() -> str:
    """flash_attention_2 where flash-attn is installed and a CUDA device is present, else sdpa."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


@dataclass(kw_only=True)
class AdscTrainConfig(TrainingArguments):
    """Everything `adsc-llava train` takes: ADSC's options, then `TrainingArguments`' (see docs/training.md)."""

    # Model and data ---------------------------------------------------------------------------------------------
    model: str = field(metadata={"help": "A llava-hf or ADSC checkpoint folder (or hub id) to start from."})
    data: str = field(metadata={"help": "LLaVA-InstructionMix-665K style JSON (or JSON lines) file."})
    output_dir: str = field(metadata={"help": "Where checkpoints, the data scan and the final model go."})
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder the records' `image` paths are relative to (default: the JSON's)."}
    )
    eval_data: str | None = field(
        default=None,
        metadata={"help": "A held-out file in --data's format: its loss is evaluated every --eval-steps (default: "
                  "--save-steps) steps."},
    )  # fmt: skip
    max_length: int = field(default=2048, metadata={"help": "Longest sample in tokens, image tokens included."})
    truncate_long_samples: bool = field(
        default=True,
        metadata={"help": "Cut longer samples to --max-length as LLaVA does (never inside an image, never dropping "
                  "every answer); false: such records are bad records."},
    )  # fmt: skip
    on_bad_record: Literal["error", "skip"] = field(
        default="error", metadata={"help": "A bad record (missing image, no conversations...): raise, or count+skip."}
    )
    scan_data: bool = field(
        default=True,
        metadata={"help": "Check every record (files, lengths) before training, not hours in: once, shared by the "
                  "processes, kept in OUTPUT_DIR/data-scan.json for reruns and --resume."},
    )  # fmt: skip
    assistant_only_loss: bool = field(
        default=True,
        metadata={"help": "Loss on assistant answers only (LLaVA). False: on every text token, prompts too."},
    )
    group_by_modality_length: bool | None = field(
        default=None,
        metadata={"help": "LLaVA's sampler: each step's batches all image or all text-only records, of similar "
                  "lengths. Default: on when the data mixes both kinds (LLaVA's recipe), off otherwise."},
    )  # fmt: skip
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "eager, sdpa or flash_attention_2; default: flash_attention_2 where flash-attn and a CUDA "
                  "device are there, else sdpa."},
    )  # fmt: skip

    # Compression schedule ---------------------------------------------------------------------------------------
    budget: float | None = field(
        default=None,
        metadata={"help": "Target average vision tokens per LLM layer (e.g. 192 of 576). None: the checkpoint's "
                  "own schedule (an ADSC checkpoint's), or none (a stock one)."},
    )  # fmt: skip
    pruning_layers: list[int] | None = field(
        default=None,
        metadata={"help": "Pruning layers; default: the checkpoint's, else the paper's [2, 8, 16, 24] scaled to the "
                  "depth."},
    )  # fmt: skip
    curriculum: Literal["reverse", "standard", "direct"] = field(
        default="reverse", metadata={"help": "reverse: 0.8x,0.9x,1.0x of the budget; standard: 1.2x,1.1x,1.0x."}
    )
    curriculum_factors: list[float] | None = field(
        default=None, metadata={"help": "Custom budget factors per phase (overrides --curriculum)."}
    )
    phase_fractions: list[float] | None = field(
        default=None, metadata={"help": "Share of the steps per phase (default: equal); sums to 1."}
    )

    # What is trained --------------------------------------------------------------------------------------------
    tune: Literal["lora", "full"] = field(
        default="lora",
        metadata={"help": "lora: LoRA on the LLM + projector (the paper); full: every parameter (e.g. from scratch)."},
    )
    lora_r: int = field(default=128, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=256, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Linear layers of the LANGUAGE model that get LoRA (the vision tower never does)."},
    )
    projector_learning_rate: float = field(default=2e-5, metadata={"help": "Learning rate of the projector."})

    # Resume and output ------------------------------------------------------------------------------------------
    resume: bool = field(default=False, metadata={"help": "Continue from the last complete checkpoint."})
    save_adapter: bool = field(
        default=False, metadata={"help": "Keep the LoRA adapter (+ projector) instead of merging it."}
    )
    base_model_id: str | None = field(
        default=None,
        metadata={"help": "Hub id of --model for the model card's base_model (e.g. llava-hf/llava-1.5-7b-hf)."},
    )

    # TrainingArguments whose defaults are LLaVA-1.5's LoRA recipe or this project's ------------------------------
    learning_rate: float = field(default=2e-4, metadata={"help": "Learning rate of LoRA (or of everything, full)."})
    warmup_ratio: float = field(
        default=0.03, metadata={"help": "Share of the steps of linear warm-up (LLaVA's); --warmup-steps N overrides."}
    )
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs (ignored if --max-steps > 0)."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Batch size per device."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision; default: where supported."})
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Recompute activations in backward (default: on; --gradient-checkpointing is its alias)."},
    )
    dataloader_num_workers: int = field(default=4, metadata={"help": "Data loading (and data scan) processes."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    logging_steps: float = field(default=10, metadata={"help": "Log the loss (and the curriculum) every N steps."})
    disable_tqdm: bool | None = field(default=False, metadata={"help": "Hide progress bars."})
    report_to: list[str] = field(
        default_factory=lambda: ["none"],
        metadata={"help": "Trackers that get the logs, several allowed (tensorboard wandb ...; all; none)."},
    )
    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload the final model to --hub-model-id (checkpoints stay local)."}
    )
    hub_private_repo: bool | None = field(
        default=True, metadata={"help": "Create the hub repository private (false: public)."}
    )
    prediction_loss_only: bool = field(
        default=True, metadata={"help": "Evaluation computes the loss only (no logits gathered)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the collator needs `pixel_values` and the record ids."}
    )
    # Every rank runs every trainable module at every step (see `AdscTrainer.compute_loss`): no search for unused
    # parameters, and an error rather than a silent skip if that ever stops being true.
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "Kept False: every trainable module runs at every step on every rank."}
    )

    def __post_init__(self):
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push-to-hub needs --hub-model-id (e.g. me/llava-1.5-7b-adsc-192).")
        if self.budget is None and (self.curriculum_factors or self.curriculum != "reverse"):
            raise ValueError("--curriculum / --curriculum-factors need --budget.")
        if self.bf16 is None:
            self.bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if not torch.accelerator.is_available():
            self.use_cpu = True  # transformers refuses bf16 on a CPU unless told
        # `gradient_checkpointing*` (LLaVA's and older transformers' names) stay quiet aliases here.
        if self.activation_checkpointing is None:
            self.activation_checkpointing = self.gradient_checkpointing is not False
        if self.activation_checkpointing_kwargs is None:
            self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs or {"use_reentrant": False}
        if not self.warmup_steps:
            self.warmup_steps = self.warmup_ratio  # a float < 1 is a ratio in transformers 5.x
        if isinstance(self.report_to, str | list):  # also "tensorboard,wandb", as one string
            names = [self.report_to] if isinstance(self.report_to, str) else self.report_to
            self.report_to = [name for names_ in names for name in names_.split(",") if name]
        if self.data_seed is None:
            self.data_seed = self.seed
        if self.deepspeed in DEEPSPEED_CONFIGS:
            self.deepspeed = str(DEEPSPEED_CONFIGS[self.deepspeed])
        if self.eval_data is not None and self.eval_strategy in ("no", None):
            self.eval_strategy = "steps"
            self.eval_steps = self.eval_steps or self.save_steps
        super().__post_init__()

    @property
    def factors(self) -> tuple[float, ...]:
        return tuple(self.curriculum_factors or CURRICULUM_FACTORS[self.curriculum])

    def trainer_arguments(self) -> TrainingArguments:
        """Plain `TrainingArguments` for the `Trainer`: these options, minus ADSC's, and no hub push of checkpoints
        (`--push-to-hub` uploads the final model once, after training)."""
        values = {item.name: getattr(self, item.name) for item in fields(TrainingArguments) if item.init}
        return TrainingArguments(**{**values, "push_to_hub": False})
