"""Per-stage KV cache: the layers of each ADSC stage form their own KV cache groups, which hold only the tokens the
stage keeps (text, and each image's survivors), so deeper stages allocate fewer blocks per request.

vLLM gives layers with different KV cache specs separate groups (its hybrid KV cache manager, the one sliding-window
models use); each group gets its own block table from one shared block pool and a manager that decides how many
blocks a request needs. Here:

- `AdscStageSpec`: full attention, tagged with its stage, so stages never share a group;
- `AdscStageManager`: full attention's manager, asked for the slots of the tokens its stage keeps instead of all of
  them (`stages.RequestImages.kept`, the closed form the model's stage plan uses too), and caching for prefix reuse
  only the blocks before a request's first image, where every stage holds the same tokens at the same places;
- `StageCounts`: each live request's `RequestImages`, made once from its image placeholder ranges and lent to the
  managers by the scheduler (`engine.AdscScheduler`).
"""

from dataclasses import dataclass

from vllm.utils.math_utils import cdiv
from vllm.v1.core.kv_cache_coordinator import HybridKVCacheCoordinator, KVCacheCoordinatorNoPrefixCache
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, replace_as
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from vllm_adsc.stages import ImagesByRequest, VisionSchedule


@dataclass(frozen=True, kw_only=True)
class AdscStageSpec(FullAttentionSpec):
    """Full attention over the tokens one ADSC stage keeps.

    Attributes:
        stage: 0 for the layers before the first pruning layer, `s` for those from the `s`-th on.
    """

    stage: int = 0

    @classmethod
    def from_spec(cls, spec: FullAttentionSpec, stage: int) -> "AdscStageSpec":
        if type(spec) is not FullAttentionSpec:
            raise NotImplementedError(
                "ADSC-LLaVA in vLLM runs full-attention text models; this layer's KV cache is a "
                f"{type(spec).__name__} (sliding-window attention?)."
            )
        return replace_as(spec, cls, stage=stage)

    @classmethod
    def merge(cls, specs: list["AdscStageSpec"]) -> "AdscStageSpec":
        if not all(isinstance(spec, AdscStageSpec) for spec in specs) or len({s.stage for s in specs}) != 1:
            raise AssertionError("ADSC stages never share a KV cache group.")
        # Full attention's own merge (it checks the attention fields agree), called as FullAttentionSpec's: it builds
        # `cls(...)` from those fields alone, which for this class would lose the stage.
        merged = FullAttentionSpec.merge.__func__(FullAttentionSpec, specs)
        return replace_as(merged, cls, stage=specs[0].stage)

    def is_uniform_with_collection(self, kv_cache_specs: dict) -> bool:
        return all(isinstance(s, AdscStageSpec) and s.stage == self.stage for s in kv_cache_specs.values())


class StageCounts(ImagesByRequest):
    """Each live request's `RequestImages`, by request id, and the latest answer of `kept`: the KV cache coordinator
    asks every group, three times per request and step, with the same token count."""

    def __init__(self, schedule: VisionSchedule, requests: dict) -> None:
        super().__init__(schedule, requests)
        self._latest: tuple[str, int, tuple[int, ...]] = ("", -1, ())

    def kept(self, request_id: str, num_tokens: int) -> tuple[int, ...]:
        """Of a request's first `num_tokens` tokens, how many each stage keeps."""
        latest_id, latest_tokens, kept = self._latest
        if latest_tokens != num_tokens or latest_id != request_id:
            images = self[request_id]
            if num_tokens >= images.end:  # every image in (decode): Python ints, no array
                kept = tuple(num_tokens - dropped for dropped in images.total_counts)
            else:
                kept = tuple((num_tokens - images.dropped(num_tokens)).tolist())
            self._latest = (request_id, num_tokens, kept)
        return kept


class AdscStageManager(FullAttentionManager):
    """Full attention's block manager, sized by the tokens the group's stage keeps.

    `counts` is lent by the scheduler (`engine.AdscScheduler`).
    """

    counts: StageCounts | None = None

    def _kept(self, request_id: str, num_tokens: int) -> int:
        if self.counts is None:
            raise RuntimeError(
                "ADSC's per-stage KV cache needs vllm_adsc's scheduler (vllm_adsc.engine.adsc_scheduler); a "
                "custom --scheduler-cls replaced it."
            )
        return self.counts.kept(request_id, num_tokens)[self.kv_cache_spec.stage]

    def get_num_blocks_to_allocate(
        self, request_id: str, num_tokens: int, new_computed_blocks, *args, **kwargs
    ) -> int:
        kept = self._kept(request_id, num_tokens)
        if not new_computed_blocks:
            # Full attention skips no token and, without prefix-cache hits, needs exactly the blocks it lacks (vLLM's
            # own count, without its checks for windows and hits: this runs per group and request every step).
            return max(cdiv(kept, self.block_size) - len(self.req_to_blocks.get(request_id, ())), 0)
        # The other token counts (computed, prefix-cached) never pass a request's first image, where every stage
        # keeps every token.
        return super().get_num_blocks_to_allocate(request_id, kept, new_computed_blocks, *args, **kwargs)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int) -> list:
        return super().allocate_new_blocks(
            request_id, self._kept(request_id, num_tokens), self._kept(request_id, num_tokens_main_model)
        )

    def cache_blocks(self, request, num_tokens: int, *args, **kwargs) -> None:
        # A block hash names the tokens at a block's positions; past a request's first image a stage's block holds
        # other tokens (the packed survivors), so only the blocks before it are offered for reuse, in every stage.
        images = self.counts[request.request_id]
        if len(images.starts):
            num_tokens = min(num_tokens, int(images.starts[0]))
        super().cache_blocks(request, num_tokens, *args, **kwargs)


class NoNewBlocks(KVCacheBlocks):
    """vLLM's shared "no new blocks" answer (`KVCacheManager.empty_kv_cache_blocks`), which the scheduler asks for
    each running request's new block ids in every step: here without a loop over the 16 groups of a 7B model."""

    def get_block_ids(self, allow_none: bool = False, *, group_ids=None):
        if allow_none:
            return None
        return super().get_block_ids(allow_none, group_ids=group_ids)


def _stage_coordinator(base: type) -> type:
    """`base`, a coordinator of vLLM's KV cache groups, asking each stage once per request rather than each group.

    The groups of one stage hold the same number of blocks for a request (they are asked for the same tokens at the
    same times), so a running request's new blocks are counted per stage, once per step (the count made for
    `get_num_blocks_to_allocate` is the one `allocate_new_blocks` uses), and groups are asked to allocate only where
    their stage crosses a block: vLLM's own loops make a few calls per group, request and step, which with a 7B
    model's 16 groups cost more than the rest of the scheduler. Prefix-cache hits and first allocations take vLLM's
    own path.
    """

    class StageCoordinator(base):
        counts: StageCounts

        def use_stage_counts(self, counts: StageCounts) -> None:
            self.counts = counts
            stages: dict[int, list[int]] = {}
            for index, manager in enumerate(self.single_type_managers):
                stages.setdefault(manager.kv_cache_spec.stage, []).append(index)
            # (stage, its groups, the blocks and partial prefix-cache hits of the group that stands for the stage)
            leaders = {stage: self.single_type_managers[groups[0]] for stage, groups in stages.items()}
            self.stage_groups = [
                (stage, groups, leaders[stage].req_to_blocks, leaders[stage]._partial_hit_reqs)
                for stage, groups in stages.items()
            ]
            self.block_size = self.single_type_managers[0].block_size
            self.caches_blocks = any(manager.enable_caching for manager in self.single_type_managers)
            self.no_new_blocks = tuple(() for _ in self.single_type_managers)
            self._counted: tuple[str, int, list | None] = ("", -1, None)

        def _missing_blocks(self, request_id: str, num_tokens: int) -> list[tuple[list[int], int]] | None:
            """For each stage short of blocks for `num_tokens`, its groups and how many each lacks; None for a
            request's first allocation or one that still has to copy a partly cached block (vLLM's own path)."""
            kept, missing, block_size = self.counts.kept(request_id, num_tokens), [], self.block_size
            for stage, groups, req_to_blocks, partial_hits in self.stage_groups:
                held = req_to_blocks.get(request_id)
                if not held or request_id in partial_hits:
                    return None
                need = -(-kept[stage] // block_size) - len(held)
                if need > 0:
                    missing.append((groups, need))
            return missing

        def get_num_blocks_to_allocate(
            self, request_id, num_tokens, new_computed_blocks, num_encoder_tokens, *args, **kwargs
        ):
            self._counted = ("", -1, None)
            if num_encoder_tokens == 0 and not any(new_computed_blocks):
                missing = self._missing_blocks(request_id, num_tokens)
                if missing is not None:
                    self._counted = (request_id, num_tokens, missing)
                    return sum(len(groups) * need for groups, need in missing)
            return super().get_num_blocks_to_allocate(
                request_id, num_tokens, new_computed_blocks, num_encoder_tokens, *args, **kwargs
            )

        def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model, num_encoder_tokens=0):
            counted_id, counted_tokens, missing = self._counted
            self._counted = ("", -1, None)
            if counted_id != request_id or counted_tokens != num_tokens:
                missing = self._missing_blocks(request_id, num_tokens)
            if missing is None or num_encoder_tokens or num_tokens != num_tokens_main_model:
                return super().allocate_new_blocks(request_id, num_tokens, num_tokens_main_model, num_encoder_tokens)
            if not missing:
                return self.no_new_blocks  # most decode steps: vLLM reads it as "no new blocks"
            new_blocks = tuple([] for _ in self.single_type_managers)
            for groups, _ in missing:
                for index in groups:
                    new_blocks[index].extend(
                        self.single_type_managers[index].allocate_new_blocks(
                            request_id, num_tokens, num_tokens_main_model
                        )
                    )
            return new_blocks

        def cache_blocks(self, request, num_computed_tokens: int) -> None:
            if self.caches_blocks:
                super().cache_blocks(request, num_computed_tokens)

        def remove_skipped_blocks(self, *args, **kwargs) -> None:
            return  # full attention skips no token

    StageCoordinator.__name__ = StageCoordinator.__qualname__ = f"Stage{base.__name__}"
    return StageCoordinator


STAGE_COORDINATORS = {
    base: _stage_coordinator(base) for base in (KVCacheCoordinatorNoPrefixCache, HybridKVCacheCoordinator)
}


def _register_stage_spec() -> None:
    # vLLM registers its own specs on first use, and only if the registry is empty, so they go first (the check with
    # no specs makes it register them); then ours, as its own type, so that stages never merge with each other.
    KVCacheSpecRegistry.check_kv_cache_spec_registry({})
    KVCacheSpecRegistry.register(AdscStageSpec, AdscStageManager, uniform_type_base_spec=AdscStageSpec)


_register_stage_spec()
