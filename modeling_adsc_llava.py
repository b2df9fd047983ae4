"""ADSC-LLaVA: LLaVA that drops vision tokens inside its language model (Attention-Driven Self-Compression).

At each pruning layer `l` of `config.adsc_pruning_layers` every visual unit (an image, or a video) keeps
`k = floor((1 - r) * n)` of its `n` alive vision tokens, at the positions `uniform_keep_positions(n, k)` (the rule
lives with the config, so that serving engines share it); text tokens are never dropped. From layer `l` on, the
decoder layers see the shorter sequence, so their hidden states and KV cache are shorter. Kept tokens keep their
original RoPE positions. Attention itself is untouched, so eager, sdpa and flash-attention all work.

`config.adsc_keep_policy` names which tokens a unit keeps: ADSC's uniform positions (the default), or, as baselines
with the same counts, the most attended ones (FastV, PyramidDrop: `last_token_attention` + `top_scored_keep`).

This file is shipped inside every ADSC checkpoint (remote code): it imports only torch, transformers and its config.

How a forward runs (`AdscModelMixin.run_language_model`):

    units = locate_visual_units(...)             # the one read from the device: each unit's row and start
    stages = plan_stages(units, schedule)        # host integers: each stage's layout; uniform: which tokens stay
    stream = TokenStream(all input tokens)       # hidden states, positions, input positions, key mask
    for stage in stages:                         # layer 0, then each pruning layer, starts a stage
        stream = stream.select(stage's order)    # pruning layers only (FastV / PyramidDrop: ordered by scores)
        mask, rope = this stage's causal mask and rotary embeddings
        for layer in stage: stream.hidden_states = layer(stream.hidden_states, mask, rope, cache)
    hidden states of every input position = its state after the last layer it reached, then the final norm

Nothing in a forward waits for the device but that one read, made only when the forward has images or videos (and
a read of the padding mask where stock's mask builder makes it too; `new_tokens_key_mask`): a decode step never
syncs. A stage without padding or filler passes no attention mask, so sdpa and flash-attention take their unmasked
kernels.

Dropped tokens: the output at a dropped position is the hidden state the token had when it was dropped (after the
final norm), so logits keep the stock `[batch, seq, vocab]` shape. Do not read next-token predictions at dropped
positions. Training never supervises image positions; the text token right after a unit is predicted from the
unit's last token, which uniform keeping drops when `k < n / 2`, so the training data leaves that label out too.
"""

from .configuration_adsc_llava import check_transformers_version

check_transformers_version()  # before the imports below, which an older transformers would break

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import accumulate

import torch
from torch import nn
from torch.profiler import record_function
from transformers import LlavaForConditionalGeneration, LlavaModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import rotate_half
from transformers.models.llava.modeling_llava import LlavaModelOutputWithPast, LlavaPreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, logging
from transformers.utils.generic import can_return_tuple

from .configuration_adsc_llava import AdscLlavaConfig, num_kept_tokens, uniform_keep_positions, validate_schedule

logger = logging.get_logger(__name__)

# Text models whose decoder layers take `(hidden_states, attention_mask, position_embeddings, cache)` and whose model
# forward does nothing else than embed -> layers -> norm: the layer loop below is exactly their forward.
SUPPORTED_TEXT_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen2_5_vl_text", "qwen3_vl_text")

# `torch.profiler` ranges around ADSC's own work, so any profiler trace shows what pruning costs. Stock LLaVA builds
# one causal mask per forward too; every further "stage_mask" range is ADSC's.
PROFILER_RANGES = {
    "unit_plan": "adsc::unit_plan",
    "prune": "adsc::prune_vision_tokens",
    "stage_mask": "adsc::stage_causal_mask",
    "gather_outputs": "adsc::gather_outputs",
}

# Generation inputs that carry images or videos (refused with `prefill_chunk_size`, see `AdscGenerationMixin`).
VISUAL_INPUT_NAMES = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")


def to_device(values: list | torch.Tensor, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host values as a tensor on `device`, copied without making the host wait for the device.

    A blocking host-to-device copy synchronizes the stream; a `non_blocking` one from pageable memory only stages the
    bytes before it returns (so the source may be freed), and the host runs ahead of the device.
    """
    tensor = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    return tensor.to(device, non_blocking=True)


# The plan: where every visual unit sits and what each stage keeps, in host integers.


@dataclass(frozen=True)
class VisualUnits:
    """Visual units as host integers, in batch-row-major order.

    Unit `u` is the run `[starts[u], starts[u] + lengths[u])` of row `rows[u]`: one image's (or one video's) alive
    tokens. Two units may touch.
    """

    rows: tuple[int, ...] = ()
    starts: tuple[int, ...] = ()
    lengths: tuple[int, ...] = ()

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return zip(self.rows, self.starts, self.lengths, strict=True)


def locate_visual_units(
    placeholder_masks: list[torch.BoolTensor],
    unit_lengths: list[list[int]],
    key_mask: torch.BoolTensor | None = None,
) -> tuple[VisualUnits, list[torch.LongTensor], bool]:
    """Where every visual unit sits, read from the device in one transfer, and a check that each one is whole.

    Args:
        placeholder_masks: per kind of placeholder (image, video), `(batch, seq)` True at its tokens.
        unit_lengths: per kind, the tokens of each of its units in batch-row-major order (its features' lengths).
        key_mask: `(batch, seq)` False at padding, or None; whether it masks any token comes in the same read.

    Returns:
        The units of every kind (by row, then start); per kind, the `(sum(lengths),)` flat positions
        `row * seq + column` of its placeholders in order (where its features go); whether `key_mask` masks a token.

    Raises:
        ValueError: if a kind's placeholders and features differ in number, or a unit is not one run of one row.
    """
    sequence_length = placeholder_masks[0].shape[1]
    positions, summaries = [], []
    for mask, lengths in zip(placeholder_masks, unit_lengths, strict=True):
        flat_positions = torch.nonzero_static(mask.flatten(), size=sum(lengths)).flatten()  # no sync: size is known
        ends = list(accumulate(lengths))
        firsts = [end - length for end, length in zip(ends, lengths, strict=True) if length]
        lasts = [end - 1 for end, length in zip(ends, lengths, strict=True) if length]
        summaries += [mask.sum().view(1), flat_positions.index_select(0, to_device(firsts + lasts, mask.device))]
        positions.append(flat_positions)
    if key_mask is not None:
        summaries.append((~key_mask).any().view(1).long())
    read = iter(torch.cat(summaries).tolist())  # the one sync of a prefill

    units = []
    for lengths in unit_lengths:
        check_unit_counts(next(read), lengths)
        whole = [length for length in lengths if length]
        firsts, lasts = [next(read) for _ in whole], [next(read) for _ in whole]
        for length, first, last in zip(whole, firsts, lasts, strict=True):
            row, start = divmod(first, sequence_length)
            if last - first != length - 1 or last // sequence_length != row:
                raise ValueError(
                    "Truncated image span: every image (or video) needs its placeholder tokens in one consecutive run "
                    f"of {lengths[:8]} tokens, but a run is cut by text or by the end of a row. Was the prompt "
                    "truncated through an image, or were pre-encoded features given as one entry for several images "
                    "(one entry per image or video is needed)?"
                )
            units.append((row, start, length))
    masks_padding = bool(next(read)) if key_mask is not None else False
    return VisualUnits(*(tuple(column) for column in zip(*sorted(units), strict=True))), positions, masks_padding


def check_unit_counts(num_placeholders: int, unit_lengths: list[int]) -> None:
    """Raise a clear error when a kind's placeholder tokens and its features differ in number."""
    if num_placeholders != sum(unit_lengths):
        raise ValueError(
            f"Image features and image tokens do not match: the prompt holds {num_placeholders} image tokens but the "
            f"images give {sum(unit_lengths)} features ({len(unit_lengths)} images or videos of "
            f"{unit_lengths[:8]}{' ...' if len(unit_lengths) > 8 else ''} tokens)."
        )


@dataclass(frozen=True)
class StageLayout:
    """Where one stage's tokens sit, as host integers.

    Row `b` holds its `row_lengths[b]` tokens in input order, then filler slots up to `width` (rows keep different
    numbers of tokens: a text-only row loses none). `units` are the visual units' alive tokens in this stage.
    """

    width: int
    row_lengths: tuple[int, ...]
    units: VisualUnits = VisualUnits()

    @property
    def has_filler(self) -> bool:
        return any(length < self.width for length in self.row_lengths)

    def pruned(self, drop_ratio: float) -> "StageLayout":
        """The layout after a pruning layer: a unit of `n` alive tokens keeps `num_kept_tokens(n, r)` of them."""
        removed = [0] * len(self.row_lengths)
        starts, kept = [], []
        for row, start, length in self.units:
            starts.append(start - removed[row])
            kept.append(num_kept_tokens(length, drop_ratio))
            removed[row] += length - kept[-1]
        row_lengths = tuple(length - gone for length, gone in zip(self.row_lengths, removed, strict=True))
        return StageLayout(max(row_lengths), row_lengths, VisualUnits(self.units.rows, tuple(starts), tuple(kept)))

    def valid_slots(self) -> torch.BoolTensor:
        """`(batch, width)` on the host: False at filler slots."""
        return torch.arange(self.width) < torch.tensor(self.row_lengths)[:, None]

    def text_slots(self) -> torch.BoolTensor:
        """`(batch, width)` on the host: True at the tokens outside every unit."""
        slots = self.valid_slots()
        for row, start, length in self.units:
            slots[row, start : start + length] = False
        return slots

    def uniform_keep(self, drop_ratio: float) -> torch.BoolTensor:
        """`(batch, width)` on the host: what ADSC keeps at a pruning layer, text and each unit's uniform positions."""
        keep = self.text_slots()
        for row, start, length in self.units:
            kept = uniform_keep_positions(length, num_kept_tokens(length, drop_ratio))
            keep[row, [start + offset for offset in kept]] = True
        return keep


def kept_slot_order(keep: torch.BoolTensor, width: int) -> torch.LongTensor:
    """`(batch, width)`: each row's kept slots in order (a stable sort), then other slots as filler."""
    return torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]


@dataclass(frozen=True)
class Stage:
    """Decoder layers from one stage start (layer 0 or a pruning layer) to the next, and the tokens they see.

    `drops`: the stage starts by dropping vision tokens of the previous one. `order`: for ADSC's uniform rule, known
    before the first layer, the `(batch, width)` slots of the previous stage it keeps (host); None where attention
    scores decide (FastV, PyramidDrop) or nothing is dropped.
    """

    layers: range
    layout: StageLayout
    drops: bool = False
    order: torch.LongTensor | None = None


@dataclass(frozen=True)
class StageAttention:
    """What every layer of a stage attends with (`AdscModelMixin.stage_attention`).

    `causal_mask` in the attention implementation's format (None: unmasked causal attention); `position_embeddings`
    the rotary `(cos, sin)`; `key_mask` `(batch, past + stage_len)` or None, stored with the keys; `key_index` the
    keys' positions in the full sequence, only while attentions are recorded after a pruning layer.
    """

    causal_mask: torch.Tensor | None
    position_embeddings: tuple
    key_mask: torch.BoolTensor | None
    key_index: torch.LongTensor | None


def plan_stages(
    layout: StageLayout, pruning_layers: list[int], num_layers: int, drop_ratio: float, scored: bool
) -> list[Stage]:
    """Every stage of a forward, planned on the host before the first layer runs.

    Args:
        layout: the input tokens' layout (no filler; the visual units of this forward).
        scored: whether a score-based policy picks the kept tokens (then only their counts are planned).
    """
    boundaries = [0, *pruning_layers, num_layers]
    stages = []
    for first, end in zip(boundaries, boundaries[1:], strict=False):
        pruned = layout.pruned(drop_ratio) if first > 0 else layout
        drops = pruned != layout
        order = kept_slot_order(layout.uniform_keep(drop_ratio), pruned.width) if drops and not scored else None
        stages.append(Stage(range(first, end), pruned, drops, order))
        layout = pruned
    return stages


# The tokens of a stage, on the device.


@dataclass
class TokenStream:
    """The tokens one stage of decoder layers sees, in their original order, one row per sample.

    `hidden_states` is `(batch, stage_len, hidden)`, `position_ids` `(..., batch, stage_len)` (leading dims for
    multi-axis RoPE), the others `(batch, stage_len)`. Filler slots (see `StageLayout`) have source index
    `input_length` and are never attended to.
    """

    hidden_states: torch.Tensor
    position_ids: torch.LongTensor  # original RoPE positions
    source_index: torch.LongTensor  # position in this forward's input sequence; `input_length` for filler slots
    key_mask: torch.BoolTensor | None  # may be attended to; None when no slot is padding or filler
    input_length: int

    @classmethod
    def from_inputs(
        cls, inputs_embeds: torch.Tensor, position_ids: torch.LongTensor, key_mask: torch.BoolTensor | None
    ) -> "TokenStream":
        """Every input token, as layer 0 sees it: `position_ids` `(..., [batch,] seq)`, `key_mask` `(batch, seq)`."""
        batch_size, sequence_length, _ = inputs_embeds.shape
        return cls(
            hidden_states=inputs_embeds,
            position_ids=position_ids.expand(*position_ids.shape[:-2], batch_size, sequence_length),
            source_index=torch.arange(sequence_length, device=inputs_embeds.device).expand(batch_size, -1),
            key_mask=key_mask,
            input_length=sequence_length,
        )

    def to(self, device: torch.device) -> "TokenStream":
        """The stream with every per-token tensor on `device` (with a `device_map`, where the next layer runs)."""
        if self.source_index.device == device:
            return self
        moved = {name: getattr(self, name) for name in ("hidden_states", "position_ids", "source_index", "key_mask")}
        moved = {name: tensor.to(device) if tensor is not None else None for name, tensor in moved.items()}
        return TokenStream(**moved, input_length=self.input_length)

    def select(self, order: torch.LongTensor, layout: StageLayout) -> "TokenStream":
        """The next stage's stream: slot `j` of row `b` is this stream's slot `order[b, j]`, laid out as `layout`."""
        valid = to_device(layout.valid_slots(), order.device) if layout.has_filler else None
        source_index = self.source_index.gather(1, order)
        key_mask = self.key_mask.gather(1, order) if self.key_mask is not None else None
        if valid is not None:
            source_index = torch.where(valid, source_index, self.input_length)
            key_mask = valid if key_mask is None else key_mask & valid
        return TokenStream(
            hidden_states=torch.take_along_dim(self.hidden_states, order[..., None], dim=1),
            position_ids=self.position_ids.gather(-1, order.expand(*self.position_ids.shape[:-2], *order.shape)),
            source_index=source_index,
            key_mask=key_mask,
            input_length=self.input_length,
        )

    def key_index(self, past_length: int) -> torch.LongTensor:
        """`(batch, stage_len)` index of each token in the full sequence (`past + seq`), -1 for filler slots."""
        return torch.where(self.source_index < self.input_length, self.source_index + past_length, -1)


@torch.no_grad()
def last_token_attention(
    decoder_layer: nn.Module, stream: TokenStream, position_embeddings: tuple, query_before: int | None = None
) -> torch.Tensor:
    """`(batch, stage_len)` attention each token gets from its row's last token in `decoder_layer`, head-averaged.

    The one query row is recomputed from the layer's input (its input norm, q/k projections and RoPE), so any
    attention implementation runs the layer itself. Softmax over the keys the query sees: the forward's own tokens
    up to it. `query_before`: the query is the row's last token before this input position (default: the last). A
    row whose query sees no key (all padding) scores every token 0.
    """
    attention = decoder_layer.self_attn
    device = attention.q_proj.weight.device  # with a device_map, the stream may still be on the previous stage's
    hidden_states = decoder_layer.input_layernorm(stream.hidden_states.to(device))
    batch_size, stage_length, _ = hidden_states.shape
    source_index = stream.source_index.to(device)
    key_mask = source_index < stream.input_length if stream.key_mask is None else stream.key_mask.to(device)
    cos, sin = (table.to(device) for table in position_embeddings)
    rows = torch.arange(batch_size, device=device)
    may_query = key_mask if query_before is None else key_mask & (source_index < query_before)
    last = torch.where(may_query, torch.arange(stage_length, device=device), -1).amax(dim=1).clamp(min=0)
    seen = key_mask & (source_index <= source_index[rows, last][:, None])
    query = attention.q_proj(hidden_states[rows, last]).view(batch_size, -1, 1, attention.head_dim)
    query = query * cos[rows, last][:, None, None] + rotate_half(query) * sin[rows, last][:, None, None]
    keys = attention.k_proj(hidden_states).view(batch_size, stage_length, -1, attention.head_dim).transpose(1, 2)
    keys = (keys * cos[:, None] + rotate_half(keys) * sin[:, None]).repeat_interleave(
        attention.num_key_value_groups, dim=1
    )
    logits = (query @ keys.transpose(-1, -2)).float() * attention.scaling  # (batch, heads, 1, stage_len)
    seen = seen[:, None, None, :]
    weights = logits.masked_fill(~seen, torch.finfo(logits.dtype).min).softmax(dim=-1) * seen  # no NaN, even unseen
    return weights.mean(dim=1)[:, 0].to(stream.source_index.device)


def top_scored_keep(scores: torch.Tensor, layout: StageLayout, drop_ratio: float) -> torch.BoolTensor:
    """`(batch, width)` what a score-based policy keeps: text, and each unit's `num_kept_tokens(n, r)` best scores.

    Ties keep the earlier token. The shapes come from `layout` (host integers), so nothing waits for the device.

    Args:
        scores: `(batch, width)` a score per slot of `layout` (only the units' slots are read).
    """
    device = scores.device
    offsets = torch.arange(max(layout.units.lengths, default=0))
    lengths = torch.tensor(layout.units.lengths, dtype=torch.long)
    firsts = torch.tensor([row * layout.width + start for row, start, _ in layout.units], dtype=torch.long)
    trash = scores.numel()
    slots = torch.where(offsets < lengths[:, None], firsts[:, None] + offsets, trash)  # (units, longest unit)
    kept = torch.tensor([num_kept_tokens(length, drop_ratio) for length in layout.units.lengths], dtype=torch.long)
    slots, kept, keep = (to_device(tensor, device) for tensor in (slots, kept, layout.text_slots()))
    padded_scores = nn.functional.pad(scores.flatten().float(), (0, 1), value=-torch.inf)
    by_score = padded_scores[slots].argsort(dim=1, descending=True, stable=True)  # other units' slots sort last
    rank = torch.empty_like(by_score).scatter_(
        1, by_score, torch.arange(slots.shape[1], device=device).expand_as(slots)
    )
    chosen = (rank < kept[:, None]).flatten()
    keep = nn.functional.pad(keep.flatten(), (0, 1)).index_put_((slots.flatten(),), chosen)
    return keep[:trash].view_as(scores)


def scatter_to_input_positions(outputs: torch.Tensor | None, stream: TokenStream) -> torch.Tensor:
    """Write the stream's hidden states at their input positions.

    Args:
        outputs: `(batch * (seq + 1), dim)` buffer from an earlier call, or None to start one. Each sample has one
            extra trash row, where filler slots are written.
        stream: the tokens whose current hidden states are written.

    Returns:
        The buffer, written in place; `outputs.view(batch, seq + 1, dim)[:, :seq]` are the hidden states.
    """
    batch_size, _, hidden_size = stream.hidden_states.shape
    rows = stream.input_length + 1
    if outputs is None:
        outputs = stream.hidden_states.new_zeros(batch_size * rows, hidden_size)
    index = stream.source_index + torch.arange(batch_size, device=stream.source_index.device)[:, None] * rows
    hidden_states = stream.hidden_states.reshape(-1, hidden_size).to(outputs.device)
    return outputs.index_copy_(0, index.flatten().to(outputs.device), hidden_states)


class AdscCacheLayer(DynamicLayer):
    """A `DynamicLayer` that also records, for its cached keys, which may be attended to and where they stand.

    After a pruning layer a layer caches a subset of the sequence, so its keys alone no longer tell which of them were
    padding (or filler slots of shorter rows) nor which input positions they came from. Both ride along here, and
    every cache operation transformers performs (beam reordering, batch selection and repetition, cropping for
    assisted decoding, reset) applies to them together with the keys. They are not offloaded with an offloaded cache:
    a stage reads them before its first layer's `Cache.update` waits for the keys' prefetch stream, so they stay on
    the compute stream that wrote them (one byte, or eight, per key next to the keys' kilobytes).

    Attributes:
        key_mask: `(batch, cached)` bool, False for padding and filler slots; None while no cached key is either.
        key_index: `(batch, cached)` long, each key's index in the full sequence seen so far, -1 for filler slots.
            Kept only where per-layer attentions are asked for, after a pruning layer (before it, key `j` is `j`).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.key_mask: torch.BoolTensor | None = None
        self.key_index: torch.LongTensor | None = None

    def _apply_to_key_info(self, function) -> None:
        if self.key_mask is not None:
            self.key_mask = function(self.key_mask)
        if self.key_index is not None:
            self.key_index = function(self.key_index)

    def reset(self) -> None:
        super().reset()
        self.key_mask = self.key_index = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._apply_to_key_info(lambda tensor: tensor.index_select(0, beam_idx.to(tensor.device)))

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0 and self.is_initialized:
            self._apply_to_key_info(lambda tensor: tensor[:, :tokens_to_remove])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._apply_to_key_info(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._apply_to_key_info(lambda tensor: tensor[indices.to(tensor.device)])


class AdscCache(DynamicCache):
    """The cache ADSC-LLaVA fills: a `DynamicCache` with one `AdscCacheLayer` per decoder layer.

    Layers cache different numbers of tokens (`get_seq_length(layer_idx)` is the text plus that layer's vision tokens),
    and each layer keeps its keys' padding mask (and positions) in step with its keys. `generate()` creates it; a plain
    `DynamicCache` passed by a caller is adopted while still empty (see `AdscModelMixin.cache_for_forward`).
    """

    def __init__(self, config, offloading: bool = False, offload_only_non_sliding: bool = False):
        num_layers = config.get_text_config(decoder=True).num_hidden_layers
        Cache.__init__(
            self,
            layers=[AdscCacheLayer() for _ in range(num_layers)],
            offloading=offloading,
            offload_only_non_sliding=offload_only_non_sliding,
        )


def refuse_cache(cache: Cache) -> None:
    """Raise the error that says why ADSC-LLaVA cannot fill `cache`."""
    name = type(cache).__name__
    if cache.is_compileable:
        reason = (
            "static (compile) caches give every layer the same length, but after a pruning layer the layers cache "
            "fewer tokens"
        )
    elif "Quantized" in name or any("Quantized" in type(layer).__name__ for layer in cache.layers):
        reason = (
            "its layers keep keys in a quantized store plus a residual of recent keys, which ADSC cannot keep in step "
            "with its per-key padding masks"
        )
    elif cache.get_seq_length() > 0:
        reason = "it already holds keys that ADSC-LLaVA did not cache, so which tokens each stage kept is unknown"
    else:
        reason = "only a DynamicCache of full-attention layers (or an AdscCache) can hold a different length per layer"
    raise ValueError(
        f"ADSC-LLaVA cannot use a {name}: {reason}. Let generate() create its cache (cache_implementation None, "
        "'dynamic' or 'offloaded'), or pass an empty DynamicCache / AdscCache."
    )


class LayerOutputs:
    """Per-layer hidden states and attention weights at the forward's input positions.

    `hidden_states[i]` is `(batch, seq, hidden)`: entry 0 the embeddings, entry `i` every token's state after layer
    `i - 1`, where a token dropped before that layer carries the state it had when it was dropped; the last entry is
    the normed output, as in stock models. `attentions[i]` is layer `i`'s `(batch, heads, seq, past + seq)` attention
    weights (eager attention), zero in the rows of tokens the layer did not see and the columns of keys it did not see.
    """

    def __init__(self, inputs_embeds: torch.Tensor, past_length: int, hidden: bool | list[int], attentions: bool):
        self.batch_size, self.sequence_length, _ = inputs_embeds.shape
        self.past_length = past_length
        if isinstance(hidden, int) and not isinstance(hidden, bool):
            hidden = [hidden]  # `output_hidden_states` may select states by index, as in stock models
        self.selected = None if isinstance(hidden, bool) else {int(index) for index in hidden}
        self.record_hidden = bool(hidden) or self.selected is not None
        self.record_attentions = attentions
        self.current = None  # flat `(batch * (seq + 1), hidden)` latest states, see `scatter_to_input_positions`
        self.hidden_states: list[torch.Tensor | None] = []
        self.attentions: list[torch.Tensor] = []
        if self.record_hidden:
            padded = nn.functional.pad(inputs_embeds, (0, 0, 0, 1))
            self.current = padded.reshape(-1, inputs_embeds.shape[-1])
            self.hidden_states.append(inputs_embeds)

    def add_layer(
        self, stream: TokenStream, attention_weights: torch.Tensor | None, key_index: torch.LongTensor | None
    ) -> None:
        """Record one layer's output `stream` and its stage-local `(batch, heads, stage_len, keys)` weights, whose
        keys are at `key_index` `(batch, keys)` in the full sequence (None: key `j` is position `j`)."""
        if self.record_hidden:
            self.current = scatter_to_input_positions(self.current.clone(), stream)
            view = self.current.view(self.batch_size, self.sequence_length + 1, -1)[:, : self.sequence_length]
            self.hidden_states.append(view)
        if self.record_attentions and attention_weights is not None:
            if key_index is None:  # nothing dropped yet: the layer's own tensor, so gradients reach it as in stock
                self.attentions.append(attention_weights)
            else:
                self.attentions.append(self.full_attention_weights(stream, attention_weights, key_index))

    def full_attention_weights(
        self, stream: TokenStream, weights: torch.Tensor, key_index: torch.LongTensor
    ) -> torch.Tensor:
        """Scatter stage-local weights to `(batch, heads, seq, past + seq)`; filler rows and keys go to a trash row."""
        batch_size, num_heads, _, _ = weights.shape
        total_keys = self.past_length + self.sequence_length
        full = weights.new_zeros(batch_size, num_heads, self.sequence_length + 1, total_keys + 1)
        key_index = key_index.to(weights.device)
        rows = stream.source_index.to(weights.device)
        columns = torch.where(key_index >= 0, key_index, total_keys)
        batch = torch.arange(batch_size, device=weights.device)[:, None, None]
        # Advanced indices around a slice put their dimensions first: (batch, rows, columns, heads).
        full[batch, :, rows[:, :, None], columns[:, None, :]] = weights.permute(0, 2, 3, 1)
        return full[:, :, : self.sequence_length, :total_keys]

    def finish(self, last_hidden_state: torch.Tensor) -> dict:
        """The `hidden_states` / `attentions` entries of the model output (absent when not asked for)."""
        outputs = {}
        if self.record_hidden:
            states = self.hidden_states[:-1] + [last_hidden_state]
            if self.selected is not None:
                count = len(states)
                wanted = {index % count for index in self.selected if -count <= index < count}
                states = [state if index in wanted else None for index, state in enumerate(states)]
            outputs["hidden_states"] = tuple(states)
        if self.record_attentions:
            outputs["attentions"] = tuple(self.attentions)
        return outputs


class AdscModelMixin:
    """The ADSC language-model pass, shared by every family's model class (LLaVA, LLaVA-NeXT, LLaVA-OneVision).

    A model class mixes it in before its stock class and, in its `forward`, computes the visual features as the stock
    model does and hands them to `run_language_model`. Nothing here knows the family: units come from the features'
    lengths and the placeholder tokens, positions may carry leading dims (multi-axis RoPE, see `position_embeddings`),
    and `run_language_model(after_layer=...)` lets a family add to the hidden states of chosen layers.
    """

    # The number of tokens each stage keeps depends on the inputs (text-only rows keep all), so no single graph.
    _can_compile_fullgraph = False

    @classmethod
    def is_custom_code(cls) -> bool:
        """False: weights are initialised by the stock classes' own `_init_weights`, exactly as in stock models.

        transformers guards custom code by skipping, when it initialises missing weights, every module without direct
        parameters; CLIP's attention and MLP blocks are such modules and set their child linears' scale, which would
        then keep the generic scale.
        """
        return False

    def begin_forward(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        cache: Cache | None,
        mm_encoder_outputs: dict | None,
        pixel_inputs: str | None,
        kwargs: dict,
    ) -> tuple[torch.Tensor, Cache | None, dict]:
        """What every stock forward does first: the pre-5.24 cache name, exclusive inputs, the token embeddings.

        Args:
            pixel_inputs: the name of the pixel inputs this call was given (None when none), for the error.
            kwargs: the forward's `**kwargs`; `past_key_values` is taken out of it.

        Returns:
            The embeddings, the cache, and a copy of `mm_encoder_outputs` (an empty dict for None) to fill.
        """
        legacy_cache = kwargs.pop("past_key_values", None)  # the pre-5.24 name, still accepted by stock models
        cache = legacy_cache if legacy_cache is not None else cache
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if pixel_inputs is not None and mm_encoder_outputs is not None:
            raise ValueError(f"You cannot specify both {pixel_inputs} and mm_encoder_outputs at the same time")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        return inputs_embeds, cache, dict(mm_encoder_outputs) if mm_encoder_outputs is not None else {}

    def run_language_model(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor,
        visual_features: dict[int, list[torch.Tensor]],
        *,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache: Cache | None,
        use_cache: bool | None,
        adsc_prompt_length: int | None = None,
        after_layer: Callable[[int, torch.Tensor, torch.LongTensor], torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, Cache | None, dict]:
        """The language model's forward with vision tokens dropped at the pruning layers.

        Args:
            inputs_embeds: `(batch, seq, hidden)` token embeddings; the visual features are merged in here.
            visual_features: placeholder token id -> one `(n_i, hidden)` feature tensor per visual unit (an image or
                a video), in batch-row-major order; empty when this forward has none (e.g. decode steps).
            attention_mask: `(batch, past + seq)` padding mask over the original positions, or None.
            position_ids: `(..., batch, seq)` RoPE positions; default `past + arange(seq)` (past = layer 0's cache).
            cache: an `AdscCache`, an empty `DynamicCache` (adopted) or None; each layer caches only the tokens it saw.
            adsc_prompt_length: score-based keep policies rank by the last token before this input position
                (`generate()` passes the prompt's length); default the last token.
            after_layer: `after_layer(layer_idx, hidden_states, source_index)` returns the hidden states the next
                layer gets; `source_index` `(batch, stage_len)` is each slot's input position (`seq` for filler).
            kwargs: passed to the decoder layers; `output_hidden_states` / `output_attentions` (or the same flags on
                the config) ask for per-layer outputs (`LayerOutputs`).

        Returns:
            `(batch, seq, hidden)` normed hidden states at every input position, the cache, and the per-layer outputs
            asked for (`{"hidden_states": ..., "attentions": ...}`, empty when none).
        """
        config = self.config
        num_layers = config.text_config.num_hidden_layers
        validate_schedule(num_layers, config.adsc_pruning_layers, config.adsc_drop_ratio, config.adsc_keep_policy)
        check_attention_mask(attention_mask)
        batch_size, sequence_length, _ = inputs_embeds.shape
        use_cache = self.resolve_use_cache(use_cache)
        cache = self.cache_for_forward(cache, use_cache)
        past_length = cache.get_seq_length(0) if cache is not None else 0
        new_mask = attention_mask[:, -sequence_length:].bool() if attention_mask is not None else None

        with record_function(PROFILER_RANGES["unit_plan"]):
            inputs_embeds, units, masks_padding = self.merge_visual_features(
                input_ids, inputs_embeds, visual_features, new_mask
            )
            self.check_scored_policy(units, past_length)
            layout = StageLayout(sequence_length, (sequence_length,) * batch_size, units)
            scored = config.adsc_keep_policy != "uniform"
            stages = plan_stages(layout, config.adsc_pruning_layers, num_layers, config.adsc_drop_ratio, scored)
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + sequence_length, device=inputs_embeds.device)
        key_mask = self.new_tokens_key_mask(new_mask, masks_padding, cache, stages)
        stream = TokenStream.from_inputs(inputs_embeds, position_ids, key_mask)
        recorder = self.layer_outputs_recorder(inputs_embeds, past_length, kwargs)
        with eager_attention(self.language_model.config, recorder is not None and recorder.record_attentions):
            last_hidden_state = self.run_stages(
                stream, stages, cache, use_cache, recorder, adsc_prompt_length, after_layer, **kwargs
            )
        return last_hidden_state, cache, recorder.finish(last_hidden_state) if recorder is not None else {}

    def run_stages(
        self,
        stream: TokenStream,
        stages: list[Stage],
        cache: Cache | None,
        use_cache: bool,
        recorder: LayerOutputs | None,
        query_before: int | None,
        after_layer: Callable | None,
        **kwargs,
    ) -> torch.Tensor:
        """The layer loop: each stage drops what the plan (or the scores) say, then runs its decoder layers.

        Returns:
            `(batch, seq, hidden)` normed hidden states at the input positions.
        """
        layers, policy = self.language_model.layers, self.config.adsc_keep_policy
        layout = stages[0].layout
        past_length = cache.get_seq_length(0) if cache is not None else 0
        dropped = None  # hidden states of dropped tokens, at their input positions
        layer_before = None  # FastV scores in the layer before the cut: (layer, its input stream, its RoPE)
        rope = self.position_embeddings(stream.hidden_states, stream.position_ids)
        for stage_idx, stage in enumerate(stages):
            stream = stream.to(stream.hidden_states.device)  # with a device_map, layers run on several devices
            if stage.drops:
                with record_function(PROFILER_RANGES["prune"]):
                    dropped = scatter_to_input_positions(dropped, stream)
                    scoring = layer_before if policy == "fastv" else (layers[stage.layers.start], stream, rope)
                    stream = self.prune(stream, stage, layout, scoring, query_before)
                    rope = self.position_embeddings(stream.hidden_states, stream.position_ids)
            layout = stage.layout
            recording = recorder is not None and recorder.record_attentions and stage_idx > 0
            attention = self.stage_attention(
                stream, cache, stage.layers.start, rope, past_length if recording else None
            )
            for layer_idx in stage.layers:
                if policy == "fastv":
                    layer_before = (layers[layer_idx], stream, rope)
                stream = self.run_layer(layer_idx, stream, attention, cache, use_cache, recorder, kwargs)
                if after_layer is not None:
                    hidden_states = after_layer(layer_idx, stream.hidden_states, stream.source_index)
                    stream = replace(stream, hidden_states=hidden_states)

        hidden_states = stream.hidden_states
        if dropped is not None:
            with record_function(PROFILER_RANGES["gather_outputs"]):
                outputs = scatter_to_input_positions(dropped, stream)
                hidden_states = outputs.view(hidden_states.shape[0], stream.input_length + 1, -1)[:, :-1]
        return self.language_model.norm(hidden_states)

    def prune(
        self,
        stream: TokenStream,
        stage: Stage,
        layout: StageLayout,
        scoring: tuple | None,
        query_before: int | None,
    ) -> TokenStream:
        """The stream a pruning stage starts from: the tokens the plan keeps (uniform rule), or, for a score-based
        policy, each unit's best scored in `scoring = (decoder layer, its input stream, its RoPE)`.

        Args:
            layout: where the units sit in `stream` (the previous stage's layout).
        """
        order = stage.order
        if order is None:
            scores = last_token_attention(*scoring, query_before=query_before)
            keep = top_scored_keep(scores, layout, self.config.adsc_drop_ratio)
            order = kept_slot_order(keep, stage.layout.width)
        return stream.select(to_device(order, stream.source_index.device), stage.layout)

    def run_layer(
        self,
        layer_idx: int,
        stream: TokenStream,
        attention: StageAttention,
        cache: Cache | None,
        use_cache: bool,
        recorder: LayerOutputs | None,
        kwargs: dict,
    ) -> TokenStream:
        """One decoder layer on the stream; its keys' mask (and positions) go into the cache with its keys."""
        decoder_layer = self.language_model.layers[layer_idx]
        cached = cache.layers[layer_idx].get_seq_length() if cache is not None else 0
        with capture_attention_weights(decoder_layer, enabled=recorder is not None) as weights:
            # position_ids are deliberately not passed: the RoPE carries them, and flash-attention would read the
            # gaps left by dropped tokens as boundaries of packed sequences.
            hidden_states = decoder_layer(
                stream.hidden_states,
                attention_mask=attention.causal_mask,
                position_embeddings=attention.position_embeddings,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
        stream = replace(stream, hidden_states=hidden_states)
        if cache is not None and cache.layers[layer_idx].get_seq_length() > cached:  # not when checkpointing
            cache.layers[layer_idx].key_mask = attention.key_mask
            cache.layers[layer_idx].key_index = attention.key_index
        if recorder is not None:
            recorder.add_layer(stream, weights.weights, attention.key_index)
        return stream

    def position_embeddings(self, hidden_states: torch.Tensor, position_ids: torch.LongTensor) -> tuple:
        """The rotary `(cos, sin)` of a stage's tokens from their original positions `(..., batch, stage_len)`.

        Families whose rotary module takes other position ids (e.g. multi-axis RoPE with a text row) override it.
        """
        return self.language_model.rotary_emb(hidden_states, position_ids)

    def merge_visual_features(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor,
        visual_features: dict,
        key_mask: torch.BoolTensor | None,
    ) -> tuple[torch.Tensor, VisualUnits, bool | None]:
        """Put each kind's features at its placeholder tokens, as the stock models do, and locate every unit.

        Returns:
            The `(batch, seq, hidden)` embeddings, the units, and whether `key_mask` masks a token (None when this
            forward has no features, so nothing was read). Without features nothing is pruned: a placeholder id is
            then an ordinary token, as in the stock models.
        """
        if not visual_features:
            return inputs_embeds, VisualUnits(), None
        token_ids = list(visual_features)
        masks = [self.placeholder_mask(input_ids, inputs_embeds, token_id) for token_id in token_ids]
        lengths = [[len(feature) for feature in visual_features[token_id]] for token_id in token_ids]
        units, positions, masks_padding = locate_visual_units(masks, lengths, key_mask)
        flat_embeds = inputs_embeds.reshape(-1, inputs_embeds.shape[-1])
        for token_id, kind_positions in zip(token_ids, positions, strict=True):
            if kind_positions.numel():
                merged = torch.cat(list(visual_features[token_id])).to(flat_embeds.device, flat_embeds.dtype)
                flat_embeds = flat_embeds.index_copy(0, kind_positions, merged)
        return flat_embeds.view_as(inputs_embeds), units, masks_padding

    def placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, token_id: int
    ) -> torch.BoolTensor:
        """`(batch, seq)` mask of one placeholder token (from ids, or from embeddings as the stock models do)."""
        if input_ids is not None:
            return input_ids == token_id
        embedding = self.get_input_embeddings()(torch.tensor(token_id, dtype=torch.long).to(inputs_embeds.device))
        return (inputs_embeds == embedding).all(dim=-1)

    def check_scored_policy(self, units: VisualUnits, past_length: int) -> None:
        """Score-based policies rank a unit by attention over the forward's own tokens: images come first."""
        policy = self.config.adsc_keep_policy
        if policy != "uniform" and any(units.lengths) and past_length > 0 and self.config.adsc_pruning_layers:
            raise ValueError(
                f"adsc_keep_policy={policy!r} ranks vision tokens by attention over the forward's own tokens, so "
                f"images must come in the cache's first forward; this one follows {past_length} cached tokens."
            )

    def resolve_use_cache(self, use_cache: bool | None) -> bool:
        """`use_cache` as stock text models resolve it: the config's default, and off while gradient checkpointing
        trains (checkpointed layers drop the cache; transformers' `merge_with_config_defaults`)."""
        use_cache = self.config.text_config.use_cache if use_cache is None else use_cache
        language_model = self.language_model
        if use_cache and language_model.gradient_checkpointing and language_model.training and torch.is_grad_enabled():
            logger.warning_once(
                "`use_cache=True` is incompatible with gradient checkpointing. Setting `use_cache=False`."
            )
            use_cache = False
        return use_cache

    def cache_for_forward(self, cache: Cache | None, use_cache: bool) -> Cache | None:
        """The cache this forward fills: a new `AdscCache`, the caller's, or an error that says why not.

        An empty plain `DynamicCache` is adopted: its layers are replaced, in place, by `AdscCacheLayer`s, so the
        caller's object keeps working across calls. One that already holds keys cached elsewhere is refused: which
        tokens each stage kept, and which were padding, is unknown.
        """
        if cache is None:
            return AdscCache(self.config.text_config) if use_cache else None
        num_layers = self.config.text_config.num_hidden_layers
        if len(cache.layers) == num_layers and all(isinstance(layer, AdscCacheLayer) for layer in cache.layers):
            return cache
        plain_layers = all(type(layer) is DynamicLayer for layer in cache.layers)
        empty = all(layer.get_seq_length() == 0 for layer in cache.layers)
        if isinstance(cache, DynamicCache) and not cache.is_compileable and plain_layers and empty:
            cache.layers[:] = [AdscCacheLayer() for _ in range(num_layers)]
            cache.layer_class_to_replicate = None
            return cache
        refuse_cache(cache)

    def new_tokens_key_mask(
        self,
        new_mask: torch.BoolTensor | None,
        masks_padding: bool | None,
        cache: Cache | None,
        stages: list[Stage],
    ) -> torch.BoolTensor | None:
        """The `(batch, seq)` padding mask of this forward's tokens, or None when it masks none of them.

        Whether it masks any token comes with the unit plan's read (`masks_padding`). Without it, a mask is read once
        (stock's mask builder reads it too), unless every stage's cache already holds masked keys: its attention mask
        is then built anyway, so the step's mask goes in unread (`generate` decoding a padded batch never syncs).
        """
        if new_mask is None:
            return None
        if masks_padding is None:
            stored = [getattr(cache.layers[stage.layers.start], "key_mask", None) for stage in stages] if cache else []
            if stored and all(mask is not None for mask in stored):
                return new_mask
            masks_padding = not bool(new_mask.all())
        return new_mask if masks_padding else None

    def layer_outputs_recorder(
        self, inputs_embeds: torch.Tensor, past_length: int, kwargs: dict
    ) -> "LayerOutputs | None":
        """A `LayerOutputs` when the call or the config asks for per-layer outputs (the call's flags win)."""
        flags = {}
        for name in ("output_hidden_states", "output_attentions"):
            value = kwargs.pop(name, None)
            if value is None:
                value = getattr(self.config, name, False) or getattr(self.config.text_config, name, False)
            flags[name] = value
        if flags["output_hidden_states"] is False and not flags["output_attentions"]:
            return None
        return LayerOutputs(
            inputs_embeds, past_length, flags["output_hidden_states"], bool(flags["output_attentions"])
        )

    def stage_attention(
        self, stream: TokenStream, cache: Cache | None, layer_idx: int, rope: tuple, past_length: int | None
    ) -> StageAttention:
        """What the layers from `layer_idx` to the next stage attend with: a causal mask, built from a key mask.

        Keys are this stage's cached tokens followed by the stream's tokens. The key mask `(batch, past + stage_len)`
        is the one stored for this stage at earlier forwards plus the stream's own; None when neither masks a key,
        and then no 2D mask goes to `create_causal_mask` (sdpa runs `is_causal`, flash-attention its plain kernel).
        `position_ids` never go there either: with gapped positions transformers would guess packed sequences.
        `past_length`: layer 0's cache before this forward, to record the keys' positions (None: not recorded).
        """
        with record_function(PROFILER_RANGES["stage_mask"]):
            past_mask = self.past_key_mask(stream, cache, layer_idx)
            key_mask = None
            if past_mask is not None or stream.key_mask is not None:
                batch_size, stage_length, _ = stream.hidden_states.shape
                cached_length = cache.get_seq_length(layer_idx) if cache is not None else 0
                device = stream.source_index.device
                all_keys = functools.partial(torch.ones, dtype=torch.bool, device=device)
                past_mask = all_keys(batch_size, cached_length) if past_mask is None else past_mask.to(device)
                new_mask = all_keys(batch_size, stage_length) if stream.key_mask is None else stream.key_mask
                key_mask = torch.cat([past_mask, new_mask], dim=1)
            causal_mask = create_causal_mask(
                config=self.language_model.config,
                inputs_embeds=stream.hidden_states,
                attention_mask=key_mask,
                cache=cache,
                layer_idx=layer_idx,
                allow_is_causal_skip=key_mask is None,  # a stored key mask masks some key: no need to read it
            )
        key_index = self.stage_key_index(stream, cache, layer_idx, past_length) if past_length is not None else None
        return StageAttention(causal_mask, rope, key_mask, key_index)

    @staticmethod
    def past_key_mask(stream: TokenStream, cache: Cache | None, layer_idx: int) -> torch.BoolTensor | None:
        """`(batch, past)` padding mask of the keys this stage cached at earlier forwards; None if none is masked."""
        if cache is None:
            return None
        layer = cache.layers[layer_idx]
        batch_size, past_length = stream.hidden_states.shape[0], layer.get_seq_length()
        stored = layer.key_mask
        cached_batch = layer.keys.shape[0] if past_length else batch_size
        if cached_batch != batch_size or (stored is not None and tuple(stored.shape) != (batch_size, past_length)):
            raise ValueError(
                f"The cache's layer {layer_idx} holds {past_length} keys for a batch of {cached_batch}, but its key "
                f"mask has shape {None if stored is None else tuple(stored.shape)} and this forward a batch of "
                f"{batch_size}: the cache's tensors were changed directly rather than through the Cache methods "
                "(reorder_cache, batch_select_indices, crop, ...)."
            )
        return stored

    @staticmethod
    def stage_key_index(
        stream: TokenStream, cache: Cache | None, layer_idx: int, past_length: int
    ) -> torch.LongTensor:
        """`(batch, past + stage_len)` index in the full sequence of each key of a stage after a pruning layer."""
        new_index = stream.key_index(past_length)
        layer = cache.layers[layer_idx] if cache is not None else None
        if layer is None or layer.get_seq_length() == 0:
            return new_index
        if layer.key_index is None:
            raise ValueError(
                "output_attentions after a pruned forward needs that forward to have asked for them too (the "
                "positions of the keys each stage kept are recorded only then): pass output_attentions=True from the "
                "prefill on, as generate() does."
            )
        return torch.cat([layer.key_index.to(new_index.device), new_index], dim=1)


@contextmanager
def eager_attention(text_config, enabled: bool) -> Iterator[None]:
    """While inside (if `enabled`), the decoder layers run eager attention, the one implementation that returns
    attention weights: `output_attentions=True` under sdpa or flash-attention falls back to it, with a warning."""
    implementation = text_config._attn_implementation
    if not enabled or implementation == "eager":
        yield
        return
    logger.warning_once(
        f"output_attentions=True: attn_implementation={implementation!r} computes no attention weights, so the "
        "language model runs eager attention in the forwards that ask for them."
    )
    text_config._attn_implementation = "eager"
    try:
        yield
    finally:
        text_config._attn_implementation = implementation


class AdscLlavaModel(AdscModelMixin, LlavaModel):
    """`LlavaModel` whose language model drops vision tokens at `config.adsc_pruning_layers`."""

    config_class = AdscLlavaConfig

    def __init__(self, config: AdscLlavaConfig):
        check_text_model_supported(config)
        super().__init__(config)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        use_cache: bool | None = None,
        adsc_prompt_length: int | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> LlavaModelOutputWithPast:
        """Same inputs and outputs as `LlavaModel.forward`; `last_hidden_state` is `(batch, seq, hidden)`.

        `adsc_prompt_length`: see `AdscModelMixin.run_language_model` (an explicit argument, so that it never
        reaches the vision tower with the other keyword arguments).
        """
        pixel_inputs = "pixel_values" if pixel_values is not None else None
        inputs_embeds, cache, mm_encoder_outputs = self.begin_forward(
            input_ids, inputs_embeds, cache, mm_encoder_outputs, pixel_inputs, kwargs
        )
        if mm_encoder_outputs.get("image") is None and pixel_values is not None:
            mm_encoder_outputs["image"] = self.get_image_features(
                pixel_values=pixel_values,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                image_sizes=image_sizes,
                return_dict=True,
                **kwargs,
            )
        image_outputs = mm_encoder_outputs.get("image")
        visual_features = (
            {self.config.image_token_id: image_outputs.pooler_output} if image_outputs is not None else {}
        )
        last_hidden_state, cache, layer_outputs = self.run_language_model(
            input_ids,
            inputs_embeds,
            visual_features,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            adsc_prompt_length=adsc_prompt_length,
            **kwargs,
        )
        return LlavaModelOutputWithPast(
            last_hidden_state=last_hidden_state, cache=cache, image_outputs=image_outputs, **layer_outputs
        )


def check_attention_mask(attention_mask: torch.Tensor | None) -> None:
    """Refuse an attention mask the per-stage masks cannot be built from, with an error that says why."""
    if attention_mask is not None and attention_mask.ndim != 2:
        raise ValueError(
            "ADSC-LLaVA builds one causal mask per pruning stage and needs the 2D padding mask "
            f"(batch, seq); got a {attention_mask.ndim}D attention_mask."
        )


class capture_attention_weights:  # noqa: N801 (a context manager used like a function)
    """While inside, `.weights` receives the attention weights `decoder_layer.self_attn` returns (eager only)."""

    def __init__(self, decoder_layer: nn.Module, enabled: bool):
        self.module = decoder_layer.self_attn if enabled else None
        self.weights = None
        self.handle = None

    def __enter__(self) -> "capture_attention_weights":
        if self.module is not None:
            self.handle = self.module.register_forward_hook(self.keep)
        return self

    def keep(self, module, args, output) -> None:
        self.weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None

    def __exit__(self, *exc_info) -> None:
        if self.handle is not None:
            self.handle.remove()


def check_text_model_supported(config: AdscLlavaConfig) -> None:
    """Raise a clear error for text models whose forward the ADSC layer loop does not reproduce."""
    text_config = config.text_config
    if text_config.model_type not in SUPPORTED_TEXT_MODEL_TYPES:
        raise ValueError(
            f"ADSC-LLaVA supports Llama-style text models {SUPPORTED_TEXT_MODEL_TYPES}, got text_config.model_type="
            f"'{text_config.model_type}'."
        )
    layer_types = getattr(text_config, "layer_types", None) or []
    if getattr(text_config, "sliding_window", None) is not None and (
        text_config.model_type == "mistral" or any(kind != "full_attention" for kind in layer_types)
    ):
        raise ValueError(
            f"ADSC-LLaVA needs full attention in every layer, but text_config.sliding_window="
            f"{text_config.sliding_window}; set it to None (LLaVA's Mistral/Qwen2 checkpoints use full attention)."
        )


class AdscGenerationMixin:
    """What ADSC changes in the generation classes: the cache `generate()` creates, and what it refuses."""

    _can_compile_fullgraph = False
    is_custom_code = AdscModelMixin.is_custom_code

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs):
        """`generate()`'s cache: an `AdscCache` where transformers would create a `DynamicCache`."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("cache")
        if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
            model_kwargs["cache"] = AdscCache(
                self.config,
                offloading=cache.offloading,
                offload_only_non_sliding=getattr(cache, "only_non_sliding", False),
            )

    def generate(self, inputs: torch.Tensor | None = None, **kwargs):
        """`GenerationMixin.generate`; with a score-based keep policy every step also gets the prompt's length.

        FastV and PyramidDrop rank vision tokens by the prompt's last token. Without a cache each step's forward
        sees prompt + generated tokens, so the prompt's length tells it which token that is (cached == uncached).
        """
        candidates = (inputs, kwargs.get("input_ids"), kwargs.get("inputs_embeds"))
        prompt = next((candidate for candidate in candidates if candidate is not None), None)
        if prompt is not None and self.config.adsc_keep_policy != "uniform":
            kwargs.setdefault("adsc_prompt_length", prompt.shape[1])
        return super().generate(inputs, **kwargs)

    def _validate_model_kwargs(self, model_kwargs: dict) -> None:
        """transformers' check of `generate()`'s model kwargs, which does not know `adsc_prompt_length`."""
        model_kwargs.pop("adsc_prompt_length", None)  # generate() passes a copy
        super()._validate_model_kwargs(model_kwargs)

    def _prefill(self, input_ids: torch.LongTensor, generation_config, model_kwargs: dict, *args, **kwargs):
        """`generate()`'s prefill; refused in chunks when the prompt has images or videos.

        transformers hands each chunk its placeholders' feature rows as one entry, so a chunk would see pieces of
        units without their lengths and keep other tokens than one forward does.
        """
        visual_inputs = [name for name in VISUAL_INPUT_NAMES if holds_visual_input(model_kwargs.get(name))]
        if generation_config.prefill_chunk_size is not None and visual_inputs:
            raise ValueError(
                f"ADSC-LLaVA cannot prefill in chunks (prefill_chunk_size={generation_config.prefill_chunk_size}) "
                f"a prompt with images or videos ({', '.join(visual_inputs)}): each chunk would get its share of an "
                "image's features without the image's length, so it would keep other tokens than one prefill does. "
                "Pass prefill_chunk_size=None (text-only prompts may be chunked)."
            )
        return super()._prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)

    def init_continuous_batching(self, *args, **kwargs):
        """Refused: continuous batching's paged cache gives every layer the same blocks per request."""
        raise NotImplementedError(
            "ADSC-LLaVA does not support continuous batching (generate_batch, cache_implementation='paged', "
            "`transformers serve --continuous-batching`): its paged KV cache allocates the same blocks to every "
            "layer, but after a pruning layer the layers cache fewer tokens. Use generate() with the default cache."
        )


def holds_visual_input(value) -> bool:
    """Whether a generation input carries pixels or features (`mm_encoder_outputs` may map every kind to None)."""
    if isinstance(value, dict):
        return any(output is not None for output in value.values())
    return value is not None


class AdscLlavaForConditionalGeneration(AdscGenerationMixin, LlavaForConditionalGeneration):
    """`LlavaForConditionalGeneration` with ADSC: same parameters and outputs, fewer tokens in deeper layers.

    Logits have the stock shape `(batch, seq, vocab)`; at dropped vision positions they are the prediction from the
    hidden state the token had when it was dropped (see the module docstring).
    """

    config_class = AdscLlavaConfig

    def __init__(self, config: AdscLlavaConfig):
        LlavaPreTrainedModel.__init__(self, config)
        self.model = AdscLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


# Remote-code classes do not get transformers' checkpoint conversion mapping, so stock llava-hf checkpoints (including
# the older `language_model.model.*` layout) would load with missing keys. Register LLaVA's mapping for ours.
register_checkpoint_conversion_mapping("adsc_llava", get_checkpoint_conversion_mapping("llava"), overwrite=True)
register_checkpoint_conversion_mapping(
    "AdscLlavaModel", get_checkpoint_conversion_mapping("LlavaModel"), overwrite=True
)

# `save_pretrained` copies this file and, through its relative import, `configuration_adsc_llava.py` next to the
# weights (transformers' `custom_object_save`); the config's `auto_map` (`ADSC_AUTO_MAP`) names both Auto classes.
AdscLlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "AdscCache",
    "AdscCacheLayer",
    "AdscLlavaForConditionalGeneration",
    "AdscGenerationMixin",
    "AdscLlavaModel",
    "AdscModelMixin",
    "StageLayout",
    "VisualUnits",
    "locate_visual_units",
    "plan_stages",
]
