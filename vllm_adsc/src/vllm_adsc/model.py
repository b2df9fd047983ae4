"""ADSC-LLaVA in vLLM: stock vLLM LLaVA whose language model drops vision tokens at the pruning layers.

The delta over `vllm.model_executor.models.llava.LlavaForConditionalGeneration` is the language model's layer loop:

    rows = every scheduled token
    for layer in decoder layers:
        if layer is a pruning layer:
            rows = the rows ADSC keeps (text, and each image's uniformly spaced survivors)   # stages.plan_stages
            this stage's layers get packed attention metadata and cache slots             # StageMetadata
        hidden, residual = layer(positions[rows], hidden, residual)                       # original positions
    output of every row = its state after the last layer it reached, then the final norm (as the HF model)

The vision tower, projector, weights, processor and sampler are vLLM's own.
"""

import re

import torch
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.llava import LlavaForConditionalGeneration
from vllm.model_executor.models.utils import WeightsMapper
from vllm.v1.attention.backend import CommonAttentionMetadata

from vllm_adsc.stages import RequestProgress, StagePlan, VisionSchedule, plan_stages


class StageMetadata:
    """Builds each stage's attention metadata with the engine's own builders, so any attention backend works."""

    def __init__(self, vllm_config: VllmConfig, attention_layers: list, pruning_layers: tuple[int, ...]) -> None:
        self.vllm_config = vllm_config
        bounds = [*pruning_layers, len(attention_layers)]
        self.layer_names = [
            [attention_layers[i].layer_name for i in range(start, end)]
            for start, end in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        self.attention_layers = attention_layers
        self.pruning_layers = pruning_layers
        self.builders: list | None = None

    def _builders(self, device: torch.device) -> list:
        if self.builders is None:
            self.builders = []
            for stage, names in enumerate(self.layer_names):
                layer = self.attention_layers[self.pruning_layers[stage]]
                spec = layer.get_kv_cache_spec(self.vllm_config)
                builder_class = layer.attn_backend.get_builder_cls()
                self.builders.append(builder_class(spec, names, self.vllm_config, device))
        return self.builders

    def install(self, stage: int, plan: StagePlan, full, positions: torch.Tensor) -> None:
        """Point the stage's layers at metadata for `plan`'s packed rows in the current forward context."""
        builder = self._builders(positions.device)[stage]
        device = full.query_start_loc.device
        seq_lens = plan.seq_lens.to(torch.int32)
        common = CommonAttentionMetadata(
            query_start_loc=plan.query_start_loc.to(device=device, dtype=torch.int32),
            query_start_loc_cpu=plan.query_start_loc.to(torch.int32),
            seq_lens=seq_lens.to(device),
            seq_lens_cpu_upper_bound=seq_lens,
            num_reqs=len(seq_lens),
            num_actual_tokens=len(plan.rows),
            max_query_len=int((plan.query_start_loc[1:] - plan.query_start_loc[:-1]).max()),
            max_seq_len=int(seq_lens.max()),
            block_table_tensor=full.block_table,
            slot_mapping=plan.slot_mapping.to(device=device, dtype=full.slot_mapping.dtype),
            causal=True,
            positions=positions,
        )
        metadata = builder.build(0, common)
        context = get_forward_context()
        for name in self.layer_names[stage]:
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
        self.schedule = VisionSchedule.from_offsets(
            image_token_id=config.image_token_index,
            tokens_per_image=config.image_seq_length,
            pruning_layers=config.adsc_pruning_layers,
            surviving_offsets=config.surviving_vision_offsets(config.image_seq_length),
        )
        layers = self.language_model.model.layers
        self.stage_metadata = StageMetadata(
            vllm_config, [layer.self_attn.attn for layer in layers], self.schedule.pruning_layers
        )
        self.progress = RequestProgress(len(self.schedule.pruning_layers))
        self.stage_rows: list[int] = []  # rows each stage computed on in the latest step

    def _plan(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[list[StagePlan], object] | None:
        """This step's stage plans and the step's own (first stage's) metadata; None where nothing is pruned."""
        if not self.schedule.pruning_layers or input_ids is None:
            return None
        attn_metadata = get_forward_context().attn_metadata
        if not attn_metadata:  # profiling and warm-up runs: no requests, no cache
            return None
        if not isinstance(attn_metadata, dict):
            raise NotImplementedError("ADSC-LLaVA in vLLM does not support micro-batching (ubatching) yet.")
        full = attn_metadata[self.stage_metadata.attention_layers[0].layer_name]
        query_start_loc = full.query_start_loc.cpu().long()
        block_table = full.block_table.cpu()
        num_reqs = len(query_start_loc) - 1
        cpu_positions = positions.cpu().long()
        first_blocks = block_table[:num_reqs, 0].tolist()
        first_positions = cpu_positions[query_start_loc[:-1]].tolist() if num_reqs else []
        block_size = (
            self.stage_metadata.attention_layers[0].get_kv_cache_spec(self.stage_metadata.vllm_config).block_size
        )
        plans, after = plan_stages(
            input_ids.cpu().long(),
            cpu_positions,
            query_start_loc,
            full.seq_lens.cpu().long()[:num_reqs],
            block_table[:num_reqs],
            block_size,
            self.progress.before(first_blocks, first_positions),
            self.schedule,
        )
        self.progress.update(first_blocks, after)
        return plans, full

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
        planned = self._plan(input_ids, positions)
        if planned is None:
            self.stage_rows = [len(hidden)] * (len(self.schedule.pruning_layers) + 1)
            return language_model(input_ids, positions, intermediate_tensors, inputs_embeds=hidden)
        plans, full = planned
        self.stage_rows = [len(hidden), *(len(plan.rows) for plan in plans)]
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
                self.stage_metadata.install(stage, plan, full, positions)
            hidden, residual = layer(positions, hidden, residual)
        final_hidden[rows], final_residual[rows] = hidden, residual
        return language_model.norm(final_hidden, final_residual)[0]
