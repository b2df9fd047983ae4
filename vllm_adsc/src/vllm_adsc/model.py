"""ADSC-LLaVA in vLLM: stock vLLM LLaVA whose language model drops vision tokens at the pruning layers.

The delta over `vllm.model_executor.models.llava.LlavaForConditionalGeneration`:

- the language model's layer loop, for steps that drop tokens:

      rows = every scheduled token
      for layer in decoder layers:
          if layer is a pruning layer:
              rows = the rows ADSC keeps (text, each image's uniformly spaced survivors)   # runner.StageInputs
          hidden, residual = layer(positions[rows], hidden, residual)                   # original positions
      output of every row = its state after the last layer it reached, then the final norm (as the HF model)

  Steps that drop nothing (decode steps, text-only prefills) run vLLM's compiled language model as it is: each
  stage's layers read their own attention metadata and slots, which the model runner prepared (`runner`). In steps
  that drop tokens, each stage's layers run as one `torch.compile`d function with a dynamic row count, unless vLLM
  runs eagerly (`enforce_eager`); the gathers between stages stay eager;
- the KV cache spec of each layer, which names its stage (`kv_cache.AdscStageSpec`), so that each stage's layers get
  KV cache groups sized by the tokens the stage keeps, and the attention backend of the layers after the first
  pruning layer, whose metadata builder gives them their stage's sequence lengths and rows (`runner.stage_backend`);
- the multimodal processor, which refuses at admission an image that is not `image_seq_length` placeholder tokens.

The vision tower, projector, weights, processor and sampler are vLLM's own. The stage plan is made on the host, in
the model runner, from state vLLM already holds there: the forward reads no device tensor on the host.
"""

import itertools
import re

import torch
from torch import nn
from vllm.config import CompilationMode, VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY

from vllm_adsc.kv_cache import AdscStageSpec
from vllm_adsc.runner import StageInputs, stage_backend
from vllm_adsc.stages import VisionSchedule, layer_stages

# Attention backends whose metadata has `query_start_loc`, `seq_lens`, `block_table` and `slot_mapping` and whose
# builders keep no per-group state between builds (FlashInfer plans its kernels inside the builder).
SUPPORTED_BACKENDS = ("CPU_ATTN", "FLASH_ATTN", "TRITON_ATTN")


class StageAttention(Attention):
    """vLLM's attention layer whose KV cache spec names its ADSC stage (`adsc_stage`) and which, after the first
    pruning layer, builds its metadata with its stage's rows (`adsc_stage_inputs`)."""

    adsc_stage: int
    adsc_stage_inputs: StageInputs

    def get_kv_cache_spec(self, vllm_config: VllmConfig):
        return AdscStageSpec.from_spec(super().get_kv_cache_spec(vllm_config), self.adsc_stage)

    def get_attn_backend(self):
        backend = super().get_attn_backend()
        return stage_backend(backend) if self.adsc_stage > 0 else backend


def tag_stages(attention_layers: list[Attention], schedule: VisionSchedule, stage_inputs: StageInputs) -> None:
    """Make each layer a `StageAttention` of its stage (a subclass that adds two methods: its state is unchanged)."""
    for layer, stage in zip(
        attention_layers, layer_stages(len(attention_layers), schedule.pruning_layers), strict=True
    ):
        layer.__class__ = StageAttention
        layer.adsc_stage, layer.adsc_stage_inputs = stage, stage_inputs


class AdscLlavaMultiModalProcessor(LlavaMultiModalProcessor):
    """vLLM's LLaVA processor, refusing (for that request alone) an image that is not `image_seq_length` tokens."""

    def _validate_mm_placeholders(self, mm_placeholders, mm_item_counts) -> None:
        super()._validate_mm_placeholders(mm_placeholders, mm_item_counts)
        config = self.info.get_hf_config()
        if not config.adsc_pruning_layers:
            return
        tokens_per_image = config.image_seq_length
        for placeholder in mm_placeholders.get("image", []):
            if placeholder.length != tokens_per_image or (
                placeholder.is_embed is not None and not bool(placeholder.is_embed.all())
            ):
                raise ValueError(
                    f"ADSC-LLaVA's schedule is set for images of {tokens_per_image} tokens (image_seq_length), but "
                    f"image {placeholder.item_idx} has {placeholder.length} placeholder tokens"
                    + ("" if placeholder.is_embed is None else f", {int(placeholder.is_embed.sum())} of them embeds")
                    + "."
                )


@MULTIMODAL_REGISTRY.register_processor(
    AdscLlavaMultiModalProcessor, info=LlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class AdscLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """`AdscLlavaForConditionalGeneration` checkpoints (ADSC's "uniform" policy) served by vLLM."""

    # transformers >= 5 saves the CLIP tower without its `vision_model.` level; vLLM's CLIP module keeps it.
    hf_to_vllm_mapper = (
        WeightsMapper(
            orig_to_new_regex={
                re.compile(r"^(model\.)?vision_tower\.(?!vision_model\.)"): "vision_tower.vision_model."
            }
        )
        | LlavaForConditionalGeneration.hf_to_vllm_mapper
    )

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        self.schedule = VisionSchedule.from_config(config)
        self.stage_inputs = StageInputs(self.schedule)
        self.stage_rows: list[int] = []  # rows each stage computed on in the latest step that ran the forward
        layers = self.language_model.model.layers
        bounds = (0, *self.schedule.pruning_layers, len(layers))
        self.stage_layers = [list(layers[start:end]) for start, end in itertools.pairwise(bounds)]
        compiled = vllm_config.compilation_config.mode != CompilationMode.NONE
        # One code object serves every stage (a graph each: their attention layers' names differ).
        self.run_stage = torch.compile(run_layers, dynamic=False) if compiled else run_layers
        if self.schedule.pruning_layers:
            attention_layers = [layer.self_attn.attn for layer in layers]
            check_model(attention_layers)
            tag_stages(attention_layers, self.schedule, self.stage_inputs)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        step = self.stage_inputs.step
        if step is None or not step.plan.drops:
            # Nothing dropped in this step (decode, text-only prefill, warm-up): the stages differ only in where their
            # caches are, so the engine's own (compiled) language model runs, each stage reading its own metadata.
            self.stage_rows = [len(positions)] * self.schedule.num_stages
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        language_model = self.language_model.model
        hidden = inputs_embeds if inputs_embeds is not None else language_model.embed_input_ids(input_ids)
        return self._forward_dropping(hidden, positions, step)

    def _forward_dropping(self, hidden: torch.Tensor, positions: torch.Tensor, step) -> torch.Tensor:
        """The layer loop of a step that drops tokens. hidden: `(T, H)`; positions: `(T,)`. Returns `(T, H)`."""
        num_stages_run = len(step.plan.stages) + 1
        self.stage_rows = [len(positions)] + [plan.num_rows for plan in step.plan.stages]
        # Each row's output is its state when it left (dropped, or after the last layer), as in the HF model.
        final_hidden, final_residual = torch.empty_like(hidden), torch.empty_like(hidden)
        rows, residual = None, None
        for stage, layers in enumerate(self.stage_layers):
            if stage > 0:
                self._keep_final(final_hidden, final_residual, rows, hidden, residual)
                if stage >= num_stages_run:
                    break  # this stage has no row in this step: its layers do not run
                keep, rows = step.from_previous[stage - 1], step.rows[stage - 1]
                hidden, residual, positions = hidden[keep], residual[keep], positions[keep]
            # A single row would need a graph of its own (sizes 0 and 1 are specialised), compiled while serving.
            run_stage = self.run_stage if len(positions) > 1 else run_layers
            hidden, residual = run_stage(layers, *mark_rows_dynamic(positions, hidden, residual))
        else:
            self._keep_final(final_hidden, final_residual, rows, hidden, residual)
        return self.language_model.model.norm(final_hidden, final_residual)[0]

    def warm_up_stages(self, num_rows: int) -> bool:
        """Compile each stage's layers on `num_rows` dummy rows, so that the first step that drops tokens does not
        wait for it; False if they run eagerly. Run inside a forward context without attention metadata."""
        if self.run_stage is run_layers:
            return False
        # The graphs guard on what a step passes: embeddings from the runner's buffer (made outside inference mode),
        # then rows gathered in inference mode.
        embeddings = self.language_model.model.embed_tokens.weight
        hidden = torch.zeros(num_rows, embeddings.shape[1], dtype=embeddings.dtype, device=embeddings.device)
        positions = torch.arange(num_rows, device=embeddings.device)
        keep, residual = positions.clone(), None
        with torch.inference_mode():
            for stage, layers in enumerate(self.stage_layers):
                if stage > 0:
                    hidden, residual, positions = hidden[keep], residual[keep], positions[keep]
                hidden, residual = self.run_stage(layers, *mark_rows_dynamic(positions, hidden, residual))
        return True

    @staticmethod
    def _keep_final(final_hidden, final_residual, rows, hidden, residual) -> None:
        """Record the states of the rows that reached this layer (`rows`: None for all of the step's rows)."""
        if rows is None:
            final_hidden[: len(hidden)], final_residual[: len(hidden)] = hidden, residual
        else:
            final_hidden[rows], final_residual[rows] = hidden, residual


def run_layers(
    layers: list[nn.Module], positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One stage of the layer loop. positions: `(R,)`; hidden, residual: `(R, H)` (residual None before layer 0)."""
    for layer in layers:
        hidden, residual = layer(positions, hidden, residual)
    return hidden, residual


def mark_rows_dynamic(*row_tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Compile the stages for any row count above one (one graph each) rather than per count."""
    for tensor in row_tensors:
        if tensor is not None:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
    return row_tensors


def check_model(attention_layers: list[Attention]) -> None:
    """Refuse, by name and at start-up, attention backends whose metadata the stage plan does not know. (An image
    length other than the schedule's is refused by the processor, which the engine runs on a dummy image at start-up,
    and for each request at admission.)"""
    backend = attention_layers[0].attn_backend.get_name()
    if backend not in SUPPORTED_BACKENDS:
        raise NotImplementedError(
            f"ADSC-LLaVA in vLLM supports the attention backends {', '.join(SUPPORTED_BACKENDS)}, not {backend}: "
            "choose one with --attention-backend."
        )
