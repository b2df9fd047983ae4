"""Which token rows each ADSC stage computes on in one vLLM step, and where those rows' keys and values are cached.

vLLM flattens a step's requests into one row per scheduled token: request `i` owns rows
`query_start_loc[i]:query_start_loc[i + 1]`, at consecutive positions ending at `seq_lens[i] - 1`. A stage is the
run of decoder layers from one pruning layer to the next. In stage `s` every image keeps the vision tokens ADSC's
rule leaves alive after `s` pruning layers (`AdscLlavaConfig.surviving_vision_offsets`); text is never dropped.

A stage's layers cache only the tokens they see, packed: the `c`-th token a request keeps in stage `s` is stored at
the slot of position `c` (its *compact index*) in the request's block table, so a stage's attention reads a plain
causal sequence of `seq_lens[i] - dropped` tokens. Tokens keep their original positions for RoPE. Decode tokens are
text: each one lands right after the request's packed prompt.

Everything here is a pure function of token ids, positions and the step's metadata; the only state across steps is
each running request's `Progress` (tokens dropped so far per stage, and an image a chunked prefill cut short).
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VisionSchedule:
    """ADSC's schedule as the engine needs it.

    Attributes:
        tokens_per_image: `n`, the placeholder tokens of one image (LLaVA-1.5: 576; every image has as many).
        pruning_layers: the first decoder layer of each stage after the first.
        alive: `alive[s][j]` is True when offset `j` of an image is still alive in stage `s + 1`, shape
            `(num_pruning_layers, tokens_per_image)`.
    """

    tokens_per_image: int
    pruning_layers: tuple[int, ...]
    alive: torch.BoolTensor

    @classmethod
    def from_config(cls, config) -> "VisionSchedule":
        """The schedule of an `AdscLlavaConfig` (LLaVA-1.5: every image has `image_seq_length` tokens)."""
        return cls.from_offsets(
            config.image_seq_length,
            config.adsc_pruning_layers,
            config.surviving_vision_offsets(config.image_seq_length),
        )

    @classmethod
    def from_offsets(cls, tokens_per_image: int, pruning_layers, surviving_offsets) -> "VisionSchedule":
        alive = torch.zeros(len(pruning_layers), tokens_per_image, dtype=torch.bool)
        for stage, offsets in enumerate(surviving_offsets):
            alive[stage, offsets] = True
        return cls(tokens_per_image, tuple(pruning_layers), alive)


def layer_stages(num_layers: int, pruning_layers: tuple[int, ...]) -> list[int]:
    """The stage of each decoder layer: 0 before the first pruning layer, `s` from the `s`-th one on."""
    return [sum(layer >= pruning for pruning in pruning_layers) for layer in range(num_layers)]


def dropped_prefixes(schedule: VisionSchedule) -> list[tuple[int, ...]]:
    """For each stage, how many of an image's first `j` placeholder tokens it has dropped, `j = 0 .. n`."""
    prefixes = [(0,) * (schedule.tokens_per_image + 1)]
    for alive in schedule.alive:
        prefixes.append((0, *torch.cumsum((~alive).long(), 0).tolist()))
    return prefixes


@dataclass
class StagePlan:
    """The rows one stage computes on, and its packed attention layout.

    Attributes:
        stage: `s`, the stage (1 for the layers from the first pruning layer on).
        from_previous: which of the previous stage's rows this stage keeps (indices into them), `(t_s,)`.
        step_rows: the step's rows this stage computes on (indices into all the step's rows), `(t_s,)`.
        query_start_loc: `(num_reqs + 1,)`, the stage's rows of each request.
        seq_lens: `(num_reqs,)`, tokens each request's stage layers have cached after this step.
        request: `(t_s,)`, the request of each row (-1 for padding rows).
        compact: `(t_s,)`, each row's compact index: where it goes in its request's packed stage cache.
        dropped: `(num_reqs,)`, tokens each request has dropped in this stage, this step included.
    """

    stage: int
    from_previous: torch.LongTensor
    step_rows: torch.LongTensor
    query_start_loc: torch.LongTensor
    seq_lens: torch.LongTensor
    request: torch.LongTensor
    compact: torch.LongTensor
    dropped: torch.LongTensor

    def slot_mapping(self, block_table: torch.Tensor, block_size: int) -> torch.LongTensor:
        """`(t_s,)`: the cache slot each row writes in a KV cache group whose block table is `block_table`."""
        return slot_mapping(self.request, self.compact, block_table, block_size)


def slot_mapping(
    request: torch.LongTensor, index: torch.LongTensor, block_table: torch.Tensor, block_size: int
) -> torch.LongTensor:
    """Cache slots of the tokens at `index` (compact indices, or positions) of requests `request` (-1: padding rows,
    which get slot -1), for a block table `(num_reqs, max_blocks)` of blocks of `block_size` tokens."""
    real = request >= 0
    slots = torch.full_like(index, -1)
    slots[real] = block_table[request[real], index[real] // block_size].long() * block_size + index[real] % block_size
    return slots


def image_offsets(
    is_vision: torch.BoolTensor,
    query_start_loc: torch.LongTensor,
    open_image_tokens: torch.LongTensor,
    tokens_per_image: int,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Each row's offset within its image (`-1` for text rows), and each request's unfinished image after the step.

    `is_vision` marks the rows that hold image features (vLLM's `is_multimodal`: not the token id, which a request
    may also generate). An image is `tokens_per_image` consecutive such rows; back-to-back images form one run. vLLM
    may cut an image between two steps (chunked prefill): `open_image_tokens[i]` says how many of an image request
    `i`'s previous steps already held, so its first rows continue that image.

    Returns:
        offsets `(T,)`, and the placeholder tokens of an image each request leaves unfinished, `(R,)`.
    """
    n, num_rows, num_reqs = tokens_per_image, len(is_vision), len(query_start_loc) - 1
    starts, ends = query_start_loc[:-1], query_start_loc[1:]
    row = torch.arange(num_rows)
    request_of_row = torch.full((num_rows,), -1, dtype=torch.long)
    request_of_row[: int(ends[-1])] = torch.repeat_interleave(torch.arange(num_reqs), ends - starts)
    is_vision = is_vision & (request_of_row >= 0)
    first_is_vision = is_vision[starts.clamp(max=num_rows - 1)] & (ends > starts)
    if bool(((open_image_tokens > 0) & ~first_is_vision).any()):
        raise ValueError("a request left an image unfinished, then went on with text.")
    offsets, open_after = torch.full((num_rows,), -1, dtype=torch.long), torch.zeros_like(open_image_tokens)
    continues_run = torch.zeros_like(is_vision)
    continues_run[1:] = is_vision[:-1] & (request_of_row[1:] == request_of_row[:-1])
    run_start = is_vision & ~continues_run
    if not bool(run_start.any()):
        return offsets, open_after
    first_row = row[run_start]
    run_request = request_of_row[first_row]
    run_of_row = torch.cumsum(run_start.long(), 0) - 1
    run_length = torch.bincount(run_of_row[is_vision], minlength=len(first_row))
    # A run at the start of a request's rows continues the image its previous step left unfinished.
    carried = torch.where(first_row == starts[run_request], open_image_tokens[run_request], 0)
    offsets[is_vision] = (carried[run_of_row] + row - first_row[run_of_row])[is_vision] % n
    unfinished = (carried + run_length) % n
    at_request_end = first_row + run_length == ends[run_request]
    if bool((unfinished.bool() & ~at_request_end).any()):
        raise ValueError(f"a run of image placeholder tokens is not a whole number of images of {n} tokens.")
    open_after[run_request[at_request_end]] = unfinished[at_request_end]
    return offsets, open_after


@dataclass
class Progress:
    """What a request's earlier steps leave to its next one.

    Attributes:
        dropped: `(R, K)`, tokens each request has dropped per stage so far.
        open_image_tokens: `(R,)`, placeholder tokens of an image a step cut short (chunked prefill).
    """

    dropped: torch.LongTensor
    open_image_tokens: torch.LongTensor


def plan_stages(
    is_vision: torch.BoolTensor,
    positions: torch.LongTensor,
    query_start_loc: torch.LongTensor,
    seq_lens: torch.LongTensor,
    before: Progress,
    schedule: VisionSchedule,
) -> tuple[list[StagePlan], Progress]:
    """The plan of every stage after the first for one step (all tensors on the CPU), and the requests' progress.

    Args:
        is_vision, positions: `(T,)`, the step's rows: image feature rows, and positions (rows past
            `query_start_loc[-1]` are padding and are kept).
        query_start_loc: `(R + 1,)`; seq_lens: `(R,)`, as in vLLM's metadata.
        before: the requests' progress after their earlier steps (`RequestProgress`).
    """
    num_rows, num_reqs = len(positions), len(seq_lens)
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    num_real = int(query_start_loc[-1])
    request_of_row = torch.repeat_interleave(torch.arange(num_reqs), query_lens)
    offsets, open_after = image_offsets(
        is_vision, query_start_loc, before.open_image_tokens, schedule.tokens_per_image
    )
    is_vision = offsets >= 0
    plans, previous_rows = [], torch.arange(num_rows)
    for stage, alive in enumerate(schedule.alive):
        kept = ~is_vision | alive[offsets.clamp(min=0)]
        dropped_rows = (~kept).long()
        # Tokens a request dropped in this step before each row (the request's rows are contiguous).
        dropped_cumulative = torch.cumsum(dropped_rows, 0) - dropped_rows
        dropped_in_step = torch.zeros(num_reqs, dtype=torch.long).index_add_(
            0, request_of_row, dropped_rows[:num_real]
        )
        rows = torch.nonzero(kept).squeeze(1)
        real = rows[rows < num_real]
        request = request_of_row[real]
        dropped_earlier_in_step = dropped_cumulative[real] - dropped_cumulative[query_start_loc[request]]
        compact = torch.full((len(rows),), -1, dtype=torch.long)
        compact[: len(real)] = positions[real] - before.dropped[request, stage] - dropped_earlier_in_step
        dropped = before.dropped[:, stage] + dropped_in_step
        plans.append(
            StagePlan(
                stage=stage + 1,
                from_previous=torch.searchsorted(previous_rows, rows),
                step_rows=rows,
                query_start_loc=torch.cat(
                    [torch.zeros(1, dtype=torch.long), torch.cumsum(query_lens - dropped_in_step, 0)]
                ),
                seq_lens=seq_lens.long() - dropped,
                request=torch.cat([request, torch.full((len(rows) - len(real),), -1, dtype=torch.long)]),
                compact=compact,
                dropped=dropped,
            )
        )
        previous_rows = rows
    after = Progress(torch.stack([plan.dropped for plan in plans], dim=1), open_after)
    return plans, after


class RequestProgress:
    """Each running request's `Progress` across the steps of its prefill.

    vLLM's model forward sees no request ids, so a request is named by the first block of its block table, which
    stays its own while it runs. A request whose step starts at position 0 is new (or recomputed after preemption):
    it starts from nothing, so a block reused by a later request never passes on a stale count.
    """

    def __init__(self, num_stages: int) -> None:
        self.num_stages = num_stages
        self.by_first_block: dict[int, tuple[list[int], int]] = {}

    def before(self, first_blocks: list[int], first_positions: list[int]) -> Progress:
        fresh = ([0] * self.num_stages, 0)
        known = [
            fresh if position == 0 else self.by_first_block.get(block, fresh)
            for block, position in zip(first_blocks, first_positions, strict=True)
        ]
        dropped = torch.tensor([counts for counts, _ in known], dtype=torch.long).reshape(-1, self.num_stages)
        return Progress(dropped, torch.tensor([open_tokens for _, open_tokens in known], dtype=torch.long))

    def update(self, first_blocks: list[int], after: Progress) -> None:
        for block, counts, open_tokens in zip(
            first_blocks, after.dropped.tolist(), after.open_image_tokens.tolist(), strict=True
        ):
            self.by_first_block[block] = (counts, open_tokens)
