"""ADSC-LLaVA: LLaVA that drops vision tokens inside its language model (Attention-Driven Self-Compression).

At each pruning layer `l` of `config.adsc_pruning_layers` every image keeps `floor((1 - r) * n)` of its `n` alive
vision tokens, at the positions `uniform_keep_indices(n, k)`; text tokens are never dropped. From layer `l` on, the
decoder layers see the shorter sequence, so their hidden states and KV cache are shorter. Kept tokens keep their
original RoPE positions. Attention itself is untouched, so eager, sdpa and flash-attention all work.

`config.adsc_keep_policy` names which tokens a unit keeps: ADSC's uniform positions (the default), or, as baselines
with the same counts, the most attended ones (FastV, PyramidDrop: `last_token_attention` + `top_scored_in_unit`).

This file is shipped inside every ADSC checkpoint (remote code): it imports only torch, transformers and its config.

How a forward runs (`AdscLlavaModel.run_decoder`):

    stream = TokenStream(all input tokens)                # hidden states, positions, masks, image offsets
    for layer in decoder layers:
        if layer starts a stage (layer 0 or a pruning layer):
            stream = prune_vision_tokens(stream, ...)     # gather the kept tokens (pruning layers only)
                                                          # (baselines: ranked by one layer's last-token attention)
            mask, rope = this stage's causal mask and rotary embeddings
        stream.hidden_states = layer(stream.hidden_states, mask, rope, cache)
    hidden states of every input position = its state after the last layer it reached, then the final norm

Dropped tokens: the output at a dropped position is the hidden state the token had when it was dropped (after the
final norm), so logits keep the stock `[batch, seq, vocab]` shape. Image tokens are never supervised in LLaVA
training, so the loss is unaffected; do not read next-token predictions at dropped positions.
"""

from .configuration_adsc_llava import check_transformers_version

check_transformers_version()  # before the imports below, which an older transformers would break

from dataclasses import dataclass, replace

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
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .configuration_adsc_llava import AdscLlavaConfig, uniform_keep_positions, validate_schedule

# Text models whose decoder layers take `(hidden_states, attention_mask, position_embeddings, cache)` and whose model
# forward does nothing else than embed -> layers -> norm: the layer loop below is exactly their forward.
SUPPORTED_TEXT_MODEL_TYPES = ("llama", "mistral", "qwen2")

# `torch.profiler` ranges around ADSC's own work, so any profiler trace shows what pruning costs. Stock LLaVA builds
# one causal mask per forward too; every further "stage_mask" range is ADSC's.
PROFILER_RANGES = {
    "image_offsets": "adsc::image_token_offsets",
    "prune": "adsc::prune_vision_tokens",
    "stage_mask": "adsc::stage_causal_mask",
    "gather_outputs": "adsc::gather_outputs",
}


def uniform_keep_indices(num_tokens: int, num_keep: int) -> torch.LongTensor:
    """`uniform_keep_positions(num_tokens, num_keep)` (ADSC's rule, defined with the config so that serving engines
    share it) as a `torch.LongTensor` of shape `(num_keep,)`."""
    return torch.tensor(uniform_keep_positions(num_tokens, num_keep), dtype=torch.long)


def visual_unit_offsets(
    unit_token_mask: torch.BoolTensor, unit_lengths: list[int] | torch.LongTensor
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Each placeholder token's index within its visual unit and that unit's length; `-1` and `0` for other tokens.

    A visual unit is one image's (or one video's) span of placeholder tokens: `unit_lengths[u]` tokens, the units in
    batch-row-major order, each a contiguous run within one row (two units may touch). Anything else (a prompt cut
    through an image, a count that does not add up) is an error.

    Args:
        unit_token_mask: `(batch, seq)`, True at the placeholder tokens of these units.
        unit_lengths: the tokens of each unit, in order (e.g. the lengths of the image features).

    Returns:
        `(batch, seq)` offsets and `(batch, seq)` unit lengths.
    """
    lengths = torch.as_tensor(unit_lengths, dtype=torch.long, device=unit_token_mask.device)
    flat_mask = unit_token_mask.flatten()
    if int(flat_mask.sum()) != int(lengths.sum()):
        raise ValueError(
            f"Image features and image tokens do not match: the prompt holds {int(flat_mask.sum())} image tokens "
            f"but the images give {int(lengths.sum())} features ({len(lengths)} images or videos of "
            f"{lengths.tolist()[:8]}{' ...' if len(lengths) > 8 else ''} tokens)."
        )
    rank = flat_mask.long().cumsum(0) - 1  # index of each placeholder among all of the batch's
    ends = lengths.cumsum(0)
    unit = torch.searchsorted(ends, rank.clamp(min=0), right=True).clamp(max=max(len(lengths) - 1, 0))
    offsets = torch.where(flat_mask, rank - (ends - lengths)[unit], -1).view_as(unit_token_mask)
    unit_length = torch.where(flat_mask, lengths[unit], 0).view_as(unit_token_mask)
    previous = nn.functional.pad(offsets[:, :-1], (1, 0), value=-1)
    broken = unit_token_mask & (offsets > 0) & (previous != offsets - 1)  # a unit cut by text or by a row's end
    last = unit_token_mask & (offsets == unit_length - 1)
    following = nn.functional.pad(offsets[:, 1:], (0, 1), value=-1)
    unfinished = unit_token_mask & ~last & (following != offsets + 1)
    if bool(broken.any()) or bool(unfinished.any()):
        raise ValueError(
            "Truncated image span: every image (or video) needs its placeholder tokens in one consecutive run of "
            f"{lengths.tolist()[:8]} tokens, but a run is cut by text or by the end of a row. Was the prompt "
            "truncated through an image?"
        )
    return offsets, unit_length


def kept_in_unit(
    offsets: torch.LongTensor, unit_lengths: torch.LongTensor, drop_ratio: float
) -> tuple[torch.BoolTensor, torch.LongTensor, torch.LongTensor]:
    """Which vision tokens survive one pruning layer, and their new offsets and unit lengths (every unit at once).

    A unit of `n` alive tokens keeps `k = floor((1 - r) * n)` of them, those `uniform_keep_indices(n, k)` names:
    `p_i = floor((2i + 1) n / 2k)`. As `p_i` rises by `n / k >= 1`, offset `o` can only be `p_i` for
    `i = ceil((2ok - n) / 2n)`, so membership is one integer test per token, with no loop over units.

    Args:
        offsets: `(batch, len)` index of each token in its unit's alive tokens, -1 for text.
        unit_lengths: `(batch, len)` alive tokens of each token's unit (0 for text).
        drop_ratio: `r`.

    Returns:
        `keep` (True for kept vision tokens, False for dropped ones and for text), the kept tokens' offsets among the
        survivors (`i`) and their unit's new length (`k`).
    """
    n = unit_lengths
    k = torch.floor((1.0 - drop_ratio) * n.double()).long()
    index = -torch.div(n - 2 * offsets * k, 2 * n.clamp(min=1), rounding_mode="floor")  # ceil((2ok - n) / 2n)
    position = torch.div((2 * index + 1) * n, 2 * k.clamp(min=1), rounding_mode="floor")
    keep = (offsets >= 0) & (index >= 0) & (index < k) & (position == offsets)
    return keep, index, k


def top_scored_in_unit(
    scores: torch.Tensor, offsets: torch.LongTensor, unit_lengths: torch.LongTensor, drop_ratio: float
) -> tuple[torch.BoolTensor, torch.LongTensor, torch.LongTensor]:
    """As `kept_in_unit`, but each unit keeps its `k = floor((1 - r) * n)` highest-scored tokens.

    Ties keep the earlier token. Kept tokens stay in their original order; their new offsets count them in it.

    Args:
        scores: `(batch, len)` a score per token (only vision tokens' are read).
        offsets: `(batch, len)` index of each token in its unit's alive tokens, -1 for text.
        unit_lengths: `(batch, len)` alive tokens of each token's unit (0 for text).
        drop_ratio: `r`.
    """
    is_vision = offsets >= 0
    positions = torch.arange(offsets.shape[1], device=offsets.device).expand_as(offsets)
    unit_start = positions - offsets.clamp(min=0)  # a unit's tokens are contiguous in every stage
    # Sort by score (stable: earlier first on ties), then by unit (stable: score order kept within a unit).
    by_score = torch.argsort(torch.where(is_vision, scores.float(), -torch.inf), dim=1, descending=True, stable=True)
    unit_key = torch.where(is_vision, unit_start, offsets.shape[1])  # text sorts last
    by_unit = by_score.gather(1, torch.argsort(unit_key.gather(1, by_score), dim=1, stable=True))
    sorted_key = unit_key.gather(1, by_unit)
    starts_block = nn.functional.pad(sorted_key[:, 1:] != sorted_key[:, :-1], (1, 0), value=True)
    block_start = torch.where(starts_block, positions, 0).cummax(dim=1).values
    rank = torch.empty_like(positions).scatter_(1, by_unit, positions - block_start)  # rank within the unit
    k = torch.floor((1.0 - drop_ratio) * unit_lengths.double()).long()
    keep = is_vision & (rank < k)
    kept_before = keep.long().cumsum(dim=1) - keep.long()
    new_offsets = kept_before - kept_before.gather(1, unit_start)
    return keep, new_offsets, k


@dataclass
class TokenStream:
    """The tokens one stage of decoder layers sees, in their original order, one row per sample.

    Rows keep different numbers of tokens (e.g. a text-only row loses nothing), so shorter rows end in filler slots
    that are never attended to. All tensors are `(batch, stage_len)` except `hidden_states` `(batch, stage_len, dim)`.
    """

    hidden_states: torch.Tensor
    position_ids: torch.LongTensor  # original RoPE positions
    source_index: torch.LongTensor  # position in this forward's input sequence
    token_valid: torch.BoolTensor  # False for filler slots
    key_mask: torch.BoolTensor  # may be attended to: not padding and not filler
    image_offsets: torch.LongTensor  # index within its visual unit's alive tokens, -1 for text
    unit_lengths: torch.LongTensor  # alive tokens of the token's visual unit (image or video), 0 for text

    @classmethod
    def from_inputs(
        cls,
        inputs_embeds: torch.Tensor,
        position_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        image_offsets: torch.LongTensor,
        unit_lengths: torch.LongTensor,
    ) -> "TokenStream":
        """Every input token, as layer 0 sees it; `attention_mask` `(batch, past + seq)` may be None (no padding)."""
        batch_size, sequence_length, _ = inputs_embeds.shape
        device = inputs_embeds.device
        all_tokens = torch.ones(batch_size, sequence_length, dtype=torch.bool, device=device)
        return cls(
            hidden_states=inputs_embeds,
            position_ids=position_ids.expand(batch_size, -1),
            source_index=torch.arange(sequence_length, device=device).expand(batch_size, -1),
            token_valid=all_tokens,
            key_mask=attention_mask[:, -sequence_length:].bool() if attention_mask is not None else all_tokens,
            image_offsets=image_offsets,
            unit_lengths=unit_lengths,
        )

    def to(self, device: torch.device) -> "TokenStream":
        """The stream with every per-token tensor on `device` (with a `device_map`, where the next layer runs)."""
        if self.source_index.device == device:
            return self
        return TokenStream(**{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})

    def key_index(self, past_length: int) -> torch.LongTensor:
        """`(batch, stage_len)` index of each token in the full sequence (`past + seq`), -1 for filler slots."""
        return torch.where(self.token_valid, self.source_index + past_length, -1)


@torch.no_grad()
def last_token_attention(
    decoder_layer: nn.Module, stream: TokenStream, position_embeddings: tuple, query_before: int | None = None
) -> torch.Tensor:
    """`(batch, stage_len)` attention each token gets from its row's last token in `decoder_layer`, head-averaged.

    The one query row is recomputed from the layer's input (its input norm, q/k projections and RoPE), so any
    attention implementation runs the layer itself. Softmax over the keys the query sees: the forward's own tokens
    up to it. `query_before`: the query is the row's last token before this input position (default: the last).
    """
    attention = decoder_layer.self_attn
    device = attention.q_proj.weight.device  # with a device_map, the stream may still be on the previous stage's
    hidden_states = decoder_layer.input_layernorm(stream.hidden_states.to(device))
    key_mask = stream.key_mask.to(device)
    cos, sin = (table.to(device) for table in position_embeddings)
    batch_size, stage_length, _ = hidden_states.shape
    rows = torch.arange(batch_size, device=device)
    source_index = stream.source_index.to(device)
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
    logits = logits.masked_fill(~seen[:, None, None, :], -torch.inf)
    return logits.softmax(dim=-1).mean(dim=1)[:, 0].to(stream.key_mask.device)


def prune_vision_tokens(stream: TokenStream, drop_ratio: float, scores: torch.Tensor | None = None) -> TokenStream:
    """Keep text tokens and, in every visual unit, `floor((1 - r) * n)` of its vision tokens, compacting each row.

    Args:
        stream: the tokens of the stage that ends here.
        drop_ratio: `r`: a unit of `n` alive tokens keeps `floor((1 - r) * n)`.
        scores: `(batch, stage_len)` to keep each unit's highest-scored tokens (`top_scored_in_unit`); None keeps
            ADSC's uniform positions (`kept_in_unit`).

    Returns:
        The next stage's stream: kept tokens first in their original order, then filler slots.
    """
    is_vision = stream.image_offsets >= 0
    if scores is None:
        keeps_vision, new_offsets, new_lengths = kept_in_unit(stream.image_offsets, stream.unit_lengths, drop_ratio)
    else:
        keeps_vision, new_offsets, new_lengths = top_scored_in_unit(
            scores, stream.image_offsets, stream.unit_lengths, drop_ratio
        )
    keep = stream.token_valid & (~is_vision | keeps_vision)
    num_kept = keep.sum(dim=1)
    # A stable sort puts each row's kept slots first, in order; one gather moves every per-token tensor.
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, : int(num_kept.max())]
    token_valid = torch.arange(order.shape[1], device=order.device) < num_kept[:, None]
    batch_size, stage_length, hidden_size = stream.hidden_states.shape
    flat_order = (order + torch.arange(batch_size, device=order.device)[:, None] * stage_length).flatten()
    kept_vision = token_valid & is_vision.gather(1, order)
    return TokenStream(
        hidden_states=stream.hidden_states.reshape(-1, hidden_size)
        .index_select(0, flat_order)
        .view(batch_size, -1, hidden_size),
        position_ids=stream.position_ids.gather(1, order),
        source_index=stream.source_index.gather(1, order),
        token_valid=token_valid,
        key_mask=stream.key_mask.gather(1, order) & token_valid,
        image_offsets=torch.where(kept_vision, new_offsets.gather(1, order), -1),
        unit_lengths=torch.where(kept_vision, new_lengths.gather(1, order), 0),
    )


def scatter_to_input_positions(
    outputs: torch.Tensor | None, stream: TokenStream, sequence_length: int
) -> torch.Tensor:
    """Write the stream's valid hidden states at their input positions.

    Args:
        outputs: `(batch * (seq + 1), dim)` buffer from an earlier call, or None to start one. Each sample has one
            extra trash row, where filler slots are written.
        stream: the tokens whose current hidden states are written.
        sequence_length: `seq`, the forward's input length.

    Returns:
        The buffer, written in place; `outputs.view(batch, seq + 1, dim)[:, :seq]` are the hidden states.
    """
    batch_size, _, hidden_size = stream.hidden_states.shape
    if outputs is None:
        outputs = stream.hidden_states.new_zeros(batch_size * (sequence_length + 1), hidden_size)
    row_offsets = torch.arange(batch_size, device=stream.source_index.device)[:, None] * (sequence_length + 1)
    index = torch.where(stream.token_valid, stream.source_index, sequence_length) + row_offsets
    hidden_states = stream.hidden_states.reshape(-1, hidden_size).to(outputs.device)
    return outputs.index_copy_(0, index.flatten().to(outputs.device), hidden_states)


class AdscCacheLayer(DynamicLayer):
    """A `DynamicLayer` that also records, for each cached key, whether it may be attended to and where it stands.

    After a pruning layer a layer caches a subset of the sequence, so its keys alone no longer tell which of them were
    padding (or filler slots of shorter rows) nor which input positions they came from. Both ride along here, and
    every cache operation transformers performs (beam reordering, batch selection and repetition, cropping for
    assisted decoding, reset, offloading) applies to them together with the keys.

    Attributes:
        key_mask: `(batch, cached)` bool, False for padding and filler slots (None before the first forward).
        key_index: `(batch, cached)` long, each key's index in the full sequence seen so far, -1 for filler slots.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.key_mask: torch.BoolTensor | None = None
        self.key_index: torch.LongTensor | None = None

    def append_key_info(self, key_mask: torch.BoolTensor, key_index: torch.LongTensor) -> None:
        """Record the mask and indices of the `(batch, new)` keys this layer is about to cache."""
        if self.key_mask is None:
            self.key_mask, self.key_index = key_mask, key_index
            return
        self.key_mask = torch.cat([self.key_mask, key_mask.to(self.key_mask.device)], dim=1)
        self.key_index = torch.cat([self.key_index, key_index.to(self.key_index.device)], dim=1)

    def _apply_to_key_info(self, function) -> None:
        if self.key_mask is not None:
            self.key_mask, self.key_index = function(self.key_mask), function(self.key_index)

    def reset(self) -> None:
        super().reset()
        self.key_mask = self.key_index = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._apply_to_key_info(lambda tensor: tensor.index_select(0, beam_idx.to(tensor.device)))

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0:
            self._apply_to_key_info(lambda tensor: tensor[:, :tokens_to_remove])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._apply_to_key_info(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._apply_to_key_info(lambda tensor: tensor[indices.to(tensor.device)])

    def offload(self) -> None:
        super().offload()
        self._apply_to_key_info(lambda tensor: tensor.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        super().prefetch()
        if self.is_initialized:
            self._apply_to_key_info(lambda tensor: tensor.to(self.device, non_blocking=True))


class AdscCache(DynamicCache):
    """The cache ADSC-LLaVA fills: a `DynamicCache` with one `AdscCacheLayer` per decoder layer.

    Layers cache different numbers of tokens (`get_seq_length(layer_idx)` is the text plus that layer's vision tokens),
    and each layer keeps its keys' padding mask and positions in step with its keys. `generate()` creates it; a plain
    `DynamicCache` passed by a caller is adopted while still empty (see `AdscLlavaModel.cache_for_forward`).
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

    def add_layer(self, stream: TokenStream, attention_weights: torch.Tensor | None, key_index: torch.LongTensor):
        """Record one layer's output `stream` and its stage-local `(batch, heads, stage_len, keys)` weights."""
        if self.record_hidden:
            self.current = scatter_to_input_positions(self.current.clone(), stream, self.sequence_length)
            view = self.current.view(self.batch_size, self.sequence_length + 1, -1)[:, : self.sequence_length]
            self.hidden_states.append(view)
        if self.record_attentions and attention_weights is not None:
            self.attentions.append(self.full_attention_weights(stream, attention_weights, key_index))

    def full_attention_weights(
        self, stream: TokenStream, weights: torch.Tensor, key_index: torch.LongTensor
    ) -> torch.Tensor:
        """Scatter stage-local weights to `(batch, heads, seq, past + seq)`; filler rows and keys go to a trash row."""
        batch_size, num_heads, _, _ = weights.shape
        total_keys = self.past_length + self.sequence_length
        if weights.shape[-2:] == (self.sequence_length, total_keys) and bool(
            (key_index == torch.arange(total_keys, device=key_index.device)).all()
        ):
            return weights  # nothing dropped yet: the layer's own tensor, so gradients reach it as in stock models
        full = weights.new_zeros(batch_size, num_heads, self.sequence_length + 1, total_keys + 1)
        key_index = key_index.to(weights.device)
        rows = torch.where(stream.token_valid, stream.source_index, self.sequence_length).to(weights.device)
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
    """The ADSC language-model pass, shared by the LLaVA, LLaVA-NeXT and LLaVA-OneVision model classes.

    A model class mixes it in before its stock class and, in its `forward`, computes the visual features as the stock
    model does and hands them to `run_language_model`.
    """

    # The number of tokens each stage keeps is data-dependent (text-only rows keep all), so no single graph.
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
        **kwargs,
    ) -> tuple[torch.Tensor, Cache | None, dict]:
        """Merge the visual features into the embeddings and run `run_decoder`.

        Args:
            visual_features: placeholder token id -> one `(n_i, hidden)` feature tensor per visual unit (an image or
                a video), in batch-row-major order; empty when this forward has none (e.g. decode steps).
        """
        inputs_embeds, image_offsets, unit_lengths = self.merge_visual_features(
            input_ids, inputs_embeds, visual_features
        )
        return self.run_decoder(
            inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=self.config.text_config.use_cache if use_cache is None else use_cache,
            image_offsets=image_offsets,
            unit_lengths=unit_lengths,
            **kwargs,
        )

    def merge_visual_features(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, visual_features: dict
    ) -> tuple[torch.Tensor, torch.LongTensor, torch.LongTensor]:
        """Put each kind's features at its placeholder tokens, as the stock models do, and find every unit's tokens.

        Returns:
            The `(batch, seq, hidden)` embeddings, each token's `(batch, seq)` index within its visual unit (-1 for
            text) and `(batch, seq)` its unit's length (0 for text). Without features in this forward nothing is
            pruned: a placeholder id is then an ordinary token, as in the stock models.
        """
        offsets = torch.full(inputs_embeds.shape[:2], -1, dtype=torch.long, device=inputs_embeds.device)
        lengths = torch.zeros_like(offsets)
        for token_id, features in visual_features.items():
            mask = self.placeholder_mask(input_ids, inputs_embeds, token_id)
            with record_function(PROFILER_RANGES["image_offsets"]):
                unit_offsets, unit_lengths = visual_unit_offsets(mask, [len(feature) for feature in features])
            merged = torch.cat(list(features), dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.masked_scatter(mask[..., None], merged)
            offsets, lengths = torch.where(mask, unit_offsets, offsets), torch.where(mask, unit_lengths, lengths)
        return inputs_embeds, offsets, lengths

    def placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, token_id: int
    ) -> torch.BoolTensor:
        """`(batch, seq)` mask of one placeholder token (from ids, or from embeddings as the stock models do)."""
        if input_ids is not None:
            return input_ids == token_id
        embedding = self.get_input_embeddings()(torch.tensor(token_id, dtype=torch.long, device=inputs_embeds.device))
        return (inputs_embeds == embedding).all(dim=-1)

    def run_decoder(
        self,
        inputs_embeds: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache: Cache | None,
        use_cache: bool,
        image_offsets: torch.LongTensor,
        unit_lengths: torch.LongTensor,
        adsc_prompt_length: int | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, Cache | None, dict]:
        """The language model's forward with vision tokens dropped at the pruning layers.

        Args:
            inputs_embeds: `(batch, seq, hidden)` embeddings with image features merged in.
            attention_mask: `(batch, past + seq)` padding mask over the original positions, or None.
            position_ids: `(batch, seq)` RoPE positions; default `past + arange(seq)` (past = layer 0's cache).
            cache: an `AdscCache`, an empty `DynamicCache` (adopted) or None; each layer caches only the tokens it saw.
            image_offsets: `(batch, seq)` index of each vision token within its visual unit, -1 for text.
            unit_lengths: `(batch, seq)` tokens of each vision token's unit (an image, or a video), 0 for text.
            adsc_prompt_length: score-based keep policies rank by the last token before this input position
                (`generate()` passes the prompt's length); default the last token.
            kwargs: passed to the decoder layers; `output_hidden_states` / `output_attentions` (or the same flags on
                the config) ask for per-layer outputs (`LayerOutputs`).

        Returns:
            `(batch, seq, hidden)` normed hidden states at every input position, the cache, and the per-layer outputs
            asked for (`{"hidden_states": ..., "attentions": ...}`, empty when none).
        """
        config = self.config
        keep_policy = config.adsc_keep_policy
        validate_schedule(
            config.text_config.num_hidden_layers, config.adsc_pruning_layers, config.adsc_drop_ratio, keep_policy
        )
        language_model = self.language_model
        batch_size, sequence_length, _ = inputs_embeds.shape

        check_attention_mask(attention_mask)
        cache = self.cache_for_forward(cache, use_cache)
        past_length = cache.get_seq_length(0) if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + sequence_length, device=inputs_embeds.device)
        stream = TokenStream.from_inputs(inputs_embeds, position_ids, attention_mask, image_offsets, unit_lengths)
        recorder = self.layer_outputs_recorder(inputs_embeds, past_length, kwargs)
        has_vision_tokens = bool((image_offsets >= 0).any())
        pruning_layers = set(config.adsc_pruning_layers)
        if keep_policy != "uniform" and has_vision_tokens and past_length > 0 and pruning_layers:
            raise ValueError(
                f"adsc_keep_policy={keep_policy!r} ranks vision tokens by attention over the forward's own tokens, so "
                f"images must come in the cache's first forward; this one follows {past_length} cached tokens."
            )
        layer_before = None  # FastV scores in the layer before the cut: (layer, its input stream, its RoPE)
        dropped_outputs = None  # hidden states of dropped tokens, at their input positions

        # Recomputed only for a pruned stream: stages that drop nothing (e.g. at decode steps) share these.
        position_embeddings = language_model.rotary_emb(stream.hidden_states, stream.position_ids)
        for layer_idx, decoder_layer in enumerate(language_model.layers[: config.text_config.num_hidden_layers]):
            if layer_idx == 0 or layer_idx in pruning_layers:
                stream = stream.to(stream.hidden_states.device)  # with a device_map, layers run on several devices
                if layer_idx > 0 and has_vision_tokens:
                    with record_function(PROFILER_RANGES["prune"]):
                        dropped_outputs = scatter_to_input_positions(dropped_outputs, stream, sequence_length)
                        scoring = {"fastv": layer_before, "pyramiddrop": (decoder_layer, stream, position_embeddings)}
                        scores = (
                            last_token_attention(*scoring[keep_policy], query_before=adsc_prompt_length)
                            if keep_policy in scoring
                            else None
                        )
                        stream = prune_vision_tokens(stream, config.adsc_drop_ratio, scores)
                        has_vision_tokens = bool((stream.image_offsets >= 0).any())
                        position_embeddings = language_model.rotary_emb(stream.hidden_states, stream.position_ids)
                with record_function(PROFILER_RANGES["stage_mask"]):
                    causal_mask = self.stage_causal_mask(stream, cache, layer_idx)
                key_index = stream.key_index(past_length)
            if cache is not None and isinstance(cache.layers[layer_idx], AdscCacheLayer):
                cache.layers[layer_idx].append_key_info(stream.key_mask, key_index)
            if keep_policy == "fastv":
                layer_before = (decoder_layer, stream, position_embeddings)
            with capture_attention_weights(decoder_layer, enabled=recorder is not None) as attention:
                # position_ids are deliberately not passed: the RoPE above carries them, and flash-attention would
                # read the gaps left by dropped tokens as boundaries of packed sequences.
                hidden_states = decoder_layer(
                    stream.hidden_states,
                    attention_mask=causal_mask,
                    position_embeddings=position_embeddings,
                    cache=cache,
                    use_cache=use_cache,
                    **kwargs,
                )
            stream = replace(stream, hidden_states=hidden_states)
            if recorder is not None:
                cached = cache.layers[layer_idx] if cache is not None else None
                keys_seen = key_index if getattr(cached, "key_index", None) is None else cached.key_index
                recorder.add_layer(stream, attention.weights, keys_seen)

        if dropped_outputs is not None:
            with record_function(PROFILER_RANGES["gather_outputs"]):
                outputs = scatter_to_input_positions(dropped_outputs, stream, sequence_length)
                hidden_states = outputs.view(batch_size, sequence_length + 1, -1)[:, :sequence_length]
        last_hidden_state = language_model.norm(hidden_states)
        return last_hidden_state, cache, recorder.finish(last_hidden_state) if recorder is not None else {}

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

    def stage_causal_mask(self, stream: TokenStream, cache: Cache | None, layer_idx: int) -> torch.Tensor | None:
        """The causal mask for the layers from `layer_idx` to the next pruning layer, in the attention's format.

        Keys are this stage's cached tokens followed by the stream's tokens, so the 2D padding mask is the one stored
        for this stage at earlier forwards plus the stream's own. It is always passed explicitly: with gapped
        positions and no 2D mask, transformers would guess a packed (block-diagonal) mask.
        """
        past_key_mask = self.past_key_mask(stream, cache, layer_idx)
        key_mask = torch.cat([past_key_mask.to(stream.key_mask.device), stream.key_mask], dim=1)
        return create_causal_mask(
            config=self.language_model.config,
            inputs_embeds=stream.hidden_states,
            attention_mask=key_mask,
            cache=cache,
            position_ids=stream.position_ids,
            layer_idx=layer_idx,
        )

    @staticmethod
    def past_key_mask(stream: TokenStream, cache: Cache | None, layer_idx: int) -> torch.BoolTensor:
        """`(batch, past)` padding mask of the keys this stage cached at earlier forwards."""
        batch_size = stream.key_mask.shape[0]
        past_length = cache.get_seq_length(layer_idx) if cache is not None else 0
        stored = getattr(cache.layers[layer_idx], "key_mask", None) if cache is not None else None
        if stored is not None:
            if tuple(stored.shape) != (batch_size, past_length):
                raise ValueError(
                    f"The cache's layer {layer_idx} holds {past_length} keys for a batch of {batch_size}, but its key "
                    f"mask has shape {tuple(stored.shape)}: the cache's tensors were changed directly rather than "
                    "through the Cache methods (reorder_cache, batch_select_indices, crop, ...)."
                )
            return stored
        return stream.key_mask.new_zeros(batch_size, 0)  # `cache_for_forward` admits no keys cached elsewhere


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
        **kwargs: Unpack[TransformersKwargs],
    ) -> LlavaModelOutputWithPast:
        """Same inputs and outputs as `LlavaModel.forward`; `last_hidden_state` is `(batch, seq, hidden)`."""
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
        visual_features = {self.config.image_token_id: image_outputs.pooler_output} if image_outputs else {}
        last_hidden_state, cache, layer_outputs = self.run_language_model(
            input_ids,
            inputs_embeds,
            visual_features,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            **kwargs,
        )
        return LlavaModelOutputWithPast(
            last_hidden_state=last_hidden_state,
            cache=cache,
            image_outputs=mm_encoder_outputs.get("image"),
            **layer_outputs,
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

    def init_continuous_batching(self, *args, **kwargs):
        """Refused: continuous batching's paged cache gives every layer the same blocks per request."""
        raise NotImplementedError(
            "ADSC-LLaVA does not support continuous batching (generate_batch, cache_implementation='paged', "
            "`transformers serve --continuous-batching`): its paged KV cache allocates the same blocks to every "
            "layer, but after a pruning layer the layers cache fewer tokens. Use generate() with the default cache."
        )


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
    "prune_vision_tokens",
    "uniform_keep_indices",
]
