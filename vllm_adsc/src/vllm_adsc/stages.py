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
how many tokens each running request has dropped so far per stage (`DroppedTokens`).
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VisionSchedule:
    """ADSC's schedule as the engine needs it.

    Attributes:
        image_token_id: the placeholder id of vision tokens in `input_ids`.
        tokens_per_image: `n`, the placeholder tokens of one image (LLaVA-1.5: 576; every image has as many).
        pruning_layers: the first decoder layer of each stage after the first.
        alive: `alive[s][j]` is True when offset `j` of an image is still alive in stage `s + 1`, shape
            `(num_pruning_layers, tokens_per_image)`.
    """

    image_token_id: int
    tokens_per_image: int
    pruning_layers: tuple[int, ...]
    alive: torch.BoolTensor

    @classmethod
    def from_offsets(cls, image_token_id: int, tokens_per_image: int, pruning_layers, surviving_offsets):
        alive = torch.zeros(len(pruning_layers), tokens_per_image, dtype=torch.bool)
        for stage, offsets in enumerate(surviving_offsets):
            alive[stage, offsets] = True
        return cls(image_token_id, tokens_per_image, tuple(pruning_layers), alive)


@dataclass
class StagePlan:
    """The rows one stage computes on, and its packed attention layout.

    Attributes:
        keep: rows of the previous stage that this stage keeps (indices into the previous stage's rows), `(t_s,)`.
        rows: the step's rows this stage computes on (indices into the step's rows), `(t_s,)`.
        query_start_loc: `(num_reqs + 1,)`, the stage's rows of each request.
        seq_lens: `(num_reqs,)`, tokens each request's stage layers have cached after this step.
        slot_mapping: `(t_s,)`, the cache slot each kept row writes (its compact index in the request's block table).
        dropped: `(num_reqs,)`, tokens each request has dropped in this stage, this step included.
    """

    keep: torch.LongTensor
    rows: torch.LongTensor
    query_start_loc: torch.LongTensor
    seq_lens: torch.LongTensor
    slot_mapping: torch.LongTensor
    dropped: torch.LongTensor


def image_offsets(input_ids: torch.LongTensor, request_of_row: torch.LongTensor, schedule: VisionSchedule):
    """Each row's offset within its image, `-1` for text rows.

    An image is `tokens_per_image` consecutive placeholder rows of one request; runs of placeholders are split into
    whole images. A run of another length means an image was cut between two engine steps, which stages cannot
    handle (the rule is defined on whole images): run vLLM with `--disable-chunked-mm-input`.
    """
    is_vision = input_ids == schedule.image_token_id
    offsets = torch.full_like(input_ids, -1)
    if not bool(is_vision.any()):
        return offsets
    # Run starts: a vision row whose previous row is text or belongs to another request.
    previous_is_same_run = torch.zeros_like(is_vision)
    previous_is_same_run[1:] = is_vision[:-1] & (request_of_row[1:] == request_of_row[:-1])
    run_start = is_vision & ~previous_is_same_run
    run_id = torch.cumsum(run_start.long(), 0) - 1
    row = torch.arange(len(input_ids))
    start_row = torch.zeros(int(run_start.sum()), dtype=torch.long)
    start_row[run_id[run_start]] = row[run_start]
    offset_in_run = row - start_row[run_id.clamp(min=0)]
    run_lengths = torch.bincount(run_id[is_vision])
    if bool((run_lengths % schedule.tokens_per_image != 0).any()):
        raise ValueError(
            f"ADSC-LLaVA needs each image's {schedule.tokens_per_image} placeholder tokens in one engine step, but a "
            f"step holds runs of {sorted(set(run_lengths.tolist()))} of them: an image was split between steps. Start "
            "vLLM with --disable-chunked-mm-input (LLM(..., disable_chunked_mm_input=True))."
        )
    offsets[is_vision] = offset_in_run[is_vision] % schedule.tokens_per_image
    return offsets


def plan_stages(
    input_ids: torch.LongTensor,
    positions: torch.LongTensor,
    query_start_loc: torch.LongTensor,
    seq_lens: torch.LongTensor,
    block_table: torch.Tensor,
    block_size: int,
    dropped_before: torch.LongTensor,
    schedule: VisionSchedule,
) -> list[StagePlan]:
    """The plan of every stage after the first for one step (all tensors on the CPU).

    Args:
        input_ids, positions: `(T,)`, the step's rows (rows past `query_start_loc[-1]` are padding and are kept).
        query_start_loc: `(R + 1,)`; seq_lens: `(R,)`; block_table: `(R, max_blocks)`, as in vLLM's metadata.
        block_size: tokens per block of `block_table`.
        dropped_before: `(R, K)`, tokens each request dropped per stage in earlier steps (`DroppedTokens`).
    """
    num_rows, num_reqs = len(input_ids), len(seq_lens)
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    num_real = int(query_start_loc[-1])
    request_of_row = torch.full((num_rows,), -1, dtype=torch.long)
    request_of_row[:num_real] = torch.repeat_interleave(torch.arange(num_reqs), query_lens)
    offsets = image_offsets(input_ids, request_of_row, schedule)
    is_vision = offsets >= 0
    plans, previous_rows = [], torch.arange(num_rows)
    for stage, alive in enumerate(schedule.alive):
        kept = ~is_vision | alive[offsets.clamp(min=0)]
        dropped_rows = (~kept).long()
        # Tokens a request dropped in this step before each row (the request's rows are contiguous).
        dropped_cumulative = torch.cumsum(dropped_rows, 0) - dropped_rows
        request_start = query_start_loc[:-1]
        dropped_in_step = torch.zeros(num_reqs, dtype=torch.long).index_add_(
            0, request_of_row[:num_real], dropped_rows[:num_real]
        )
        rows = torch.nonzero(kept).squeeze(1)
        real = rows[rows < num_real]
        request = request_of_row[real]
        start_drops = dropped_cumulative[request_start[request]]
        compact = positions[real] - dropped_before[request, stage] - (dropped_cumulative[real] - start_drops)
        slots = torch.full((len(rows),), -1, dtype=torch.long)
        block = block_table[request, compact // block_size].long()
        slots[: len(real)] = block * block_size + compact % block_size
        kept_query_lens = query_lens - dropped_in_step
        dropped = dropped_before[:, stage] + dropped_in_step
        plans.append(
            StagePlan(
                keep=torch.searchsorted(previous_rows, rows),
                rows=rows,
                query_start_loc=torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(kept_query_lens, 0)]),
                seq_lens=seq_lens.long() - dropped,
                slot_mapping=slots,
                dropped=dropped,
            )
        )
        previous_rows = rows
    return plans


class DroppedTokens:
    """How many tokens each running request has dropped per stage, across the steps of its prefill.

    vLLM's model forward sees no request ids, so a request is named by the first block of its block table, which
    stays its own while it runs. A request whose step starts at position 0 is new (or recomputed after preemption):
    its count restarts at zero, so a block reused by a later request never inherits a stale count.
    """

    def __init__(self, num_stages: int) -> None:
        self.num_stages = num_stages
        self.by_first_block: dict[int, list[int]] = {}

    def before(self, first_blocks: list[int], first_positions: list[int]) -> torch.LongTensor:
        """`(R, K)`: tokens dropped per stage before this step, by request."""
        counts = [
            [0] * self.num_stages if position == 0 else self.by_first_block.get(block, [0] * self.num_stages)
            for block, position in zip(first_blocks, first_positions, strict=True)
        ]
        return torch.tensor(counts, dtype=torch.long).reshape(len(first_blocks), self.num_stages)

    def update(self, first_blocks: list[int], dropped: torch.LongTensor) -> None:
        """Record `(R, K)` totals after this step."""
        for block, counts in zip(first_blocks, dropped.tolist(), strict=True):
            self.by_first_block[block] = counts
