"""LoRA + projector fine-tuning of ADSC-LLaVA with a budget curriculum, on transformers' `Trainer`.

`run_training(config)` is what `adsc-llava train` runs: load the checkpoint as ADSC-LLaVA, freeze the vision tower and
the LLM, add LoRA to the LLM's linear layers, train LoRA and the projector while `CurriculumCallback` moves the
budget, then merge and save a remote-code checkpoint (weights, config with `auto_map`, both .py files, processor,
model card). Several processes (accelerate / torchrun, DDP or DeepSpeed ZeRO-2 / ZeRO-3) are the Trainer's own; what
they share beyond it (the data scan, the final checkpoint) is done here. FSDP is untested.
"""

import copy
import logging
import os
import shutil
from pathlib import Path

import torch
from packaging.version import Version
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from transformers import AutoConfig, AutoProcessor, Trainer, TrainerCallback, set_seed
from transformers.dynamic_module_utils import custom_object_save
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from adsc_llava import AdscLlavaConfig, AdscLlavaForConditionalGeneration
from adsc_llava.convert import adsc_config_with_schedule, load_source_weights
from adsc_llava.cost import format_schedule
from adsc_llava.families import family_of
from adsc_llava.model_card import write_model_card
from adsc_llava.train.args import AdscTrainConfig, default_attn_implementation
from adsc_llava.train.collator import LlavaDataCollator
from adsc_llava.train.curriculum import CurriculumCallback
from adsc_llava.train.data import IGNORE_INDEX, image_tensors
from adsc_llava.train.dataset import LlavaInstructDataset, scan_once
from adsc_llava.train.sampler import ModalityLengthGroupedSampler

logger = logging.getLogger(__name__)

# LoRA goes on the language model only: the same module names also exist in the CLIP tower.
LANGUAGE_MODEL_LAYERS = r"model\.language_model\.layers\.\d+\."
# The first DeepSpeed release whose ZeRO-3 keeps frozen weights (LoRA's base) whole while non-reentrant activation
# checkpointing recomputes a layer (deepspeedai/DeepSpeed#8148); older ones fail the first backward with
# `CheckpointError: ... saved {'shape': [4096]} vs recomputed {'shape': [0]}` (huggingface/transformers#47254).
ZERO3_FROZEN_RECOMPUTE_FIX = Version("0.19.3")
DATA_SCAN_FILE, EVAL_DATA_SCAN_FILE = "data-scan.json", "eval-data-scan.json"


def load_adsc_model(
    path: str,
    *,
    budget: float | None,
    pruning_layers: list[int] | None,
    dtype: torch.dtype | str = "auto",
    attn_implementation: str | None = None,
) -> AdscLlavaForConditionalGeneration:
    """Load a llava-hf or ADSC checkpoint as ADSC-LLaVA with pruning layers for `budget` (r is set by the curriculum).

    Without a budget an ADSC checkpoint keeps its own schedule (layers, r, keep policy), a stock one gets none; with
    one, an ADSC checkpoint keeps its keep policy and, unless `pruning_layers` are given, its layers
    (`adsc_config_with_schedule`).

    Raises:
        ValueError: for a checkpoint that is not LLaVA; `CorruptCheckpointError` (a `ValueError`) for one whose
            weights are missing, unexpected or of the wrong shape.
    """
    source_config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    # A ValueError naming the supported families for anything else.
    config = adsc_config_with_schedule(source_config, budget=budget, pruning_layers=pruning_layers)
    return load_source_weights(
        path, config, dtype, attn_implementation=attn_implementation or default_attn_implementation()
    )


def projector_module_names(model: torch.nn.Module) -> list[str]:
    """Full names of the model family's projector modules (`Family.projector_modules`; a module list: its members)."""
    wanted = family_of(model.config.model_type).projector_modules
    names = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in wanted:
            children = [f"{name}.{child}" for child, _ in module.named_children()]
            names += children if isinstance(module, torch.nn.ModuleList) else [name]
    return names


def add_lora(model: AdscLlavaForConditionalGeneration, config: AdscTrainConfig) -> PeftModel:
    """Freeze everything, add LoRA to the language model's linear layers, and make the projector trainable."""
    modules = "|".join(config.lora_target_modules)
    lora_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=rf"{LANGUAGE_MODEL_LAYERS}.*\.({modules})",
        modules_to_save=projector_module_names(model),
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
    """`Trainer` with a separate projector learning rate, LLaVA's modality sampler, a blank-image row for batches
    without images, the curriculum's phase in the logs, and atomic checkpoints."""

    def __init__(
        self,
        *args,
        projector_learning_rate: float,
        projector_modules: tuple[str, ...] = ("multi_modal_projector",),
        group_by_modality_length: bool | None = None,
        curriculum: CurriculumCallback | None = None,
        data_notes: list[str] | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.projector_learning_rate = projector_learning_rate
        self.projector_modules = projector_modules
        self.group_by_modality_length = group_by_modality_length
        self.curriculum = curriculum
        self.data_notes = list(data_notes or [])  # what the data scans found, for the start-of-run summary
        self._blank_image: dict[str, torch.Tensor] | None = None

    def create_optimizer(self, model=None):
        """AdamW with the projector at its own learning rate (LLaVA's `mm_projector_lr`)."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay_names = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
        for name, parameter in opt_model.named_parameters():
            if parameter.requires_grad:
                is_projector = any(module in name for module in self.projector_modules)
                groups.setdefault((is_projector, name in decay_names), []).append(parameter)
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

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Every log entry of training also carries the curriculum's phase, budget and r (trackers plot them)."""
        if self.curriculum is not None and "loss" in logs:
            logs.update(self.curriculum.log_values())
        super().log(logs, start_time)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's loss; a batch without images first gets a row that is only a blank image (`blank_image_row`).

        The vision tower and projector then run inside the model's forward at every step on every rank, in the same
        order as for a batch with images: under DDP every trainable parameter gets a gradient on every rank, and under
        ZeRO-3 every rank gathers the same parameters in the same order (a rank that skipped them would hang the
        others). The row has no labels, so the loss is that of the real rows.
        """
        if "pixel_values" not in inputs:
            inputs = self.blank_image_row(inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def blank_image(self) -> dict[str, torch.Tensor]:
        """A blank square image as the processor encodes it: its placeholder ids `[n]` and image tensors."""
        if self._blank_image is None:
            processor = self.processing_class
            vision = self.accelerator.unwrap_model(self.model).config.vision_config
            image = Image.new("RGB", (vision.image_size, vision.image_size))
            encoding = processor(images=[image], text=[processor.image_token], return_tensors="pt")
            placeholders = encoding["input_ids"][0]
            image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
            self._blank_image = {"input_ids": placeholders[placeholders == image_token_id], **image_tensors(encoding)}
        return self._blank_image

    def blank_image_row(self, inputs: dict) -> dict:
        """`inputs` with one more row: the placeholders of one blank image (attended, labels ignored) and its image
        tensors, built by the checkpoint's processor, so any family's image (NeXT's and OneVision's grids too) fits.

        Rows are padded on the right to the new length (the collator pads on the right too).
        """
        blank = self.blank_image()
        input_ids, attention_mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        span = len(blank["input_ids"])
        length = max(input_ids.shape[1], span)
        pad_token_id = self.processing_class.tokenizer.pad_token_id

        def add_row(batch: torch.Tensor, row_values: torch.Tensor | int, padding: int) -> torch.Tensor:
            padded = torch.nn.functional.pad(batch, (0, length - batch.shape[1]), value=padding)
            row = torch.full((1, length), padding, dtype=batch.dtype, device=batch.device)
            row[0, :span] = row_values
            return torch.cat([padded, row])

        device = input_ids.device
        return {
            **inputs,
            "input_ids": add_row(input_ids, blank["input_ids"].to(device), pad_token_id),
            # Attended: a fully masked row is NaN in eager attention, and 0 x NaN poisons the gradients.
            "attention_mask": add_row(attention_mask, 1, 0),
            "labels": add_row(labels, IGNORE_INDEX, IGNORE_INDEX),
            **{key: value.to(device) for key, value in blank.items() if key != "input_ids"},
        }

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = dataset.modality_lengths()
        group = self.group_by_modality_length
        if group is None:  # LLaVA groups its mixed data (665K: image and text-only records)
            group = any(length > 0 for length in lengths) and any(length < 0 for length in lengths)
        if not group:
            return super()._get_train_sampler(train_dataset)
        return ModalityLengthGroupedSampler.from_training_args(lengths, self.args)

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
    """(trainable, total) parameter counts; a ZeRO-3 partitioned parameter counts whole (`ds_numel`), not as the
    empty shell (`numel() == 0`) it is on each process."""

    def count(parameter: torch.nn.Parameter) -> int:
        return getattr(parameter, "ds_numel", parameter.numel())

    trainable = sum(count(p) for p in model.parameters() if p.requires_grad)
    return trainable, sum(count(p) for p in model.parameters())


def check_deepspeed_version(*, lora: bool, zero3: bool, checkpointing: bool, deepspeed_version: str | None) -> None:
    """Refuse LoRA under ZeRO-3 with activation checkpointing on a DeepSpeed older than `ZERO3_FROZEN_RECOMPUTE_FIX`,
    whose first backward fails (non-reentrant checkpointing: deepspeedai/DeepSpeed#8148; reentrant checkpointing,
    TRL's workaround, fails on 0.19.2 too, in ZeRO-3's backward hooks of the projector PEFT wraps)."""
    if not (lora and zero3 and checkpointing and deepspeed_version is not None):
        return
    if Version(deepspeed_version) < ZERO3_FROZEN_RECOMPUTE_FIX:
        raise RuntimeError(
            f"DeepSpeed {deepspeed_version} cannot train LoRA under ZeRO-3 with activation checkpointing: the first "
            "backward fails (frozen weights are partitioned while a checkpointed layer is recomputed, "
            f"deepspeedai/DeepSpeed#8148). pip install 'deepspeed>={ZERO3_FROZEN_RECOMPUTE_FIX}', or train without "
            "checkpointing (--gradient-checkpointing false) or with ZeRO-2."
        )


def build_datasets(
    config: AdscTrainConfig, processor
) -> tuple[LlavaInstructDataset, LlavaInstructDataset | None, list[str]]:
    """The training set and the held-out one (`--eval-data`), scanned once for all processes (`scan_once`); and a
    line per scan saying what it found."""
    datasets, notes = [], []
    for path, scan_file in ((config.data, DATA_SCAN_FILE), (config.eval_data, EVAL_DATA_SCAN_FILE)):
        if path is None:
            datasets.append(None)
            continue
        dataset = LlavaInstructDataset.from_json(
            path,
            processor,
            config.image_folder if config.image_folder is not None else Path(path).parent,
            max_length=config.max_length,
            on_bad_record=config.on_bad_record,
            truncate_long_samples=config.truncate_long_samples,
            assistant_only_loss=config.assistant_only_loss,
        )
        if config.scan_data:
            stats, how = scan_once(
                dataset,
                Path(config.output_dir) / scan_file,
                num_workers=config.dataloader_num_workers,
                show_progress=not config.disable_tqdm,
            )
            notes.append(f"{path}: {stats.summary()} ({how})")
        datasets.append(dataset)
    return datasets[0], datasets[1], notes


def build_trainer(
    config: AdscTrainConfig, callbacks: list[TrainerCallback] | None = None
) -> tuple[AdscTrainer, AdscLlavaForConditionalGeneration]:
    """Model, data, curriculum and `AdscTrainer` for `config` (plus extra `callbacks`); nothing is trained yet.

    The curriculum (`trainer.curriculum`, None without `--budget`) builds its phases when training starts, for the
    Trainer's own step count.
    """
    # The LoRA weights are drawn when the adapter is added, before the Trainer would seed: seed here, or two runs (and
    # a run and its resumed twin) start from different adapters.
    set_seed(config.seed)
    # Before the model exists: with a ZeRO-3 DeepSpeed config, TrainingArguments sets up the partitioning that
    # `from_pretrained` then loads the weights into.
    training_args = config.trainer_arguments()
    if training_args.deepspeed:
        import deepspeed

        # ZeRO-3 partitions the weights as they load, over DeepSpeed's process group. accelerate creates it on GPUs;
        # on CPUs it creates torch's (gloo) only, which this wraps (a no-op where the group exists already).
        deepspeed.init_distributed(auto_mpi_discovery=False)
        check_deepspeed_version(
            lora=config.tune == "lora",
            zero3=is_deepspeed_zero3_enabled(),
            checkpointing=bool(training_args.activation_checkpointing),
            deepspeed_version=deepspeed.__version__,
        )
    training_args.world_size  # noqa: B018 -- sets up the devices and, when launched on several, the process group
    processor = AutoProcessor.from_pretrained(config.model, trust_remote_code=True)
    model = load_adsc_model(
        config.model,
        budget=config.budget,
        pruning_layers=config.pruning_layers,
        dtype=torch.bfloat16 if training_args.bf16 else torch.float32,
        attn_implementation=config.attn_implementation,
    )
    train_dataset, eval_dataset, data_notes = build_datasets(config, processor)

    adsc_model = model
    if config.tune == "lora":
        model = add_lora(model, config)
    if not training_args.deepspeed:  # DeepSpeed keeps fp32 master weights of its own
        upcast_trainable_parameters(model)
    if training_args.activation_checkpointing and config.tune == "lora":
        model.enable_input_require_grads()

    callbacks, curriculum = list(callbacks or []), None
    if config.budget is not None:
        phase_fractions = tuple(config.phase_fractions or ()) or None
        curriculum = CurriculumCallback(
            adsc_model.config, config.budget, config.factors, phase_fractions, print_plan=True
        )
        callbacks.append(curriculum)

    trainer = AdscTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=LlavaDataCollator.from_processor(processor),
        processing_class=processor,
        callbacks=callbacks,
        projector_learning_rate=config.projector_learning_rate if config.tune == "lora" else config.learning_rate,
        projector_modules=family_of(adsc_model.config.model_type).projector_modules,
        group_by_modality_length=config.group_by_modality_length,
        curriculum=curriculum,
        data_notes=data_notes,
    )
    return trainer, adsc_model


def summarize_start(config: AdscTrainConfig, trainer: AdscTrainer, adsc_model) -> str:
    trainable, total = count_parameters(trainer.model)
    schedule = adsc_model.config
    if config.budget is not None:
        plan = f"curriculum '{config.curriculum}' {list(config.factors)} to budget {config.budget:g}"
    elif schedule.adsc_pruning_layers and schedule.adsc_drop_ratio:
        plan = f"the checkpoint's schedule (r={schedule.adsc_drop_ratio:.4f}, {schedule.adsc_keep_policy})"
    else:
        plan = "no pruning"
    lines = [
        f"ADSC training of {config.model}",
        f"  trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%), tune={config.tune}",
        f"  samples: {len(trainer.train_dataset)}  pruning layers: {schedule.adsc_pruning_layers}  {plan}",
        *(f"  data: {note}" for note in trainer.data_notes),
    ]
    return "\n".join(lines)


def leave_process_group() -> None:
    """End this process's part in the process group (a no-op on one process): what follows runs on the main
    process alone, with no collective whose timeout (`--ddp-timeout`) a long merge or upload could trip."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_training(config: AdscTrainConfig, callbacks: list[TrainerCallback] | None = None) -> Path:
    """Train, then save the final remote-code checkpoint to `output_dir/final`; returns that folder.

    The weights are written by every process together (ZeRO-3 gathers them); then the processes leave the process
    group, and the main process alone merges the adapter, writes the checkpoint and pushes it (`--push-to-hub`):
    the other processes return at once instead of waiting at a barrier that a long upload would time out.
    """
    trainer, adsc_model = build_trainer(config, callbacks)
    if trainer.is_world_process_zero():
        print(summarize_start(config, trainer, adsc_model), flush=True)
    resume_from = (
        get_last_checkpoint(config.output_dir) if config.resume and os.path.isdir(config.output_dir) else None
    )
    if config.resume and resume_from is None:
        logger.warning("--resume: no complete checkpoint in %s, starting from scratch", config.output_dir)
    trainer.train(resume_from_checkpoint=resume_from)

    final_dir = Path(config.output_dir) / "final"
    weights_dir = save_trained_weights(config, trainer, adsc_model)
    trainer.accelerator.wait_for_everyone()
    main_process = trainer.is_world_process_zero()
    leave_process_group()
    if main_process:
        write_final_checkpoint(config, trainer, adsc_model, weights_dir, final_dir)
        print(summarize_end(final_dir, adsc_model, trainer), flush=True)
        if config.push_to_hub:
            push_final_checkpoint(config, final_dir)
    return final_dir


def save_trained_weights(config: AdscTrainConfig, trainer: AdscTrainer, adsc_model) -> Path:
    """Write the trained weights (the adapter and projector, or every weight) through the Trainer's `save_model`,
    which gathers them from every process under ZeRO-3 and writes on the main one; returns their folder.

    Called on every process. The config is set to the curriculum's target schedule first.
    """
    if trainer.curriculum is not None and trainer.curriculum.phases:
        adsc_model.config.adsc_drop_ratio = trainer.curriculum.phases[-1].drop_ratio
    merge = isinstance(trainer.model, PeftModel) and not config.save_adapter
    weights_dir = Path(config.output_dir) / ("final-adapter" if merge else "final")
    trainer.save_model(str(weights_dir))
    return weights_dir


def write_final_checkpoint(
    config: AdscTrainConfig, trainer: AdscTrainer, adsc_model, weights_dir: Path, final_dir: Path
) -> None:
    """Complete `final_dir` as a remote-code checkpoint (on the main process): a LoRA run merged into a fresh full
    copy of the starting checkpoint loaded outside any partitioning (or the adapter with `--save-adapter`), the ADSC
    config and code, the processor and the model card."""
    if weights_dir != final_dir:
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
        curriculum=config.curriculum if trainer.curriculum is not None else None,
        repo_id=config.hub_model_id,
    )


def push_final_checkpoint(config: AdscTrainConfig, final_dir: Path) -> None:
    """Upload `final_dir` to `--hub-model-id`, creating the repository private unless `--hub-private-repo false`."""
    from huggingface_hub import HfApi

    api = HfApi(token=config.hub_token)
    api.create_repo(config.hub_model_id, private=config.hub_private_repo, exist_ok=True)
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
