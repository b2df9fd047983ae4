"""The engine side of ADSC's stages: the step's plan, built in vLLM's (V1) model runner from the host state it holds.

Per step, before the model runs:

1. `_prepare_inputs`: the stage plan (`stages.plan_step`) from each request's image offsets (`mm_features`, read once
   per request), its computed-token count and its scheduled tokens; numpy, no device tensor read.
2. `_get_slot_mappings`: every stage group's slot mapping (one gather from the stage groups' block tables, kept in
   one array, at the stage's compact indices), each stage's sequence lengths, and, in steps that drop tokens, each
   stage's rows, written into one pinned host buffer and sent with one non-blocking copy to a persistent device
   buffer (`StageBuffers`); each stage group's layers get their slot mapping from there.
3. Attention metadata: vLLM builds it once per KV cache group type, which is once per stage (the groups of a stage
   share a spec); each stage's builder (`StageMetadataBuilder`) swaps in the stage's sequence lengths and, in
   dropping steps, its rows; the other groups of the stage only get their own block table and slot mapping.

Each step's work is a fixed number of array operations, whatever the batch and the number of KV cache groups. The
buffers' places depend only on a step's padded size, so a decode step (which drops nothing: stages differ only in
their sequence lengths and slots) can replay a full CUDA graph captured at its size. The model's forward reads the
same buffers (`StageInputs.step`).
"""

import functools
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from vllm.forward_context import set_forward_context
from vllm.logger import init_logger
from vllm.utils.platform_utils import is_pin_memory_available
from vllm.v1.attention.backend import AttentionBackend, subclass_attention_backend
from vllm.v1.worker.block_table import SlotMappingMode
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from vllm_adsc.kv_cache import AdscStageSpec
from vllm_adsc.stages import BatchImages, ImagesByRequest, StepPlan, VisionSchedule, plan_step

logger = init_logger(f"vllm.{__name__}")  # under vLLM's logger, which vLLM gives a handler and level


class Region(NamedTuple):
    """One 2-D array's place in `StageBuffers`: its host view (numpy), and its rows' host and device tensors."""

    host: np.ndarray
    host_rows: tuple[torch.Tensor, ...]
    device_rows: tuple[torch.Tensor, ...]


class StageBuffers:
    """Persistent host (pinned where possible) and device byte buffers for one step's stage inputs.

    Each stage's sequence lengths have a fixed place at the start (`max_reqs` int32 per stage). After them, a step
    packs what else it needs, from one fixed offset on (`take`): the slot mappings of every stage group (int64, a row
    per group), and in steps that drop tokens each stage's query start locations, rows and rows kept from the previous
    stage. `send` copies the bytes the step wrote to the device with one non-blocking copy. Places depend only on the
    arrays' shapes, so every step of one padded size that drops nothing reads the same device addresses (what a
    captured CUDA graph needs), and a small batch copies a small prefix.
    """

    def __init__(self, num_stages: int, num_groups: int, max_reqs: int, max_tokens: int, device: torch.device) -> None:
        stages = num_stages - 1
        header = stages * max_reqs * 4
        self.start = header + -header % 8
        capacity = self.start + 8 * (num_groups * max_tokens + stages * (max_reqs + 2 + 2 * max_tokens))
        pin = is_pin_memory_available()
        self.host = torch.zeros(capacity, dtype=torch.uint8, pin_memory=pin)
        self.device = torch.zeros(capacity, dtype=torch.uint8, device=device)
        self._host_bytes = self.host.numpy()
        self.seq_lens_host = self._host_bytes[:header].view(np.int32).reshape(stages, max_reqs)
        self._seq_lens_device = self.device[:header].view(torch.int32).view(stages, max_reqs)
        self.no_slots = torch.empty(0, dtype=torch.int64, device=device)
        self.cursor = self.start
        self._seq_lens_views: dict[int, tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] = {}
        self._regions: dict[tuple, Region] = {}

    def seq_lens_views(self, num_reqs: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Each stage's first `num_reqs` sequence lengths: host tensors and device tensors, by stage - 1."""
        views = self._seq_lens_views.get(num_reqs)
        if views is None:
            host = torch.from_numpy(self.seq_lens_host[:, :num_reqs])
            views = self._seq_lens_views[num_reqs] = (host.unbind(0), self._seq_lens_device[:, :num_reqs].unbind(0))
        return views

    def reset(self) -> None:
        """Start a step's packed arrays at the first place after the sequence lengths."""
        self.cursor = self.start

    def take(self, dtype: type, shape: tuple[int, int]) -> Region:
        """The next place for an array of `shape`, after those the step took before."""
        itemsize = np.dtype(dtype).itemsize
        offset = self.cursor + -self.cursor % itemsize
        self.cursor = offset + itemsize * shape[0] * shape[1]
        if self.cursor > len(self.host):
            raise RuntimeError(f"ADSC's stage buffers hold {len(self.host)} bytes; this step needs {self.cursor}.")
        key = (offset, dtype, shape)
        region = self._regions.get(key)
        if region is None:
            if len(self._regions) > 4096:  # steps repeat their sizes (decode); keep the views of recent ones
                self._regions.clear()
            host = self._host_bytes[offset : self.cursor].view(dtype).reshape(shape)
            device = self.device[offset : self.cursor].view(TORCH_DTYPES[dtype]).view(shape)
            region = self._regions[key] = Region(host, torch.from_numpy(host).unbind(0), device.unbind(0))
        return region

    def send(self) -> None:
        """Copy what this step wrote to the device: one non-blocking copy. It runs inside vLLM's
        `synchronize_input_prep`, so the next step writes the host buffer only once this copy is done."""
        self.device[: self.cursor].copy_(self.host[: self.cursor], non_blocking=True)


TORCH_DTYPES = {np.int32: torch.int32, np.int64: torch.int64}


@dataclass
class StepInputs:
    """One step's plan and the tensors made from it (views of `StageBuffers`), by stage - 1: device tensors, and
    host tensors (`_cpu`) where vLLM's metadata has both. The last four are None in steps that drop nothing."""

    plan: StepPlan
    seq_lens: tuple[torch.Tensor, ...]
    seq_lens_cpu: tuple[torch.Tensor, ...]
    query_start_loc: tuple[torch.Tensor, ...] | None = None
    query_start_loc_cpu: tuple[torch.Tensor, ...] | None = None
    rows: list[torch.Tensor] | None = None
    from_previous: list[torch.Tensor] | None = None


def shallow_copy(metadata):
    """A copy of a metadata dataclass sharing its fields' values (`copy.copy`, without its generic protocol)."""
    copied = object.__new__(type(metadata))
    copied.__dict__.update(metadata.__dict__)
    return copied


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
        step = self.step
        if step is None:
            # A dummy run: every row, at its position. The sequence lengths still come from the stage's buffer, whose
            # address a captured CUDA graph keeps.
            stage_common = shallow_copy(common)
            seq_lens = self.buffers.seq_lens_views(len(common.seq_lens))[1][stage - 1]
            seq_lens.copy_(common.seq_lens)
            stage_common.seq_lens = seq_lens
            return stage_common
        if stage > len(step.plan.stages):
            return common  # the stage has no row in this step: its layers do not run
        plan = step.plan.stages[stage - 1]
        stage_common = shallow_copy(common)
        stage_common.seq_lens = step.seq_lens[stage - 1]
        stage_common.seq_lens_cpu_upper_bound = step.seq_lens_cpu[stage - 1]
        stage_common.max_seq_len = plan.max_seq_len
        if plan.rows is not None:
            stage_common.query_start_loc = step.query_start_loc[stage - 1]
            stage_common.query_start_loc_cpu = step.query_start_loc_cpu[stage - 1]
            stage_common.num_actual_tokens = plan.num_rows
            stage_common.max_query_len = plan.max_query_len
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
            updated = shallow_copy(metadata)
            updated.block_table, updated.slot_mapping = block_table, slot_mapping
            return updated

    return subclass_attention_backend("AdscStage", backend, StageMetadataBuilder)


class AdscModelRunnerMixin:
    """vLLM's V1 model runner, planning each step's stages (see the module's docstring)."""

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        self.stage_inputs: StageInputs = self.get_model().stage_inputs
        self.vision_schedule = self.stage_inputs.schedule
        self.request_images = ImagesByRequest(self.vision_schedule, self.requests)
        self._batch_images: tuple[list[str], BatchImages] | None = None
        self._step_plan: StepPlan | None = None

    def profile_run(self, *args, **kwargs) -> None:
        super().profile_run(*args, **kwargs)
        # Compile the stages of steps that drop tokens at start-up (where vLLM compiles its own graphs), not at the
        # first request with an image.
        num_rows, started = min(16, self.max_num_tokens), time.perf_counter()
        with set_forward_context(None, self.vllm_config, num_tokens=num_rows):
            if self.get_model().warm_up_stages(num_rows):
                seconds = time.perf_counter() - started
                logger.info("ADSC-LLaVA: compiled the stages of steps that drop tokens in %.1f s", seconds)

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
        self.stage_group_layers = [(index, groups[index].layer_names) for index in self.stage_groups]
        # Each stage group's stage - 1, and the stage groups of each stage (positions in `stage_groups`).
        self.stage_index_of_group = np.array([groups[index].kv_cache_spec.stage - 1 for index in self.stage_groups])
        self.groups_of_stage = [
            np.flatnonzero(self.stage_index_of_group == stage) for stage in range(self.vision_schedule.num_stages - 1)
        ]
        self.stage_inputs.buffers = StageBuffers(
            self.vision_schedule.num_stages,
            len(self.stage_groups),
            self.max_num_reqs,
            self.max_num_tokens,
            self.device,
        )

    def may_reinitialize_input_batch(self, kv_cache_config) -> None:
        super().may_reinitialize_input_batch(kv_cache_config)
        # The stage groups' slots come from their compact indices (`_send_step`), not from positions: vLLM need not
        # compute them (as for the state caches of Mamba layers, which have no token slots).
        for index in self.stage_groups:
            self.input_batch.block_table[index].slot_mapping_mode = SlotMappingMode.NONE
        if self.stage_groups:
            self._stack_block_tables()

    def _stack_block_tables(self) -> None:
        """Keep the stage groups' host block tables in one array, `(G, max_reqs, max_blocks)`, so that one gather
        reads the slots of every group. Each group's `BlockTable` works on its own slice of it: vLLM writes a
        block table's rows in place (`block_table.np`, `.cpu`), and copies `.cpu` to the device."""
        tables = [self.input_batch.block_table[index] for index in self.stage_groups]
        if len({table.block_table.cpu.shape for table in tables}) > 1 or len({t.block_size for t in tables}) > 1:
            raise NotImplementedError(
                "ADSC-LLaVA in vLLM needs one block size for every stage's KV cache groups, got "
                f"{sorted({table.block_size for table in tables})}."
            )
        stacked = torch.zeros(
            (len(tables), *tables[0].block_table.cpu.shape), dtype=torch.int32, pin_memory=tables[0].pin_memory
        )
        for table, stacked_table in zip(tables, stacked, strict=True):
            buffer = stacked_table.copy_(table.block_table.cpu)
            if table.block_table.gpu is table.block_table.cpu:
                table.block_table.gpu = buffer  # the CPU runner's kernels read the host table itself
            table.block_table.cpu, table.block_table.np = buffer, buffer.numpy()
        self.stacked_block_tables = stacked.numpy().reshape(-1)
        self.stage_block_size, self.block_table_width = tables[0].block_size, stacked.shape[2]
        self.group_table_start = np.arange(len(tables)) * (stacked.shape[1] * stacked.shape[2])

    def _on_request_state_removed(self, req_id: str, req_state) -> None:
        self.request_images.forget(req_id)
        super()._on_request_state_removed(req_id, req_state)

    def _images_of_batch(self, req_ids: list[str]) -> BatchImages:
        """The batch's images, updated in the rows whose request changed (vLLM adds a request in a free row and
        moves a few rows when requests leave)."""
        if self._batch_images is not None:
            previous_ids, previous = self._batch_images
            if previous_ids == req_ids:
                return previous
            rows = [row for row, (new, old) in enumerate(zip(req_ids, previous_ids, strict=False)) if new is not old]
            rows += range(len(previous_ids), len(req_ids))
            if 2 * len(rows) <= len(req_ids):
                images = previous.with_rows(len(req_ids), rows, [self.request_images[req_ids[row]] for row in rows])
                self._batch_images = (list(req_ids), images)
                return images
        requests = [self.request_images[req_id] for req_id in req_ids]
        self._batch_images = (list(req_ids), BatchImages.of(requests, self.vision_schedule.num_stages))
        return self._batch_images[1]

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens: np.ndarray):
        prepared = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        self._step_plan = self._plan_step(num_scheduled_tokens) if self.stage_groups else None
        return prepared

    def _plan_step(self, num_scheduled_tokens: np.ndarray) -> StepPlan:
        num_reqs = self.input_batch.num_reqs
        return plan_step(
            self.vision_schedule,
            self._images_of_batch(self.input_batch.req_ids),
            self.input_batch.num_computed_tokens_cpu[:num_reqs],
            num_scheduled_tokens,
            self.req_indices.np[: int(num_scheduled_tokens.sum())],
        )

    def _get_slot_mappings(self, num_tokens_padded, num_reqs_padded, num_tokens_unpadded, ubatch_slices=None):
        by_group, by_layer = super()._get_slot_mappings(
            num_tokens_padded, num_reqs_padded, num_tokens_unpadded, ubatch_slices
        )
        if by_group is None or not self.stage_groups:
            return by_group, by_layer
        buffers, plan, self._step_plan = self.stage_inputs.buffers, self._step_plan, None
        buffers.reset()
        if plan is None:
            # A dummy run: the stage groups write nowhere (the runner fills their slots with -1), from the places a
            # step of this size that drops nothing uses (a captured CUDA graph keeps them).
            self.stage_inputs.step = None
            slots = buffers.take(np.int64, (len(self.stage_groups), num_tokens_padded)).device_rows
        else:
            self.stage_inputs.step, slots = self._send_step(plan, num_tokens_padded, num_reqs_padded)
        for slot_mapping, (group, layer_names) in zip(slots, self.stage_group_layers, strict=True):
            by_group[group] = slot_mapping
            for layer_name in layer_names:
                by_layer[layer_name] = slot_mapping
        return by_group, by_layer

    def _send_step(self, plan: StepPlan, num_tokens_padded: int, num_reqs_padded: int):
        """Write the step's stage inputs into the host buffer, send them, and return them and each stage group's
        slot mapping (device views)."""
        buffers, num_reqs, num_stages = self.stage_inputs.buffers, self.input_batch.num_reqs, len(plan.stages)
        seq_lens_cpu, seq_lens = buffers.seq_lens_views(num_reqs_padded)
        buffers.seq_lens_host[:num_stages, :num_reqs] = plan.seq_lens
        buffers.seq_lens_host[:num_stages, num_reqs:num_reqs_padded] = 0
        if not plan.drops:
            step = StepInputs(plan, seq_lens, seq_lens_cpu)
            slots = self._write_slots(plan.compact, plan.stages[0].request, num_tokens_padded)
        else:
            query_start_loc = buffers.take(np.int32, (num_stages, num_reqs + 1))
            query_start_loc.host[:] = plan.query_start_loc
            slots = [buffers.no_slots] * len(self.stage_groups)
            for stage_plan, groups in zip(plan.stages, self.groups_of_stage, strict=False):
                stage_slots = self._write_slots(stage_plan.compact[None], stage_plan.request, None, groups)
                for group, slot_mapping in zip(groups, stage_slots, strict=True):
                    slots[group] = slot_mapping
            rows = buffers.take(np.int64, (2, len(plan.rows)))
            rows.host[0], rows.host[1] = plan.rows, plan.from_previous
            bounds = np.cumsum([0] + [stage_plan.num_rows for stage_plan in plan.stages]).tolist()
            parts = [slice(start, stop) for start, stop in zip(bounds, bounds[1:], strict=False)]
            step = StepInputs(
                plan,
                seq_lens,
                seq_lens_cpu,
                query_start_loc.device_rows,
                query_start_loc.host_rows,
                [rows.device_rows[0][part] for part in parts],
                [rows.device_rows[1][part] for part in parts],
            )
        buffers.send()
        return step, slots

    def _write_slots(self, compact: np.ndarray, request: np.ndarray, num_tokens_padded: int | None, groups=None):
        """Write stage groups' slot mappings into the stage buffers, one row per group, with a few array operations
        whatever the number of groups, and return their device views.

        Args:
            compact: `(S, t)`, compact indices of the `t` rows by stage (stage 1 first), or `(1, t)` for one stage.
            request: `(t,)`, each row's request.
            num_tokens_padded: the rows to fill (padding rows get slot -1: no write); None for `t`.
            groups: the stage groups to write (positions in `stage_groups`), all of one stage; None for every
                stage group, each reading its own stage's row of `compact`.
        """
        block, offset = np.divmod(compact, self.stage_block_size)
        block += request * self.block_table_width  # entry of (request, block) in a group's flat block table
        if groups is None:
            groups, block, offset = slice(None), block[self.stage_index_of_group], offset[self.stage_index_of_group]
        block = block + self.group_table_start[groups][:, None]
        num_rows = compact.shape[1]
        region = self.stage_inputs.buffers.take(np.int64, (len(block), num_tokens_padded or num_rows))
        slots = region.host[:, :num_rows]
        np.multiply(self.stacked_block_tables[block], self.stage_block_size, out=slots)
        slots += offset
        region.host[:, num_rows:] = -1
        return region.device_rows

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
