"""LoRA + projector fine-tuning of ADSC-LLaVA with a budget curriculum, on transformers' `Trainer`.

`run_training(config)` is what `adsc-llava train` runs: load the checkpoint as ADSC-LLaVA, freeze the vision tower and
the LLM, add LoRA to the LLM's linear layers, train LoRA and the projector while `CurriculumCallback` moves the
budget, then merge and save a remote-code checkpoint (weights, config with `auto_map`, both .py files, processor,
model card). Distributed training (accelerate, DeepSpeed, FSDP) is the Trainer's own.
"""

import copy
import logging
import math
import os
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoProcessor, Trainer, TrainerCallback, set_seed
from transformers.dynamic_module_utils import custom_object_save
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from adsc_llava import AdscLlavaConfig, AdscLlavaForConditionalGeneration
from adsc_llava.convert import load_source_weights
from adsc_llava.cost import format_schedule
from adsc_llava.families import adsc_config_for
from adsc_llava.model_card import write_model_card
from adsc_llava.train.args import AdscTrainConfig
from adsc_llava.train.collator import LlavaDataCollator
from adsc_llava.train.curriculum import CurriculumCallback, build_curriculum, describe_curriculum
from adsc_llava.train.data import IGNORE_INDEX
from adsc_llava.train.dataset import LlavaInstructDataset
from adsc_llava.train.sampler import ModalityLengthGroupedSampler

logger = logging.getLogger(__name__)

PROJECTOR_MODULE = "multi_modal_projector"
# LoRA goes on the language model only: the same module names also exist in the CLIP tower.
LANGUAGE_MODEL_LAYERS = r"model\.language_model\.layers\.\d+\."


def load_adsc_model(
    path: str, *, budget: float | None, pruning_layers: list[int] | None, dtype: torch.dtype | str = "auto"
) -> AdscLlavaForConditionalGeneration:
    """Load a llava-hf or ADSC checkpoint as ADSC-LLaVA with pruning layers for `budget` (r is set by the curriculum).

    Raises:
        ValueError: for a checkpoint that is not LLaVA; `CorruptCheckpointError` (a `ValueError`) for one whose
            weights are missing, unexpected or of the wrong shape.
    """
    source_config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    config = adsc_config_for(source_config)  # a ValueError naming the supported families for anything else
    if budget is None:
        config = type(config).from_stock_config(config, pruning_layers=pruning_layers or [])
    else:
        config = config.with_budget(budget, pruning_layers)
    return load_source_weights(path, config, dtype)


def add_lora(model: AdscLlavaForConditionalGeneration, config: AdscTrainConfig) -> PeftModel:
    """Freeze everything, add LoRA to the language model's linear layers, and make the projector trainable."""
    modules = "|".join(config.lora_target_modules)
    lora_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=rf"{LANGUAGE_MODEL_LAYERS}.*\.({modules})",
        modules_to_save=[PROJECTOR_MODULE],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora_config)


def upcast_trainable_parameters(model: torch.nn.Module) -> None:
    """Give every trainable parameter (LoRA, the projector's trainable copy) fp32 weights; frozen ones keep theirs.

    With bf16 weights an AdamW update of about `lr` times a weight is below bf16's resolution for most weights, so
    they would never change. peft upcasts its LoRA weights but not the `modules_to_save` copy of the projector.
    Under bf16 mixed precision the Trainer's autocast runs the matmuls in bf16 either way.
    """
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


class AdscTrainer(Trainer):
    """`Trainer` with a separate projector learning rate, LLaVA's modality sampler, and atomic checkpoints."""

    def __init__(self, *args, projector_learning_rate: float, group_by_modality_length: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.projector_learning_rate = projector_learning_rate
        self.group_by_modality_length = group_by_modality_length

    def create_optimizer(self, model=None):
        """AdamW with the projector at its own learning rate (LLaVA's `mm_projector_lr`)."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay_names = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, parameter in opt_model.named_parameters():
            if parameter.requires_grad:
                groups.setdefault((PROJECTOR_MODULE in name, name in decay_names), []).append(parameter)
        param_groups = [
            {
                "params": params,
                "weight_decay": self.args.weight_decay if decays else 0.0,
                **({"lr": self.projector_learning_rate} if is_projector else {}),
            }
            for (is_projector, decays), params in sorted(groups.items())
        ]
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's loss; a batch without images first gets a row that is only a blank image (`blank_image_row`).

        The vision tower and projector then run inside the model's forward at every step on every rank, in the same
        order as for a batch with images: under DDP every trainable parameter gets a gradient on every rank, and under
        ZeRO-3 every rank gathers the same parameters in the same order (a rank that skipped them would hang the
        others). The row is masked out and has no labels, so the loss is that of the real rows.
        """
        if "pixel_values" not in inputs:
            inputs = self.blank_image_row(model, inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def blank_image_row(self, model, inputs: dict) -> dict:
        """`inputs` with one more row: image placeholders for one blank image, attention mask 0, labels ignored.

        Rows are padded on the right to the new length (the collator pads on the right too).
        """
        config = self.accelerator.unwrap_model(model).config
        if config.model_type != "adsc_llava":  # NeXT / OneVision: a blank image's span depends on its grid
            if self.args.world_size > 1:
                raise NotImplementedError(
                    f"A batch without images on one of {self.args.world_size} processes needs a blank-image row, "
                    f"which is built for LLaVA-1.5 only, not for '{config.model_type}'. Use "
                    "--group-by-modality-length true so that every rank gets image or text batches alike."
                )
            return inputs  # one process: no other rank to keep in step with
        vision = config.vision_config
        input_ids, attention_mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        length = max(input_ids.shape[1], config.image_seq_length)
        pad_token_id = self.processing_class.tokenizer.pad_token_id

        def add_row(batch: torch.Tensor, row_value: int, padding: int) -> torch.Tensor:
            padded = torch.nn.functional.pad(batch, (0, length - batch.shape[1]), value=padding)
            row = torch.full((1, length), padding, dtype=batch.dtype, device=batch.device)
            row[0, : config.image_seq_length] = row_value
            return torch.cat([padded, row])

        blank = torch.zeros(1, vision.num_channels, vision.image_size, vision.image_size, device=input_ids.device)
        return {
            **inputs,
            "input_ids": add_row(input_ids, config.image_token_id, pad_token_id),
            "attention_mask": add_row(attention_mask, 0, 0),
            "labels": add_row(labels, IGNORE_INDEX, IGNORE_INDEX),
            "pixel_values": blank,
        }

    def _get_train_sampler(self, train_dataset=None):
        if not self.group_by_modality_length:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return ModalityLengthGroupedSampler.from_training_args(dataset.modality_lengths(), self.args)

    def _save_checkpoint(self, model, trial):
        """Write the checkpoint under a staging name and rename it when complete.

        A run killed mid-save leaves only `staging/checkpoint-N`, which `get_last_checkpoint` never picks, so the
        latest `checkpoint-N` is always whole.
        """
        run_dir = self.args.output_dir
        staging_dir = os.path.join(run_dir, "staging")
        name = f"checkpoint-{self.state.global_step}"
        self.args.output_dir = staging_dir
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = run_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            checkpoint_dir = os.path.join(run_dir, name)
            if os.path.isdir(checkpoint_dir):  # left by an earlier run; a rename cannot replace a non-empty folder
                os.replace(checkpoint_dir, os.path.join(staging_dir, f"replaced-{name}"))
            os.replace(os.path.join(staging_dir, name), checkpoint_dir)
            shutil.rmtree(staging_dir, ignore_errors=True)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit, use_mtime=False)
        self.accelerator.wait_for_everyone()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def use_bf16(requested: bool | None) -> bool:
    """bf16 when asked, or by default where the accelerator supports it (never on CPU)."""
    if requested is not None:
        return requested
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def build_trainer(
    config: AdscTrainConfig, callbacks: list[TrainerCallback] | None = None
) -> tuple[AdscTrainer, AdscLlavaForConditionalGeneration, list]:
    """Model, data, curriculum and `AdscTrainer` for `config` (plus extra `callbacks`); nothing is trained yet."""
    # The LoRA weights are drawn when the adapter is added, before the Trainer would seed: seed here, or two runs (and
    # a run and its resumed twin) start from different adapters.
    set_seed(config.seed)
    bf16 = use_bf16(config.bf16)
    # Before the model exists: with a ZeRO-3 DeepSpeed config, TrainingArguments sets up the partitioning that
    # `from_pretrained` then loads the weights into.
    training_args = config.training_arguments(bf16)
    if training_args.deepspeed:
        import deepspeed

        # ZeRO-3 partitions the weights as they load, over DeepSpeed's process group. accelerate creates it on GPUs;
        # on CPUs it creates torch's (gloo) only, which this wraps (a no-op where the group exists already).
        deepspeed.init_distributed(auto_mpi_discovery=False)
    processor = AutoProcessor.from_pretrained(config.model, trust_remote_code=True)
    model = load_adsc_model(
        config.model,
        budget=config.budget,
        pruning_layers=config.pruning_layers,
        dtype=torch.bfloat16 if bf16 else torch.float32,
    )
    data_path = Path(config.data)
    dataset = LlavaInstructDataset.from_json(
        data_path,
        processor,
        config.image_folder if config.image_folder is not None else data_path.parent,
        max_length=config.max_length,
        on_bad_record=config.on_bad_record,
        assistant_only_loss=config.assistant_only_loss,
    )
    if config.scan_data:
        stats = dataset.scan(show_progress=not config.disable_tqdm)
        logger.info("Data: %s", stats.summary())

    adsc_model = model
    if config.tune == "lora":
        model = add_lora(model, config)
    if not training_args.deepspeed:  # DeepSpeed keeps fp32 master weights of its own
        upcast_trainable_parameters(model)
    if config.gradient_checkpointing and config.tune == "lora":
        model.enable_input_require_grads()

    callbacks, phases = list(callbacks or []), []
    if config.budget is not None:
        total_steps = planned_steps(config, training_args, len(dataset))
        phases = build_curriculum(
            adsc_model.config, config.budget, total_steps, config.factors, tuple(config.phase_fractions or ()) or None
        )
        callbacks.append(CurriculumCallback(adsc_model.config, phases))

    trainer = AdscTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=LlavaDataCollator.from_processor(processor),
        processing_class=processor,
        callbacks=callbacks,
        projector_learning_rate=config.projector_learning_rate if config.tune == "lora" else config.learning_rate,
        group_by_modality_length=config.group_by_modality_length,
    )
    return trainer, adsc_model, phases


def planned_steps(config: AdscTrainConfig, training_args, num_samples: int) -> int:
    """Optimizer steps of the run, as the Trainer will count them."""
    if training_args.max_steps > 0:
        return training_args.max_steps
    batch = training_args.per_device_train_batch_size * max(training_args.world_size, 1)
    batches_per_epoch = -(-num_samples // batch)
    # Rounded up like `Trainer.set_initial_training_values`: a last partial accumulation or epoch is still a step.
    steps_per_epoch = max(-(-batches_per_epoch // training_args.gradient_accumulation_steps), 1)
    return max(math.ceil(steps_per_epoch * training_args.num_train_epochs), 1)


def summarize_start(config: AdscTrainConfig, trainer: AdscTrainer, adsc_model, phases) -> str:
    trainable, total = count_parameters(trainer.model)
    lines = [
        f"ADSC training of {config.model}",
        f"  trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%), tune={config.tune}",
        f"  samples: {len(trainer.train_dataset)}  pruning layers: {adsc_model.config.adsc_pruning_layers}",
    ]
    if phases:
        lines.append(f"  curriculum '{config.curriculum}' to budget {config.budget}:")
        lines.append(describe_curriculum(adsc_model.config, phases))
    return "\n".join(lines)


def run_training(config: AdscTrainConfig, callbacks: list[TrainerCallback] | None = None) -> Path:
    """Train, then save the final remote-code checkpoint to `output_dir/final`; returns that folder."""
    trainer, adsc_model, phases = build_trainer(config, callbacks)
    if trainer.is_world_process_zero():
        print(summarize_start(config, trainer, adsc_model, phases), flush=True)
    resume_from = (
        get_last_checkpoint(config.output_dir) if config.resume and os.path.isdir(config.output_dir) else None
    )
    if config.resume and resume_from is None:
        logger.warning("--resume: no complete checkpoint in %s, starting from scratch", config.output_dir)
    trainer.train(resume_from_checkpoint=resume_from)

    final_dir = Path(config.output_dir) / "final"
    save_final_model(config, trainer, adsc_model, phases, final_dir)
    if trainer.is_world_process_zero():
        print(summarize_end(final_dir, adsc_model, trainer), flush=True)
    trainer.accelerator.wait_for_everyone()
    return final_dir


def save_final_model(config: AdscTrainConfig, trainer: AdscTrainer, adsc_model, phases, final_dir: Path) -> None:
    """Write the final remote-code checkpoint (merged, or the adapter with `--save-adapter`) and its model card.

    Called on every process: the weights are written through the Trainer's own `save_model`, which gathers them from
    every rank under ZeRO-3 and writes on the main process. A LoRA run is merged on the main process, into a fresh
    full copy of the starting checkpoint loaded outside any partitioning.
    """
    if phases:
        adsc_model.config.adsc_drop_ratio = phases[-1].drop_ratio
    merge = isinstance(trainer.model, PeftModel) and not config.save_adapter
    weights_dir = Path(config.output_dir) / "final-adapter" if merge else final_dir
    trainer.save_model(str(weights_dir))
    if not trainer.is_world_process_zero():
        return
    if merge:
        merged = merge_adapter(config, adsc_model.config, weights_dir)
        merged.save_pretrained(final_dir)
        shutil.rmtree(weights_dir)
    elif isinstance(trainer.model, PeftModel):  # the adapter needs the ADSC config and code next to it
        adsc_model.config.save_pretrained(final_dir)
        custom_object_save(adsc_model, final_dir)  # both .py files: config.json's auto_map names the modeling one
    trainer.processing_class.save_pretrained(final_dir)
    write_model_card(
        final_dir,
        adsc_model.config,
        base_model=config.base_model_id or config.model,
        data=config.data,
        steps=trainer.state.global_step,
        curriculum=config.curriculum if phases else None,
        repo_id=config.hub_model_id,
    )
    if config.push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(config.hub_model_id, exist_ok=True)
        api.upload_folder(folder_path=str(final_dir), repo_id=config.hub_model_id, commit_message="ADSC-LLaVA")


def merge_adapter(config: AdscTrainConfig, final_config: AdscLlavaConfig, adapter_dir: Path):
    """The starting checkpoint with the trained LoRA merged in and the trained projector, in the checkpoint's dtype."""
    unset_hf_deepspeed_config()  # a fresh, whole copy: not partitioned by a ZeRO-3 run's config
    base = load_source_weights(config.model, copy.deepcopy(final_config))
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return merged.to(base.dtype)


def summarize_end(final_dir: Path, adsc_model, trainer: AdscTrainer) -> str:
    config = adsc_model.config
    return "\n".join(
        [
            f"Done: {trainer.state.global_step} steps. Model saved to {final_dir}",
            f"  schedule: layers {config.adsc_pruning_layers}, r={config.adsc_drop_ratio:.4f}, "
            f"average {config.average_vision_tokens():.1f} of {config.reference_vision_tokens} vision tokens a layer",
            f"  tokens per layer: {format_schedule(config.vision_tokens_per_layer())}",
            "  load it with:",
            "    from transformers import AutoModelForImageTextToText, AutoProcessor",
            f"    model = AutoModelForImageTextToText.from_pretrained('{final_dir}', trust_remote_code=True)",
            f"    processor = AutoProcessor.from_pretrained('{final_dir}', trust_remote_code=True)",
        ]
    )
