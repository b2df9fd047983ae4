"""ADSC-LLaVA in vLLM: stock vLLM LLaVA whose language model drops vision tokens at the pruning layers.

The delta over `vllm.model_executor.models.llava.LlavaForConditionalGeneration`:

- the language model's layer loop, for steps that drop tokens:

      rows = every scheduled token
      for layer in decoder layers:
          if layer is a pruning layer:
              rows = the rows ADSC keeps (text, each image's uniformly spaced survivors)   # stages.plan_stages
              this stage's layers get packed attention metadata and cache slots         # StageMetadata
          hidden, residual = layer(positions[rows], hidden, residual)                   # original positions
      output of every row = its state after the last layer it reached, then the final norm (as the HF model)

  Steps that drop nothing (decode steps, text-only prefills) run vLLM's compiled language model as it is, each
  stage's layers reading their own metadata from the forward context;
- the KV cache spec of each layer, which names its stage (`kv_cache.AdscStageSpec`), so that each stage's layers get
  KV cache groups sized by the tokens the stage keeps.

The vision tower, projector, weights, processor and sampler are vLLM's own.
"""

import re

import torch
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llava import LlavaForConditionalGeneration
from vllm.model_executor.models.utils import WeightsMapper
from vllm.v1.attention.backend import CommonAttentionMetadata

from vllm_adsc.kv_cache import AdscStageSpec
from vllm_adsc.stages import (
    RequestProgress,
    StagePlan,
    VisionSchedule,
    dropped_prefixes,
    layer_stages,
    plan_stages,
    slot_mapping,
)

# Attention backends whose metadata has `query_start_loc`, `seq_lens`, `block_table` and `slot_mapping` and whose
# builders keep no per-group state between builds (FlashInfer plans its kernels inside the builder).
SUPPORTED_BACKENDS = ("CPU_ATTN", "FLASH_ATTN", "TRITON_ATTN")


class StageAttention(Attention):
    """vLLM's attention layer whose KV cache spec names its ADSC stage (`adsc_stage`, `adsc_dropped_prefix`)."""

    adsc_stage: int
    adsc_dropped_prefix: tuple[int, ...]

    def get_kv_cache_spec(self, vllm_config: VllmConfig):
        spec = super().get_kv_cache_spec(vllm_config)
        return AdscStageSpec.from_spec(spec, self.adsc_stage, self.adsc_dropped_prefix)


def tag_stages(attention_layers: list[Attention], schedule: VisionSchedule) -> None:
    """Make each layer a `StageAttention` of its stage (a subclass that adds one method: its state is unchanged)."""
    prefixes = dropped_prefixes(schedule)
    for layer, stage in zip(
        attention_layers, layer_stages(len(attention_layers), schedule.pruning_layers), strict=True
    ):
        layer.__class__ = StageAttention
        layer.adsc_stage, layer.adsc_dropped_prefix = stage, prefixes[stage]


class StageMetadata:
    """Each stage's attention metadata for the packed rows of a `StagePlan`, built by the engine's own builder once per
    KV cache group of the stage (each group has its own block table)."""

    def __init__(self, vllm_config: VllmConfig, attention_layers: list, pruning_layers: tuple[int, ...]) -> None:
        self.vllm_config = vllm_config
        bounds = [0, *pruning_layers, len(attention_layers)]
        self.stage_layers = [attention_layers[start:end] for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
        self.builders: dict[str, object] = {}  # by the first layer of a KV cache group

    def builder(self, group_layers: list, device: torch.device):
        key = group_layers[0].layer_name
        if key not in self.builders:
            spec = group_layers[0].get_kv_cache_spec(self.vllm_config)
            names = [layer.layer_name for layer in group_layers]
            builder_class = group_layers[0].attn_backend.get_builder_cls()
            self.builders[key] = builder_class(spec, names, self.vllm_config, device)
        return self.builders[key]

    def install(self, plan: StagePlan, positions: torch.Tensor, block_size: int) -> None:
        """Point the stage's layers, in the current forward context, at metadata for `plan`'s packed rows."""
        context = get_forward_context()
        groups: dict[int, list] = {}  # the layers of one KV cache group share one engine-built metadata object
        for layer in self.stage_layers[plan.stage]:
            groups.setdefault(id(context.attn_metadata[layer.layer_name]), []).append(layer)
        seq_lens = plan.seq_lens.to(torch.int32)
        query_lens = plan.query_start_loc[1:] - plan.query_start_loc[:-1]
        for group_layers in groups.values():
            engine_metadata = context.attn_metadata[group_layers[0].layer_name]
            device = engine_metadata.query_start_loc.device
            slots = plan.slot_mapping(engine_metadata.block_table.cpu(), block_size)
            common = CommonAttentionMetadata(
                query_start_loc=plan.query_start_loc.to(device=device, dtype=torch.int32),
                query_start_loc_cpu=plan.query_start_loc.to(torch.int32),
                seq_lens=seq_lens.to(device),
                seq_lens_cpu_upper_bound=seq_lens,
                num_reqs=len(seq_lens),
                num_actual_tokens=len(plan.step_rows),
                max_query_len=int(query_lens.max()),
                max_seq_len=int(seq_lens.max()),
                block_table_tensor=engine_metadata.block_table,
                slot_mapping=slots.to(device=device, dtype=engine_metadata.slot_mapping.dtype),
                causal=True,
                positions=positions,
            )
            builder = self.builder(group_layers, positions.device)
            metadata = builder.build(common_prefix_len=0, common_attn_metadata=common)
            for layer in group_layers:
                context.attn_metadata[layer.layer_name] = metadata
                context.slot_mapping[layer.layer_name] = common.slot_mapping


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
        self.schedule = VisionSchedule.from_config(vllm_config.model_config.hf_config)
        attention_layers = [layer.self_attn.attn for layer in self.language_model.model.layers]
        if self.schedule.pruning_layers:
            check_engine_config(vllm_config, attention_layers)
            tag_stages(attention_layers, self.schedule)
        self.block_size = vllm_config.cache_config.block_size
        self.slot_layout_checked = False
        self.stage_metadata = StageMetadata(vllm_config, attention_layers, self.schedule.pruning_layers)
        self.first_layer_name = attention_layers[0].layer_name
        self.progress = RequestProgress(len(self.schedule.pruning_layers))
        self.vision_rows: torch.Tensor | None = None  # this step's `is_multimodal`, kept by `embed_input_ids`
        self.stage_rows: list[int] = []  # rows each stage computed on in the latest step

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        # The engine marks which rows get image features; the image token id itself may also be generated as text.
        self.vision_rows = is_multimodal
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        language_model = self.language_model.model
        hidden = inputs_embeds if inputs_embeds is not None else language_model.embed_input_ids(input_ids)
        vision_rows, self.vision_rows = self.vision_rows, None
        plans = self._plan(vision_rows, positions)
        self.stage_rows = [len(hidden), *(len(plan.step_rows) for plan in plans or ())]
        if plans is None or self.stage_rows[-1] == len(hidden):
            # Nothing dropped in this step (decode, text-only prefill, warm-up): the stages differ only in where their
            # caches are, so the engine's own (compiled) language model runs, each stage reading its own metadata.
            for plan in plans or ():
                self.stage_metadata.install(plan, positions, self.block_size)
            return language_model(input_ids, positions, intermediate_tensors, inputs_embeds=hidden)
        return self._forward_dropping(hidden, positions, plans)

    def _forward_dropping(self, hidden: torch.Tensor, positions: torch.Tensor, plans: list[StagePlan]) -> torch.Tensor:
        """The layer loop of a step that drops tokens. hidden: `(T, H)`; positions: `(T,)`. Returns `(T, H)`."""
        language_model = self.language_model.model
        plan_at_layer = {layer: plan for layer, plan in zip(self.schedule.pruning_layers, plans, strict=True)}
        # Each row's output is its state when it left (dropped, or after the last layer), as in the HF model.
        final_hidden, final_residual = torch.empty_like(hidden), torch.empty_like(hidden)
        rows, residual = torch.arange(len(hidden), device=hidden.device), None
        for index, layer in enumerate(language_model.layers):
            plan = plan_at_layer.get(index)
            if plan is not None:
                keep = plan.from_previous.to(hidden.device)
                final_hidden[rows], final_residual[rows] = hidden, residual
                rows = plan.step_rows.to(hidden.device)
                hidden, residual, positions = hidden[keep], residual[keep], positions[keep]
                self.stage_metadata.install(plan, positions, self.block_size)
            hidden, residual = layer(positions, hidden, residual)
        final_hidden[rows], final_residual[rows] = hidden, residual
        return language_model.norm(final_hidden, final_residual)[0]

    def _plan(self, vision_rows: torch.Tensor | None, positions: torch.Tensor) -> list[StagePlan] | None:
        """This step's stage plans (on the CPU); None where there is nothing to prune or no real request (profiling,
        warm-up and graph-capture runs)."""
        if not self.schedule.pruning_layers:
            return None
        attn_metadata = get_forward_context().attn_metadata
        if not attn_metadata:
            return None
        if not isinstance(attn_metadata, dict):
            raise NotImplementedError("ADSC-LLaVA in vLLM does not support micro-batching (ubatching) yet.")
        engine_metadata = attn_metadata[self.first_layer_name]
        query_start_loc = engine_metadata.query_start_loc.cpu().long()
        num_reqs, num_real = len(query_start_loc) - 1, int(query_start_loc[-1])
        engine_slots = engine_metadata.slot_mapping[:num_real].cpu().long()
        if num_real == 0 or bool((engine_slots < 0).all()):
            return None  # a dummy batch
        block_table = engine_metadata.block_table.cpu()
        cpu_positions = positions.cpu().long()
        is_vision = torch.zeros(len(positions), dtype=torch.bool)
        if vision_rows is not None:
            is_vision[: len(vision_rows)] = vision_rows.cpu()
        if not self.slot_layout_checked:
            self._check_slot_layout(query_start_loc, cpu_positions, block_table, engine_slots)
        first_blocks = block_table[:num_reqs, 0].tolist()
        plans, after = plan_stages(
            is_vision,
            cpu_positions,
            query_start_loc,
            engine_metadata.seq_lens.cpu().long()[:num_reqs],
            self.progress.before(first_blocks, cpu_positions[query_start_loc[:-1]].tolist()),
            self.schedule,
        )
        self.progress.update(first_blocks, after)
        return plans

    def _check_slot_layout(self, query_start_loc, positions, block_table, engine_slots) -> None:
        """Stage 0 keeps every row at its position, so the slots this plugin computes for it must be the engine's own:
        a block table in other units (kernel blocks smaller than cache blocks) would misplace every stage's cache."""
        request = torch.repeat_interleave(torch.arange(len(query_start_loc) - 1), query_start_loc.diff())
        ours = slot_mapping(request, positions[: len(engine_slots)], block_table, self.block_size)
        if not torch.equal(ours, engine_slots):
            raise NotImplementedError(
                f"vLLM's block tables are not in cache blocks of {self.block_size} tokens here (the attention backend "
                "splits them into kernel blocks); ADSC-LLaVA needs a block size the backend runs unsplit."
            )
        self.slot_layout_checked = True


def check_engine_config(vllm_config: VllmConfig, attention_layers: list[Attention]) -> None:
    """Refuse, by name, the engine settings under which per-step stage metadata would be ignored or misread."""
    if get_pp_group().world_size > 1:
        raise NotImplementedError("ADSC-LLaVA in vLLM does not support pipeline parallelism yet.")
    backend = attention_layers[0].attn_backend.get_name()
    if backend not in SUPPORTED_BACKENDS:
        raise NotImplementedError(
            f"ADSC-LLaVA in vLLM supports the attention backends {', '.join(SUPPORTED_BACKENDS)}, not {backend}: "
            "choose one with --attention-backend."
        )
    cudagraph_mode = vllm_config.compilation_config.cudagraph_mode
    if cudagraph_mode.has_full_cudagraphs():
        # A graph that captured attention would replay the metadata of the step it was captured on.
        raise NotImplementedError(
            "ADSC-LLaVA builds each stage's attention metadata per step, so CUDA graphs must leave attention out: "
            f"cudagraph_mode is {cudagraph_mode.name}; use PIECEWISE or --enforce-eager."
        )
