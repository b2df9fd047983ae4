"""Which token rows each ADSC stage computes on in one vLLM step, and where those rows' keys and values are cached.

vLLM flattens a step's requests into one row per scheduled token: request `i` owns rows
`query_start_loc[i]:query_start_loc[i + 1]`, at consecutive positions from `num_computed[i]` on. A stage is the run
of decoder layers from one pruning layer to the next. In stage `s` every image keeps the vision tokens ADSC's rule
leaves alive after `s` pruning layers (`AdscLlavaConfig.surviving_vision_offsets`); text is never dropped.

A stage's layers cache only the tokens they see, packed: the `c`-th token a request keeps in stage `s` is stored at
the slot of position `c` (its *compact index*) in the request's block table, so a stage's attention reads a plain
causal sequence. Which tokens survive depends only on where a request's images start, so everything here is a
closed-form function of the images' offsets (vLLM's placeholder ranges) and the request's token counts: no state
is carried from step to step. The KV cache managers size each stage's blocks with the same function
(`RequestImages.kept`), so the packed slots always lie inside the blocks allocated for them.

Everything runs on the CPU with numpy, from state the engine holds on the host.
"""

import itertools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class VisionSchedule:
    """ADSC's schedule as the engine needs it.

    Attributes:
        tokens_per_image: `n`, the placeholder tokens of one image (LLaVA-1.5: 576; every image has as many).
        pruning_layers: the first decoder layer of each stage after the first.
        alive: `alive[s - 1, j]` is True when offset `j` of an image is still alive in stage `s`, shape `(K, n)` for
            `K` pruning layers.
        dropped_prefix: `dropped_prefix[s, j]` is how many of an image's first `j` tokens stage `s` has dropped,
            shape `(K + 1, n + 1)` (row 0, the first stage's, is zeros).
    """

    tokens_per_image: int
    pruning_layers: tuple[int, ...]
    alive: np.ndarray
    dropped_prefix: np.ndarray

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
        alive = np.zeros((len(pruning_layers), tokens_per_image), dtype=bool)
        for stage, offsets in enumerate(surviving_offsets):
            alive[stage, list(offsets)] = True
        dropped_prefix = np.zeros((len(pruning_layers) + 1, tokens_per_image + 1), dtype=np.int64)
        dropped_prefix[1:, 1:] = np.cumsum(~alive, axis=1)
        return cls(tokens_per_image, tuple(pruning_layers), alive, dropped_prefix)

    @property
    def num_stages(self) -> int:
        return len(self.pruning_layers) + 1

    def dropped(self, image_starts: np.ndarray, num_tokens: int) -> np.ndarray:
        """`(K + 1,)`: how many of a request's first `num_tokens` tokens each stage drops, its images starting at
        `image_starts`."""
        covered = np.clip(num_tokens - image_starts, 0, self.tokens_per_image)
        return self.dropped_prefix[:, covered].sum(axis=1)


def layer_stages(num_layers: int, pruning_layers: tuple[int, ...]) -> list[int]:
    """The stage of each decoder layer: 0 before the first pruning layer, `s` from the `s`-th one on."""
    return [sum(layer >= pruning for pruning in pruning_layers) for layer in range(num_layers)]


class RequestImages:
    """Where one request's images are, and how many of its tokens each stage keeps.

    Attributes:
        starts: `(m,)`, the first position of each image, ascending.
        first: the first image's position (`NO_IMAGE` without images).
        end: the position after its last image (0 without images).
        total: `(K + 1,)`, the tokens each stage drops once every image is in.
    """

    NO_IMAGE = 2**62

    def __init__(self, schedule: VisionSchedule, image_starts) -> None:
        self.schedule = schedule
        self.starts = np.asarray(sorted(image_starts), dtype=np.int64)
        self.first = int(self.starts[0]) if len(self.starts) else self.NO_IMAGE
        self.end = int(self.starts[-1]) + schedule.tokens_per_image if len(self.starts) else 0
        self.total = schedule.dropped(self.starts, self.end)
        self.total_counts = tuple(self.total.tolist())  # the same, as Python ints (`StageCounts.kept` reads these)
        self.summary = (self.first, self.end, *self.total_counts)  # one row of `BatchImages`
        self._last: tuple[int, np.ndarray] = (0, schedule.dropped_prefix[:, 0])

    @classmethod
    def from_features(cls, schedule: VisionSchedule, mm_features) -> "RequestImages":
        """From vLLM's `MultiModalFeatureSpec`s of a request. Raises ValueError for anything but whole images of
        `tokens_per_image` placeholder tokens that each take image features (the processor refuses those requests
        at admission: `model.AdscLlavaMultiModalProcessor`)."""
        starts = []
        for feature in mm_features:
            position = feature.mm_position
            if feature.modality != "image" or position.length != schedule.tokens_per_image:
                raise ValueError(
                    f"ADSC-LLaVA in vLLM needs images of {schedule.tokens_per_image} placeholder tokens, got a "
                    f"{feature.modality} of {position.length} at position {position.offset}."
                )
            if position.is_embed is not None and not bool(position.is_embed.all()):
                raise ValueError("ADSC-LLaVA in vLLM needs every image placeholder token to take image features.")
            starts.append(position.offset)
        return cls(schedule, starts)

    def dropped(self, num_tokens: int) -> np.ndarray:
        """`(K + 1,)`: how many of the first `num_tokens` tokens each stage drops."""
        if num_tokens >= self.end:
            return self.total
        if num_tokens <= self.first:
            return self.schedule.dropped_prefix[:, 0]
        if num_tokens != self._last[0]:
            self._last = (num_tokens, self.schedule.dropped(self.starts, num_tokens))
        return self._last[1]

    def kept(self, num_tokens: int, stage: int) -> int:
        """Of the first `num_tokens` tokens, how many stage `stage` keeps: its cache's length after them."""
        return num_tokens - int(self.dropped(num_tokens)[stage])


class ImagesByRequest:
    """Each live request's `RequestImages`, by request id, made on first use from the request's image placeholder
    ranges (`requests[request_id].mm_features`: vLLM's scheduler and model runner each hold such a dict)."""

    def __init__(self, schedule: VisionSchedule, requests: dict) -> None:
        self.schedule, self.requests = schedule, requests
        self.images: dict[str, RequestImages] = {}

    def __getitem__(self, request_id: str) -> RequestImages:
        images = self.images.get(request_id)
        if images is None:
            images = RequestImages.from_features(self.schedule, self.requests[request_id].mm_features)
            self.images[request_id] = images
        return images

    def forget(self, request_id: str) -> None:
        self.images.pop(request_id, None)


@dataclass
class BatchImages:
    """The images of a step's requests, in the runner's row order, as arrays.

    Attributes:
        requests: each request's `RequestImages`, `(R,)`.
        table: `(R, K + 3)`, each request's `RequestImages.summary`; `first`, `end` and `total` are views of it:
        first: `(R,)`, each request's first image position (`RequestImages.NO_IMAGE` without images).
        end: `(R,)`, the position after each request's last image.
        total: `(R, K + 1)`, each request's `RequestImages.total`.
    """

    requests: list[RequestImages]
    table: np.ndarray

    def __post_init__(self) -> None:
        self.first, self.end, self.total = self.table[:, 0], self.table[:, 1], self.table[:, 2:]

    @classmethod
    def of(cls, requests: list[RequestImages], num_stages: int) -> "BatchImages":
        width = num_stages + 2
        summaries = itertools.chain.from_iterable([r.summary for r in requests])
        return cls(requests, np.fromiter(summaries, np.int64, len(requests) * width).reshape(len(requests), width))

    def with_rows(self, num_reqs: int, rows: list[int], requests: list[RequestImages]) -> "BatchImages":
        """This batch cut or grown to `num_reqs` requests, the requests at `rows` replaced by `requests` (a batch
        whose rows mostly stay where they were: one new request, a few moved)."""
        table = np.empty((num_reqs, self.table.shape[1]), dtype=np.int64)
        kept = min(num_reqs, len(self.requests))
        table[:kept] = self.table[:kept]
        batch = self.requests[:kept] + [None] * (num_reqs - kept)
        for row, request in zip(rows, requests, strict=True):
            batch[row], table[row] = request, request.summary
        return BatchImages(batch, table)

    def dropped(self, num_tokens: np.ndarray) -> np.ndarray:
        """`(R, K + 1)`: how many of each request's first `num_tokens[i]` tokens each stage drops."""
        dropped = np.where((num_tokens >= self.end)[:, None], self.total, 0)
        for index in np.flatnonzero((num_tokens > self.first) & (num_tokens < self.end)):
            dropped[index] = self.requests[index].dropped(int(num_tokens[index]))
        return dropped


@dataclass
class StagePlan:
    """The rows one stage computes on in a step, and its packed attention layout.

    Attributes:
        stage: `s`, the stage (1 for the layers from the first pruning layer on).
        rows: the step's rows this stage computes on (indices into the step's rows), `(t_s,)`; None when it keeps
            every row (nothing dropped in this step).
        from_previous: which of the previous stage's rows this stage keeps (indices into them), `(t_s,)`; None when
            it keeps every row.
        query_start_loc: `(R + 1,)`, the stage's rows of each request.
        seq_lens: `(R,)`, tokens each request's stage cache holds after this step.
        request: `(t_s,)`, the request of each row.
        compact: `(t_s,)`, each row's compact index: where it goes in its request's packed stage cache.
        max_seq_len: the largest of `seq_lens`.
        max_query_len: the most rows a request has in this stage.
    """

    stage: int
    rows: np.ndarray | None
    from_previous: np.ndarray | None
    query_start_loc: np.ndarray
    seq_lens: np.ndarray
    request: np.ndarray
    compact: np.ndarray
    max_seq_len: int
    max_query_len: int

    @property
    def num_rows(self) -> int:
        return len(self.compact)

    def slot_mapping(self, block_table: np.ndarray, block_size: int) -> np.ndarray:
        """`(t_s,)`: the cache slot of each row in a KV cache group whose block table is `block_table`."""
        return slot_mapping(self.request, self.compact, block_table, block_size)


def slot_mapping(request: np.ndarray, index: np.ndarray, block_table: np.ndarray, block_size: int) -> np.ndarray:
    """Cache slots of the tokens at `index` (compact indices, or positions) of requests `request`, for a block table
    `(num_reqs, max_blocks)` of blocks of `block_size` tokens."""
    return block_table[request, index // block_size].astype(np.int64) * block_size + index % block_size


@dataclass
class StepPlan:
    """Every stage's plan for one step, with the same numbers stacked across stages (what the runner writes in one
    operation each; every `StagePlan` holds views of them).

    Attributes:
        stages: the plans of stages 1 .. S that have rows in this step (S <= K). A stage whose rows were all dropped
            (the step's tokens are only image tokens it drops) is left out, with every deeper one: those layers do
            not run in this step (a zero-row kernel launch kills a GPU engine).
        drops: whether any row leaves before the last layer.
        seq_lens: `(S, R)`, each stage's `seq_lens`.
        compact: `(S, T)`, each stage's `compact`, in steps that drop nothing (every stage has the step's `T` rows);
            None otherwise.
        rows, from_previous: every stage's `rows` and `from_previous` back to back, `(t_1 + ... + t_S,)`, in steps
            that drop rows; None otherwise.
        query_start_loc: `(S, R + 1)`, each stage's `query_start_loc`, in steps that drop rows; None otherwise.
    """

    stages: list[StagePlan]
    drops: bool
    seq_lens: np.ndarray
    compact: np.ndarray | None = None
    rows: np.ndarray | None = None
    from_previous: np.ndarray | None = None
    query_start_loc: np.ndarray | None = None


def plan_step(
    schedule: VisionSchedule,
    images: BatchImages,
    num_computed: np.ndarray,
    num_scheduled: np.ndarray,
    request_of_row: np.ndarray | None = None,
) -> StepPlan:
    """The plan of every stage after the first for one step, in a fixed number of array operations whatever the
    batch (no loop over requests or rows, one over the requests whose images this step reaches).

    Args:
        images: the step's requests' images (`BatchImages`), `R` requests.
        num_computed: `(R,)`, tokens each request had computed before this step.
        num_scheduled: `(R,)`, tokens each request computes in this step (its rows, in request order).
        request_of_row: `(T,)`, the request of each row, if the caller has it (vLLM's runner does).
    """
    num_computed, num_scheduled = num_computed.astype(np.int64), num_scheduled.astype(np.int64)
    num_reqs = len(num_scheduled)
    query_start_loc = np.zeros(num_reqs + 1, dtype=np.int64)
    np.cumsum(num_scheduled, out=query_start_loc[1:])
    if request_of_row is None:
        request_of_row = np.repeat(np.arange(num_reqs), num_scheduled)
    if len(request_of_row) == num_reqs and num_scheduled.max() == 1 and (num_computed >= images.end).all():
        # A decode step: one row per request, every image cached. Its row goes after what each stage cached.
        compact = num_computed - images.total[:, 1:].T
        return _plan_keeping_every_row(schedule, query_start_loc, request_of_row, compact, compact + 1, 1)
    # Each stage's cache length before this step, (K, R): the compact index of a request's next kept token.
    cached = num_computed - images.dropped(num_computed)[:, 1:].T
    offsets = _image_offsets(schedule, images, num_computed, num_computed + num_scheduled, query_start_loc)
    if offsets is None or schedule.alive[-1][offsets[offsets >= 0]].all():
        # No row dropped in this step (the deepest stage keeps the fewest): every stage keeps every row, packed after
        # what the stage cached before.
        compact = cached[:, request_of_row] + (np.arange(len(request_of_row)) - query_start_loc[request_of_row])
        return _plan_keeping_every_row(
            schedule, query_start_loc, request_of_row, compact, cached + num_scheduled, int(num_scheduled.max())
        )
    return _plan_dropping_step(schedule, offsets, cached, query_start_loc, request_of_row)


def _plan_keeping_every_row(
    schedule: VisionSchedule,
    query_start_loc: np.ndarray,
    request_of_row: np.ndarray,
    compact: np.ndarray,
    seq_lens: np.ndarray,
    max_query_len: int,
) -> StepPlan:
    """`plan_step` for a step that drops no row: every stage computes on every row. `compact`: `(K, T)`;
    `seq_lens`: `(K, R)`."""
    max_seq_lens = seq_lens.max(axis=1).tolist()
    stages = [
        StagePlan(
            stage, None, None, query_start_loc, seq_lens[stage - 1], request_of_row, compact[stage - 1],
            max_seq_lens[stage - 1], max_query_len,
        )
        for stage in range(1, schedule.num_stages)
    ]  # fmt: skip
    return StepPlan(stages, False, seq_lens, compact=compact)


def _plan_dropping_step(
    schedule: VisionSchedule,
    offsets: np.ndarray,
    cached: np.ndarray,
    query_start_loc: np.ndarray,
    request_of_row: np.ndarray,
) -> StepPlan:
    """`plan_step` for a step some of whose image rows a stage drops; `offsets`: `(T,)`, each row's image offset
    (-1 for text)."""
    num_rows, num_reqs = len(offsets), len(query_start_loc) - 1
    vision_rows = np.flatnonzero(offsets >= 0)
    kept = np.ones((len(schedule.alive), num_rows), dtype=bool)
    kept[:, vision_rows] = schedule.alive[:, offsets[vision_rows]]
    # Each stage keeps a subset of the previous one's rows: the stages with rows come first.
    num_stages = int(np.count_nonzero(kept.any(axis=1)))
    if num_stages == 0:
        no_rows = np.zeros(0, dtype=np.int64)
        no_stages = np.zeros((0, num_reqs + 1), dtype=np.int64)
        return StepPlan([], True, cached[:0], rows=no_rows, from_previous=no_rows, query_start_loc=no_stages)
    kept = kept[:num_stages]
    stage_of, rows = np.nonzero(kept)  # every stage's rows, stage by stage
    request = request_of_row[rows]
    rows_per_request = np.bincount(stage_of * num_reqs + request, minlength=num_stages * num_reqs)
    rows_per_request = rows_per_request.reshape(num_stages, num_reqs)
    stage_query_start_loc = np.zeros((num_stages, num_reqs + 1), dtype=np.int64)
    np.cumsum(rows_per_request, axis=1, out=stage_query_start_loc[:, 1:])
    bounds = np.zeros(num_stages + 1, dtype=np.int64)
    np.cumsum(kept.sum(axis=1), out=bounds[1:])
    # A kept row's compact index: its request's stage cache length before the step, plus the request's rows that
    # the stage keeps before it in this step.
    rank = np.arange(len(rows)) - bounds[stage_of] - stage_query_start_loc[stage_of, request]
    compact = cached[stage_of, request] + rank
    # A row's index among the previous stage's rows (stage 1's previous rows are all the step's rows).
    index_in_previous = np.empty((num_stages, num_rows), dtype=np.int64)
    index_in_previous[0] = np.arange(num_rows)
    np.cumsum(kept[:-1], axis=1, out=index_in_previous[1:])
    index_in_previous[1:] -= 1
    from_previous = index_in_previous[stage_of, rows]
    seq_lens = cached[:num_stages] + rows_per_request
    max_seq_lens, max_query_lens = seq_lens.max(axis=1).tolist(), rows_per_request.max(axis=1).tolist()
    bounds = bounds.tolist()
    stages = []
    for index in range(num_stages):
        part = slice(bounds[index], bounds[index + 1])
        stages.append(
            StagePlan(
                index + 1, rows[part], from_previous[part], stage_query_start_loc[index], seq_lens[index],
                request[part], compact[part], max_seq_lens[index], max_query_lens[index],
            )
        )  # fmt: skip
    return StepPlan(
        stages, True, seq_lens, rows=rows, from_previous=from_previous, query_start_loc=stage_query_start_loc
    )


def _image_offsets(
    schedule: VisionSchedule,
    images: BatchImages,
    num_computed: np.ndarray,
    seq_lens: np.ndarray,
    query_start_loc: np.ndarray,
) -> np.ndarray | None:
    """`(T,)`, each row's offset within its image (-1 for text rows); None when no row is an image token."""
    candidates = np.flatnonzero((num_computed < images.end) & (seq_lens > images.first))
    if len(candidates) == 0:
        return None
    n, offsets = schedule.tokens_per_image, None
    for index in candidates:
        start, stop = int(num_computed[index]), int(seq_lens[index])
        for image_start in images.requests[index].starts:
            first, last = max(start, int(image_start)), min(stop, int(image_start) + n)
            if first < last:
                if offsets is None:
                    offsets = np.full(int(query_start_loc[-1]), -1, dtype=np.int64)
                row = int(query_start_loc[index]) + first - start
                offsets[row : row + last - first] = np.arange(first - image_start, last - image_start)
    return offsets
