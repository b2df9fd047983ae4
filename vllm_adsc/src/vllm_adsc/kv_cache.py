"""Per-stage KV cache: the layers of each ADSC stage form their own KV cache groups, which hold only the tokens the
stage keeps (text, and each image's survivors), so deeper stages allocate fewer blocks per request.

vLLM gives layers with different KV cache specs separate groups (its hybrid KV cache manager, the one sliding-window
models use); each group gets its own block table from one shared block pool and a manager that decides how many
blocks a request needs. Here:

- `AdscStageSpec`: full attention, tagged with its stage and the stage's keep rule, so stages never share a group;
- `AdscStageManager`: full attention's manager, asked for `stage_tokens(request, n)` slots instead of `n`;
- `AdscScheduler`: vLLM's scheduler, lending its managers the live requests, whose image placeholder ranges say how
  many of a request's first `n` tokens a stage drops;
- `AdscConfigHook`: selects that scheduler (and turns prefix caching and full CUDA graphs off) when vLLM builds its
  config for an ADSC checkpoint.

The model (`model.AdscLlavaForConditionalGeneration`) packs each stage's tokens into those blocks in the same order.
"""

from dataclasses import dataclass

from vllm.config import CUDAGraphMode
from vllm.logger import init_logger
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, replace_as
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

logger = init_logger(__name__)


@dataclass(frozen=True, kw_only=True)
class AdscStageSpec(FullAttentionSpec):
    """Full attention over the tokens one ADSC stage keeps.

    Attributes:
        stage: 0 for the layers before the first pruning layer, `s` for those from the `s`-th on.
        dropped_prefix: `dropped_prefix[j]` is how many of an image's first `j` placeholder tokens the stage has
            dropped (length `tokens_per_image + 1`; all zeros for stage 0).
    """

    stage: int = 0
    dropped_prefix: tuple[int, ...] = ()

    @classmethod
    def from_spec(cls, spec: FullAttentionSpec, stage: int, dropped_prefix: tuple[int, ...]) -> "AdscStageSpec":
        return replace_as(spec, cls, stage=stage, dropped_prefix=dropped_prefix)

    @classmethod
    def merge(cls, specs: list["AdscStageSpec"]) -> "AdscStageSpec":
        if not all(isinstance(spec, AdscStageSpec) for spec in specs) or len({s.stage for s in specs}) != 1:
            raise AssertionError("ADSC stages never share a KV cache group.")
        # Full attention's own merge (it checks the attention fields agree), called as FullAttentionSpec's: it builds
        # `cls(...)` from those fields alone, which for this class would lose the stage.
        merged = FullAttentionSpec.merge.__func__(FullAttentionSpec, specs)
        return cls.from_spec(merged, specs[0].stage, specs[0].dropped_prefix)

    def is_uniform_with_collection(self, kv_cache_specs: dict) -> bool:
        return all(isinstance(s, AdscStageSpec) and s.stage == self.stage for s in kv_cache_specs.values())

    def stage_tokens(self, num_tokens: int, image_offsets: list[int]) -> int:
        """Tokens of a request's first `num_tokens` this stage keeps, given where its images start."""
        tokens_per_image = len(self.dropped_prefix) - 1
        dropped = sum(
            self.dropped_prefix[min(num_tokens - offset, tokens_per_image)]
            for offset in image_offsets
            if offset < num_tokens
        )
        return num_tokens - dropped


class AdscStageManager(FullAttentionManager):
    """Full attention's block manager, sized by the tokens the group's stage keeps.

    `requests` is the scheduler's own table of live requests (`AdscScheduler` lends it).
    """

    requests: dict | None = None

    def _stage_tokens(self, request_id: str, num_tokens: int) -> int:
        if self.requests is None:
            raise RuntimeError(
                "ADSC's per-stage KV cache needs vllm_adsc's scheduler (vllm_adsc.kv_cache.adsc_scheduler); a "
                "custom --scheduler-cls replaced it."
            )
        request = self.requests[request_id]
        offsets = [feature.mm_position.offset for feature in request.mm_features if feature.modality == "image"]
        return self.kv_cache_spec.stage_tokens(num_tokens, offsets)

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, *args, **kwargs) -> int:
        return super().get_num_blocks_to_allocate(
            request_id, self._stage_tokens(request_id, num_tokens), *args, **kwargs
        )

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int) -> list:
        return super().allocate_new_blocks(
            request_id,
            self._stage_tokens(request_id, num_tokens),
            self._stage_tokens(request_id, num_tokens_main_model),
        )


def _register_stage_spec() -> None:
    # vLLM registers its own specs on first use, and only if the registry is empty, so they go first (the check with
    # no specs makes it register them); then ours, as its own type, so that stages never merge with each other.
    KVCacheSpecRegistry.check_kv_cache_spec_registry({})
    KVCacheSpecRegistry.register(AdscStageSpec, AdscStageManager, uniform_type_base_spec=AdscStageSpec)


_register_stage_spec()


class _LendRequestsToStageManagers:
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            if isinstance(manager, AdscStageManager):
                manager.requests = self.requests


class AdscScheduler(_LendRequestsToStageManagers, Scheduler):
    """vLLM's scheduler whose per-stage KV managers see each request's image placeholder ranges."""


class AdscAsyncScheduler(_LendRequestsToStageManagers, AsyncScheduler):
    """`AdscScheduler` for vLLM's asynchronous scheduling."""


def adsc_scheduler(*, vllm_config, **kwargs) -> Scheduler:
    """The engine's scheduler: `AdscAsyncScheduler` or `AdscScheduler`, as vLLM resolved `async_scheduling` (which it
    does after the config hook has run, so the hook names this function rather than a class)."""
    scheduler_class = AdscAsyncScheduler if vllm_config.scheduler_config.async_scheduling else AdscScheduler
    return scheduler_class(vllm_config=vllm_config, **kwargs)


SCHEDULER = f"{__name__}.adsc_scheduler"


class AdscConfigHook:
    """vLLM's per-architecture config hook (`vllm.model_executor.models.config.VerifyAndUpdateConfig`)."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        scheduler_config = vllm_config.scheduler_config
        if scheduler_config.scheduler_cls is None:
            scheduler_config.scheduler_cls = SCHEDULER
        elif scheduler_config.scheduler_cls != SCHEDULER:
            raise ValueError(
                f"ADSC-LLaVA needs its scheduler ({SCHEDULER}) for per-stage KV blocks, but --scheduler-cls is "
                f"{scheduler_config.scheduler_cls}."
            )
        compilation_config = vllm_config.compilation_config
        if compilation_config.cudagraph_mode is None or compilation_config.cudagraph_mode.has_full_cudagraphs():
            # Each step's stage metadata is built in Python: a graph that captured attention would replay another's.
            logger.info("ADSC-LLaVA: CUDA graphs capture everything but attention (PIECEWISE).")
            compilation_config.cudagraph_mode = CUDAGraphMode.PIECEWISE
        unsupported = {
            # These start requests past their first token, split their positions or their steps, or verify drafted
            # tokens, none of which the stage plan sees.
            "KV transfer connectors": vllm_config.kv_transfer_config is not None,
            "context parallelism": vllm_config.parallel_config.decode_context_parallel_size > 1,
            "micro-batching (--enable-dbo)": vllm_config.parallel_config.enable_dbo,
            "speculative decoding": vllm_config.speculative_config is not None,
        }
        if refused := [name for name, used in unsupported.items() if used]:
            raise NotImplementedError(f"ADSC-LLaVA in vLLM does not support {', '.join(refused)} yet.")
        if vllm_config.cache_config.enable_prefix_caching:
            # A cache hit would start a request past its first token (the stage plan restarts a request's progress at
            # position 0) and past its images, and stage groups cache no block hashes yet.
            logger.info("ADSC-LLaVA: prefix caching is not supported yet; turning it off.")
            vllm_config.cache_config.enable_prefix_caching = False

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return
