"""Options of `adsc-llava train`, grouped by concern; defaults are LLaVA-1.5's LoRA recipe and the paper's (III-C)."""

from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import TrainingArguments

from adsc_llava.train.curriculum import CURRICULUM_FACTORS


@dataclass
class AdscTrainConfig:
    """Everything `adsc-llava train` takes. See README.md, "Train"."""

    # Model and data ---------------------------------------------------------------------------------------------
    model: str = field(metadata={"help": "A llava-hf or ADSC checkpoint folder (or hub id) to start from."})
    data: str = field(metadata={"help": "LLaVA-InstructionMix-665K style JSON (or JSON lines) file."})
    output_dir: str = field(metadata={"help": "Where checkpoints and the final model go."})
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder the records' `image` paths are relative to (default: the JSON's)."}
    )
    max_length: int = field(default=2048, metadata={"help": "Longest sample in tokens, image tokens included."})
    on_bad_record: Literal["error", "skip"] = field(
        default="error", metadata={"help": "A bad record (missing image, no conversations...): raise, or count+skip."}
    )
    scan_data: bool = field(
        default=True, metadata={"help": "Check every record (files, lengths) before training, not hours in."}
    )
    assistant_only_loss: bool = field(
        default=True,
        metadata={"help": "Loss on assistant answers only (LLaVA). False: on every text token, prompts too."},
    )
    group_by_modality_length: bool = field(
        default=False, metadata={"help": "LLaVA's sampler: batches of image-only or text-only records."}
    )

    # Compression schedule ---------------------------------------------------------------------------------------
    budget: float | None = field(
        default=None,
        metadata={"help": "Target average vision tokens per LLM layer (e.g. 192 of 576). None: no pruning."},
    )
    pruning_layers: list[int] | None = field(
        default=None, metadata={"help": "Pruning layers; default: the paper's [2, 8, 16, 24] scaled to the depth."}
    )
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
    learning_rate: float = field(default=2e-4, metadata={"help": "Learning rate of LoRA (or of everything, full)."})
    projector_learning_rate: float = field(default=2e-5, metadata={"help": "Learning rate of the projector."})

    # Optimisation -----------------------------------------------------------------------------------------------
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs (ignored if --max-steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; overrides epochs when > 0."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Batch size per device."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Share of steps of linear warm-up."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision; default: where supported."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Trade compute for activation memory."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data loading processes."})
    seed: int = field(default=42, metadata={"help": "Seed of initialisation, data order and dropout."})
    deepspeed: str | None = field(default=None, metadata={"help": "DeepSpeed config (train/zero2.json, zero3.json)."})

    # Checkpoints, output, hub -----------------------------------------------------------------------------------
    save_steps: int = field(default=500, metadata={"help": "Save a resumable checkpoint every N optimizer steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    logging_steps: int = field(default=10, metadata={"help": "Log the loss every N steps."})
    resume: bool = field(default=False, metadata={"help": "Continue from the last complete checkpoint."})
    save_adapter: bool = field(
        default=False, metadata={"help": "Keep the LoRA adapter (+ projector) instead of merging it."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the final model to the hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository, e.g. me/llava-adsc-192."})
    base_model_id: str | None = field(
        default=None,
        metadata={"help": "Hub id of --model for the model card's base_model (e.g. llava-hf/llava-1.5-7b-hf)."},
    )
    report_to: str = field(default="none", metadata={"help": "Trainer loggers (tensorboard, wandb, none)."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide progress bars."})

    def __post_init__(self):
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push-to-hub needs --hub-model-id (e.g. me/llava-1.5-7b-adsc-192).")
        if self.budget is None and (self.curriculum_factors or self.curriculum != "reverse"):
            raise ValueError("--curriculum / --curriculum-factors need --budget.")

    @property
    def factors(self) -> tuple[float, ...]:
        return tuple(self.curriculum_factors or CURRICULUM_FACTORS[self.curriculum])

    def training_arguments(self, use_bf16: bool) -> TrainingArguments:
        """The `transformers.TrainingArguments` for this run."""
        return TrainingArguments(
            output_dir=self.output_dir,
            num_train_epochs=self.num_train_epochs,
            max_steps=self.max_steps,
            per_device_train_batch_size=self.per_device_train_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            learning_rate=self.learning_rate,
            warmup_steps=self.warmup_ratio,  # a float < 1 is a ratio in transformers 5.x
            lr_scheduler_type=self.lr_scheduler_type,
            weight_decay=self.weight_decay,
            bf16=use_bf16,
            use_cpu=not torch.accelerator.is_available(),  # transformers refuses bf16 on a CPU unless told
            activation_checkpointing=self.gradient_checkpointing,
            activation_checkpointing_kwargs={"use_reentrant": False},
            dataloader_num_workers=self.dataloader_num_workers,
            seed=self.seed,
            data_seed=self.seed,
            deepspeed=self.deepspeed,
            save_strategy="steps",
            save_steps=self.save_steps,
            save_total_limit=self.save_total_limit,
            logging_steps=self.logging_steps,
            report_to=self.report_to,
            disable_tqdm=self.disable_tqdm,
            remove_unused_columns=False,  # the collator needs `pixel_values` and the record ids
            # Every rank runs every trainable module at every step (see `AdscTrainer.compute_loss`): no search for
            # unused parameters, and an error rather than a silent skip if that ever stops being true.
            ddp_find_unused_parameters=False,
        )
