"""The engine side of ADSC's stages: the step's plan, built in vLLM's (V1) model runner from the host state it holds.

Per step, before the model runs:

1. `_prepare_inputs`: the stage plan (`stages.plan_step`) from each request's image offsets (`mm_features`, read once
   per request), its computed-token count and its scheduled tokens; numpy, no device tensor read.
2. `_get_slot_mappings`: every stage group's slot mapping (its own block table, the stage's compact indices), each
   stage's sequence lengths, and, in steps that drop tokens, each stage's rows, written into one pinned host buffer
   and sent with one non-blocking copy to a persistent device buffer (`StageBuffers`); each stage group's layers get
   their slot mapping from there.
3. Attention metadata: vLLM builds it once per KV cache group type, which is once per stage (the groups of a stage
   share a spec); each stage's builder (`StageMetadataBuilder`) swaps in the stage's sequence lengths and, in
   dropping steps, its rows; the other groups of the stage only get their own block table and slot mapping.

The buffers' addresses never change, so a decode step (which drops nothing: stages differ only in their sequence
lengths and slots) can replay a full CUDA graph. The model's forward reads the same buffers (`StageInputs.step`).
"""

import copy
import functools
from dataclasses import dataclass

import numpy as np
import torch
from vllm.utils.platform_utils import is_pin_memory_available
from vllm.v1.attention.backend import AttentionBackend, subclass_attention_backend
from vllm.v1.worker.block_table import SlotMappingMode
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from vllm_adsc.kv_cache import AdscStageSpec
from vllm_adsc.stages import BatchImages, RequestImages, StepPlan, VisionSchedule, plan_step


class StageBuffers:
    """Persistent host (pinned where possible) and device buffers for one step's stage inputs, in fixed places.

    One byte buffer holds, in this order: each stage's sequence lengths and query start locations (int32), each
    stage group's slot mapping (int64), each stage's rows and rows kept from the previous stage (int64). A step fills
    a prefix of the host buffer and copies it to the device at once.
    """

    def __init__(
        self, num_stages: int, stage_groups: list[int], max_reqs: int, max_tokens: int, device: torch.device
    ) -> None:
        self.offset, self._regions = 0, {}
        stages = range(1, num_stages)
        self.seq_lens = {s: self._region(np.int32, max_reqs) for s in stages}
        self.query_start_loc = {s: self._region(np.int32, max_reqs + 1) for s in stages}
        self.offset += -self.offset % 8
        self.slots = {group: self._region(np.int64, max_tokens) for group in stage_groups}
        self.rows = {s: self._region(np.int64, max_tokens) for s in stages}
        self.from_previous = {s: self._region(np.int64, max_tokens) for s in stages}
        pin = is_pin_memory_available()
        self.host = torch.zeros(self.offset, dtype=torch.uint8, pin_memory=pin)
        self.device = torch.zeros(self.offset, dtype=torch.uint8, device=device)
        host_bytes = self.host.numpy()
        self.host_views, self.device_views, self._device_slices = {}, {}, {}
        for key, (start, dtype, capacity) in self._regions.items():
            self.host_views[key] = host_bytes[start : start + capacity * dtype().itemsize].view(dtype)
            torch_dtype = torch.int32 if dtype is np.int32 else torch.int64
            self.device_views[key] = self.device[start : start + capacity * dtype().itemsize].view(torch_dtype)
        self.used = 0

    def _region(self, dtype, capacity: int) -> int:
        key = len(self._regions)
        self._regions[key] = (self.offset, dtype, capacity)
        self.offset += capacity * np.dtype(dtype).itemsize
        return key

    def host_view(self, key: int, length: int) -> np.ndarray:
        start, dtype, _ = self._regions[key]
        self.used = max(self.used, start + length * np.dtype(dtype).itemsize)
        return self.host_views[key][:length]

    def device_view(self, key: int, length: int) -> torch.Tensor:
        view = self._device_slices.get((key, length))
        if view is None:
            if len(self._device_slices) > 4096:  # steps repeat their sizes (decode); keep the views of recent ones
                self._device_slices.clear()
            view = self._device_slices[key, length] = self.device_views[key][:length]
        return view

    def send(self) -> None:
        """Copy what this step wrote to the device: one non-blocking copy. It runs inside vLLM's
        `synchronize_input_prep`, so the next step writes the host buffer only once this copy is done."""
        self.device[: self.used].copy_(self.host[: self.used], non_blocking=True)
        self.used = 0


@dataclass
class StepInputs:
    """One step's plan and the device tensors made from it (views of `StageBuffers`), by stage."""

    plan: StepPlan
    num_reqs: int
    seq_lens: dict[int, torch.Tensor]
    seq_lens_cpu: dict[int, torch.Tensor]
    query_start_loc: dict[int, torch.Tensor]
    query_start_loc_cpu: dict[int, torch.Tensor]
    rows: dict[int, torch.Tensor]
    from_previous: dict[int, torch.Tensor]


class StageInputs:
    """The current step's stage inputs, shared by the runner (which writes them), each stage's attention metadata
    builder and the model's forward (which read them). Owned by the model; `step` is None outside a real step (the
    engine's warm-up, profiling and graph-capture runs)."""

    def __init__(self, schedule: VisionSchedule) -> None:
        self.schedule = schedule
        self.buffers: StageBuffers | None = None
        self.step: StepInputs | None = None

    def stage_metadata(self, stage: int, common):
        """`common` (vLLM's `CommonAttentionMetadata` of one of the stage's groups) for the stage's rows."""
        stage_common = copy.copy(common)
        if self.step is None:
            # A dummy run: every row, at its position. The sequence lengths still come from the stage's buffer, whose
            # address a captured CUDA graph keeps.
            seq_lens = self.buffers.device_view(self.buffers.seq_lens[stage], len(common.seq_lens))
            seq_lens.copy_(common.seq_lens)
            stage_common.seq_lens = seq_lens
            return stage_common
        step = self.step
        if stage > len(step.plan.stages):
            return common  # the stage has no row in this step: its layers do not run
        plan = step.plan.stages[stage - 1]
        stage_common.seq_lens = step.seq_lens[stage]
        stage_common.seq_lens_cpu_upper_bound = step.seq_lens_cpu[stage]
        stage_common.max_seq_len = int(plan.seq_lens.max())
        if plan.rows is not None:
            stage_common.query_start_loc = step.query_start_loc[stage]
            stage_common.query_start_loc_cpu = step.query_start_loc_cpu[stage]
            stage_common.num_actual_tokens = plan.num_rows
            stage_common.max_query_len = int(np.diff(plan.query_start_loc).max())
            stage_common.positions = None
        return stage_common


@functools.cache
def stage_backend(backend: type[AttentionBackend]) -> type[AttentionBackend]:
    """`backend` whose metadata builder gives a stage's layers the stage's sequence lengths and rows
    (`StageInputs.stage_metadata`); the layers of stages after the first use it."""
    base_builder = backend.get_builder_cls()

    class StageMetadataBuilder(base_builder):
        # vLLM builds once per KV cache group type, which is once per stage, and asks the stage's other groups only
        # for their own block tables and slot mappings.
        supports_update_block_table = True

        def __init__(self, kv_cache_spec, layer_names, vllm_config, device, **kwargs) -> None:
            super().__init__(kv_cache_spec, layer_names, vllm_config, device, **kwargs)
            layer = vllm_config.compilation_config.static_forward_context[layer_names[0]]
            self.adsc_stage, self.adsc_stage_inputs = kv_cache_spec.stage, layer.adsc_stage_inputs

        def build(self, common_prefix_len, common_attn_metadata, *args, **kwargs):
            stage_common = self.adsc_stage_inputs.stage_metadata(self.adsc_stage, common_attn_metadata)
            return super().build(common_prefix_len, stage_common, *args, **kwargs)

        def update_block_table(self, metadata, block_table, slot_mapping):
            if base_builder.supports_update_block_table:
                return super().update_block_table(metadata, block_table, slot_mapping)
            # The backend's metadata depends on the block table and slots only through these two fields.
            updated = copy.copy(metadata)
            updated.block_table, updated.slot_mapping = block_table, slot_mapping
            return updated

    return subclass_attention_backend("AdscStage", backend, StageMetadataBuilder)


class AdscModelRunnerMixin:
    """vLLM's V1 model runner, planning each step's stages (see the module's docstring)."""

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        self.stage_inputs: StageInputs = self.get_model().stage_inputs
        self.request_images: dict[str, RequestImages] = {}
        self._batch_images: tuple[list[str], BatchImages] | None = None
        self._step_plan: StepPlan | None = None

    def initialize_metadata_builders(self, kv_cache_config, kernel_block_sizes: list[int]) -> None:
        groups = kv_cache_config.kv_cache_groups
        for group, kernel_block_size in zip(groups, kernel_block_sizes, strict=False):
            spec = group.kv_cache_spec
            if isinstance(spec, AdscStageSpec) and kernel_block_size not in (None, spec.block_size):
                raise NotImplementedError(
                    f"The attention backend splits vLLM's KV cache blocks of {spec.block_size} tokens into kernel "
                    f"blocks of {kernel_block_size}; ADSC-LLaVA packs each stage's tokens by cache block: choose "
                    f"--block-size {kernel_block_size} (a block size the backend runs unsplit)."
                )
        super().initialize_metadata_builders(kv_cache_config, kernel_block_sizes)
        self.stage_groups = [
            index
            for index, group in enumerate(groups)
            if isinstance(group.kv_cache_spec, AdscStageSpec) and group.kv_cache_spec.stage > 0
        ]
        self.stage_of_group = {index: groups[index].kv_cache_spec.stage for index in self.stage_groups}
        self.stage_inputs.buffers = StageBuffers(
            self.stage_inputs.schedule.num_stages,
            self.stage_groups,
            self.max_num_reqs,
            self.max_num_tokens,
            self.device,
        )

    def may_reinitialize_input_batch(self, kv_cache_config) -> None:
        super().may_reinitialize_input_batch(kv_cache_config)
        # The stage groups' slots come from their compact indices (`_send_step`), not from positions: vLLM need not
        # compute them (as for the state caches of Mamba layers, which have no token slots).
        for index, group in enumerate(kv_cache_config.kv_cache_groups):
            spec = group.kv_cache_spec
            if isinstance(spec, AdscStageSpec) and spec.stage > 0:
                self.input_batch.block_table[index].slot_mapping_mode = SlotMappingMode.NONE

    def _on_request_state_removed(self, req_id: str, req_state) -> None:
        self.request_images.pop(req_id, None)
        super()._on_request_state_removed(req_id, req_state)

    def _images_of_batch(self, req_ids: list[str]) -> BatchImages:
        """The batch's images, rebuilt only when the batch's requests or their order changed."""
        if self._batch_images is None or self._batch_images[0] != req_ids:
            schedule = self.stage_inputs.schedule
            images = []
            for req_id in req_ids:
                if req_id not in self.request_images:
                    self.request_images[req_id] = RequestImages.from_features(
                        schedule, self.requests[req_id].mm_features
                    )
                images.append(self.request_images[req_id])
            self._batch_images = (list(req_ids), BatchImages.of(images, schedule.num_stages))
        return self._batch_images[1]

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens: np.ndarray):
        prepared = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        self._step_plan = self._plan_step(num_scheduled_tokens)
        return prepared

    def _plan_step(self, num_scheduled_tokens: np.ndarray) -> StepPlan:
        num_reqs = self.input_batch.num_reqs
        return plan_step(
            self.stage_inputs.schedule,
            self._images_of_batch(self.input_batch.req_ids),
            self.input_batch.num_computed_tokens_cpu[:num_reqs],
            num_scheduled_tokens,
            self.req_indices.np[: int(num_scheduled_tokens.sum())],
        )

    def _get_slot_mappings(self, num_tokens_padded, num_reqs_padded, num_tokens_unpadded, ubatch_slices=None):
        by_group, by_layer = super()._get_slot_mappings(
            num_tokens_padded, num_reqs_padded, num_tokens_unpadded, ubatch_slices
        )
        if by_group is None:
            return by_group, by_layer
        buffers, plan, self._step_plan = self.stage_inputs.buffers, self._step_plan, None
        if plan is None:
            # A dummy run: the stage groups write nowhere (the runner fills their slots with -1), from buffers whose
            # addresses a captured CUDA graph keeps.
            self.stage_inputs.step = None
            slots = {g: buffers.device_view(buffers.slots[g], num_tokens_padded) for g in self.stage_groups}
        else:
            self.stage_inputs.step, slots = self._send_step(plan, num_tokens_padded, num_reqs_padded)
        for group in self.stage_groups:
            by_group[group] = slots[group]
            for layer_name in self.kv_cache_config.kv_cache_groups[group].layer_names:
                by_layer[layer_name] = slots[group]
        return by_group, by_layer

    def _send_step(self, plan: StepPlan, num_tokens_padded: int, num_reqs_padded: int):
        """Write the step's stage inputs into the host buffer, send them, and return their device views."""
        buffers, num_reqs = self.stage_inputs.buffers, self.input_batch.num_reqs
        step = StepInputs(plan, num_reqs, {}, {}, {}, {}, {}, {})
        for stage_plan in plan.stages:
            stage = stage_plan.stage
            seq_lens = buffers.host_view(buffers.seq_lens[stage], num_reqs_padded)
            seq_lens[:num_reqs], seq_lens[num_reqs:] = stage_plan.seq_lens, 0
            step.seq_lens[stage] = buffers.device_view(buffers.seq_lens[stage], num_reqs_padded)
            step.seq_lens_cpu[stage] = torch.from_numpy(seq_lens)
            if stage_plan.rows is not None:
                query_start_loc = buffers.host_view(buffers.query_start_loc[stage], num_reqs + 1)
                query_start_loc[:] = stage_plan.query_start_loc
                step.query_start_loc[stage] = buffers.device_view(buffers.query_start_loc[stage], num_reqs + 1)
                step.query_start_loc_cpu[stage] = torch.from_numpy(query_start_loc)
                for name, values in (("rows", stage_plan.rows), ("from_previous", stage_plan.from_previous)):
                    region = getattr(buffers, name)[stage]
                    buffers.host_view(region, len(values))[:] = values
                    getattr(step, name)[stage] = buffers.device_view(region, len(values))
        slots, addresses = {}, {}
        for group in self.stage_groups:
            stage = self.stage_of_group[group]
            if stage > len(plan.stages):
                slots[group] = buffers.device_view(buffers.slots[group], 0)
                continue
            stage_plan, block_table = plan.stages[stage - 1], self.input_batch.block_table[group]
            table = block_table.block_table.np
            if stage not in addresses:
                # Where each row's slot is, the same for every group of the stage: (block entry, offset in block).
                block, offset = np.divmod(stage_plan.compact, block_table.block_size)
                addresses[stage] = (stage_plan.request * table.shape[1] + block, offset)
            entry, offset = addresses[stage]
            # Steps that keep every row keep the engine's padding rows too (slot -1: no write).
            length = num_tokens_padded if stage_plan.rows is None else stage_plan.num_rows
            host = buffers.host_view(buffers.slots[group], length)
            rows = host[: stage_plan.num_rows]
            rows[:] = table.ravel()[entry]
            rows *= block_table.block_size
            rows += offset
            host[stage_plan.num_rows :] = -1
            slots[group] = buffers.device_view(buffers.slots[group], length)
        buffers.send()
        return step, slots

    def _dummy_run(self, *args, **kwargs):
        self._step_plan = None
        return super()._dummy_run(*args, **kwargs)

    def execute_model(self, *args, **kwargs):
        try:
            return super().execute_model(*args, **kwargs)
        finally:
            self.stage_inputs.step = None


class AdscCPUModelRunner(AdscModelRunnerMixin, CPUModelRunner):
    """vLLM's CPU model runner with ADSC's stage plan."""


class AdscGPUModelRunner(AdscModelRunnerMixin, GPUModelRunner):
    """vLLM's (V1) GPU model runner with ADSC's stage plan."""


class AdscCPUWorker(CPUWorker):
    """vLLM's CPU worker, running `AdscCPUModelRunner`."""

    def init_device(self) -> None:
        super().init_device()
        # CPUWorker builds its runner at the end of init_device (it has no `_make_model_runner` to override, as the
        # GPU worker has), before any model or KV cache exists: build ADSC's in its place.
        self.model_runner = AdscCPUModelRunner(self.vllm_config, torch.device("cpu"))


class AdscGPUWorker(Worker):
    """vLLM's GPU worker, running `AdscGPUModelRunner` (vLLM's V1 model runner: see `engine.check_model_runner`)."""

    def _make_model_runner(self) -> GPUModelRunner:
        return AdscGPUModelRunner(self.vllm_config, self.device)
