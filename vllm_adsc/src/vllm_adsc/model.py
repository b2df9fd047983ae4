"""ADSC-LLaVA in vLLM: stock vLLM LLaVA whose language model drops vision tokens at the pruning layers.

The delta over `vllm.model_executor.models.llava.LlavaForConditionalGeneration` is the language model's layer loop:

    rows = every scheduled token
    for layer in decoder layers:
        if layer is a pruning layer:
            rows = the rows ADSC keeps (text, and each image's uniformly spaced survivors)   # stages.plan_stages
            this stage's layers get packed attention metadata and cache slots             # StageMetadata
        hidden, residual = layer(positions[rows], hidden, residual)                       # original positions
    output of every row = its state after the last layer it reached, then the final norm (as the HF model)

Steps that drop nothing (decode steps, text-only prefills) run vLLM's compiled language model as it is, each stage's
layers reading their own metadata from the forward context.

and the KV cache spec of each layer, which names its stage (`kv_cache.AdscStageSpec`), so that each stage's layers
get KV cache groups sized by the tokens the stage keeps. The vision tower, projector, processor and sampler are
vLLM's own.
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
    """Each stage's attention metadata, built by the engine's own builders (so any attention backend works) for the
    packed rows of a `StagePlan`, once per KV cache group of the stage (each group has its own block table)."""

    def __init__(self, vllm_config: VllmConfig, attention_layers: list, pruning_layers: tuple[int, ...]) -> None:
        self.vllm_config = vllm_config
        bounds = [0, *pruning_layers, len(attention_layers)]
        self.stage_layers = [attention_layers[start:end] for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
        self.builders: list | None = None

    def builder(self, stage: int, device: torch.device):
        if self.builders is None:
            self.builders = []
            for layers in self.stage_layers:
                spec = layers[0].get_kv_cache_spec(self.vllm_config)
                builder_class = layers[0].attn_backend.get_builder_cls()
                names = [layer.layer_name for layer in layers]
                self.builders.append(builder_class(spec, names, self.vllm_config, device))
        return self.builders[stage]

    def install(self, stage: int, plan: StagePlan, positions: torch.Tensor, block_size: int) -> None:
        """Point the stage's layers, in the current forward context, at metadata for `plan`'s packed rows."""
        context = get_forward_context()
        by_group: dict[int, list[str]] = {}  # the layers of one KV cache group share one metadata object
        for layer in self.stage_layers[stage]:
            by_group.setdefault(id(context.attn_metadata[layer.layer_name]), []).append(layer.layer_name)
        seq_lens = plan.seq_lens.to(torch.int32)
        query_lens = plan.query_start_loc[1:] - plan.query_start_loc[:-1]
        for names in by_group.values():
            engine_metadata = context.attn_metadata[names[0]]
            device = engine_metadata.query_start_loc.device
            slot_mapping = plan.slot_mapping(engine_metadata.block_table.cpu(), block_size)
            common = CommonAttentionMetadata(
                query_start_loc=plan.query_start_loc.to(device=device, dtype=torch.int32),
                query_start_loc_cpu=plan.query_start_loc.to(torch.int32),
                seq_lens=seq_lens.to(device),
                seq_lens_cpu_upper_bound=seq_lens,
                num_reqs=len(seq_lens),
                num_actual_tokens=len(plan.rows),
                max_query_len=int(query_lens.max()),
                max_seq_len=int(seq_lens.max()),
                block_table_tensor=engine_metadata.block_table,
                slot_mapping=slot_mapping.to(device=device, dtype=engine_metadata.slot_mapping.dtype),
                causal=True,
                positions=positions,
            )
            metadata = self.builder(stage, positions.device).build(0, common)
            for name in names:
                context.attn_metadata[name] = metadata
                context.slot_mapping[name] = common.slot_mapping


class AdscLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """`AdscLlavaForConditionalGeneration` checkpoints (ADSC's "uniform" policy) served by vLLM."""

    requires_raw_input_tokens = True  # image placeholders in `input_ids` say which rows are vision tokens
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
        if get_pp_group().world_size > 1:
            raise NotImplementedError("ADSC-LLaVA in vLLM does not support pipeline parallelism yet.")
        self.schedule = VisionSchedule.from_config(config)
        attention_layers = [layer.self_attn.attn for layer in self.language_model.model.layers]
        if self.schedule.pruning_layers:
            tag_stages(attention_layers, self.schedule)
        self.block_size = vllm_config.cache_config.block_size
        self.block_size_checked = False
        self.stage_metadata = StageMetadata(vllm_config, attention_layers, self.schedule.pruning_layers)
        self.first_layer_name = attention_layers[0].layer_name
        self.progress = RequestProgress(len(self.schedule.pruning_layers))
        self.stage_rows: list[int] = []  # rows each stage computed on in the latest step

    def _plan(self, input_ids: torch.Tensor | None, positions: torch.Tensor) -> list[StagePlan] | None:
        """This step's stage plans; None where there is nothing to prune or no request (profiling, warm-up)."""
        if not self.schedule.pruning_layers or input_ids is None:
            return None
        attn_metadata = get_forward_context().attn_metadata
        if not attn_metadata:
            return None
        if not isinstance(attn_metadata, dict):
            raise NotImplementedError("ADSC-LLaVA in vLLM does not support micro-batching (ubatching) yet.")
        engine_metadata = attn_metadata[self.first_layer_name]
        query_start_loc = engine_metadata.query_start_loc.cpu().long()
        num_reqs = len(query_start_loc) - 1
        block_table = engine_metadata.block_table.cpu()
        cpu_positions = positions.cpu().long()
        first_blocks = block_table[:num_reqs, 0].tolist()
        first_positions = cpu_positions[query_start_loc[:-1]].tolist()
        plans, after = plan_stages(
            input_ids.cpu().long(),
            cpu_positions,
            query_start_loc,
            engine_metadata.seq_lens.cpu().long()[:num_reqs],
            self.progress.before(first_blocks, first_positions),
            self.schedule,
        )
        self.progress.update(first_blocks, after)
        if not self.block_size_checked:
            # Stage 0 keeps every row at its position: the slots computed here must be the engine's own.
            num_real = int(query_start_loc[-1])
            request = torch.repeat_interleave(torch.arange(num_reqs), query_start_loc.diff())
            ours = slot_mapping(request, cpu_positions[:num_real], block_table, self.block_size)
            if not torch.equal(ours, engine_metadata.slot_mapping[:num_real].cpu().long()):
                raise RuntimeError(f"Cache blocks of {self.block_size} tokens do not give vLLM's slot mapping.")
            self.block_size_checked = True
        return plans

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
        plans = self._plan(input_ids, positions)
        if plans is None:
            self.stage_rows = [len(hidden)] * (len(self.schedule.pruning_layers) + 1)
            return language_model(input_ids, positions, intermediate_tensors, inputs_embeds=hidden)
        self.stage_rows = [len(hidden), *(len(plan.rows) for plan in plans)]
        if self.stage_rows[-1] == len(hidden):
            # Nothing dropped in this step (decode, text-only prefill): the stages differ only in where their caches
            # are, so the engine's own (compiled, graph-captured) language model runs with each stage's metadata.
            for stage, plan in enumerate(plans):
                self.stage_metadata.install(stage + 1, plan, positions, self.block_size)
            return language_model(input_ids, positions, intermediate_tensors, inputs_embeds=hidden)
        stage_of_layer = {layer: stage for stage, layer in enumerate(self.schedule.pruning_layers)}
        # Each row's output is its state when it left (dropped, or after the last layer), as in the HF model.
        final_hidden, final_residual = torch.empty_like(hidden), torch.empty_like(hidden)
        rows, residual = torch.arange(len(hidden), device=hidden.device), None
        for index, layer in enumerate(language_model.layers):
            stage = stage_of_layer.get(index)
            if stage is not None:
                plan = plans[stage]
                keep = plan.keep.to(hidden.device)
                final_hidden[rows], final_residual[rows] = hidden, residual
                rows = plan.rows.to(hidden.device)
                hidden, residual, positions = hidden[keep], residual[keep], positions[keep]
                self.stage_metadata.install(stage + 1, plan, positions, self.block_size)
            hidden, residual = layer(positions, hidden, residual)
        final_hidden[rows], final_residual[rows] = hidden, residual
        return language_model.norm(final_hidden, final_residual)[0]
