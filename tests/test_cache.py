"""AdscCache: the per-key masks stay in step with the keys through every cache operation transformers performs."""

import pytest
import torch
from transformers import DynamicCache, StaticCache

from adsc_llava.modeling_adsc_llava import AdscCache, AdscCacheLayer

from conftest import IMAGE_TOKEN_ID, make_batch, tiny_adsc_model

MAX_ABS_DIFF = 1e-5
# A pruning schedule that drops most vision tokens, and a batch whose rows differ in images and padding, so that a
# mask out of step with its keys changes the logits.
SCHEDULE = dict(pruning_layers=[1, 2], drop_ratio=0.6)


def mixed_batch() -> dict:
    return make_batch([1, 2, 0], text_lengths=[3, 6, 11], padding_side="left", seed=3)


def select_rows(batch: dict, rows: list[int]) -> dict:
    """The batch of the given rows (images follow their rows, in order)."""
    images_per_row = (batch["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1) // 16
    starts = torch.cat([torch.zeros(1, dtype=torch.long), images_per_row.cumsum(0)])
    selected = {key: batch[key][rows] for key in ("input_ids", "attention_mask")}
    images = [batch["pixel_values"][starts[row] : starts[row + 1]] for row in rows]
    if sum(len(image) for image in images):
        selected["pixel_values"] = torch.cat(images)
    return selected


@torch.no_grad()
def prefill(model, batch: dict, cache=None):
    cache = AdscCache(model.config) if cache is None else cache
    model(**batch, cache=cache, use_cache=True)
    return cache


@torch.no_grad()
def decode_logits(model, batch: dict, cache, token: int = 7) -> torch.Tensor:
    """Logits of one decode step feeding `token` to every row after `batch`'s prompt."""
    tokens = torch.full((batch["input_ids"].shape[0], 1), token)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(tokens)], dim=1)
    return model(input_ids=tokens, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1]


def fresh_decode_logits(model, batch: dict) -> torch.Tensor:
    return decode_logits(model, batch, prefill(model, batch))


def test_generate_creates_an_adsc_cache_with_key_masks_only_where_keys_are_masked():
    model = tiny_adsc_model(**SCHEDULE)
    options = dict(max_new_tokens=2, return_dict_in_generate=True, do_sample=False)
    unpadded = model.generate(**make_batch([1]), **options).cache
    assert isinstance(unpadded, AdscCache) and all(isinstance(layer, AdscCacheLayer) for layer in unpadded.layers)
    # No padding, no filler: no masks, so every stage takes the attention's unmasked path; no key positions either.
    assert all(layer.key_mask is None and layer.key_index is None for layer in unpadded.layers)
    # Padded rows: every layer's mask is as long as its keys.
    padded = model.generate(**mixed_batch(), **options).cache
    assert all(layer.key_mask.shape == layer.keys.shape[::2][:2] for layer in padded.layers)
    # Rows of one length keeping different counts: filler slots are masked from the first pruning layer on.
    same_length = make_batch([1, 0], text_lengths=[3, 20])
    assert same_length["attention_mask"].all()
    filled = model.generate(**same_length, **options).cache
    assert [layer.key_mask is None for layer in filled.layers] == [True, False, False, False]
    # Key positions are kept while per-layer attentions are asked for, after the first pruning layer.
    eager = tiny_adsc_model(**SCHEDULE, attn_implementation="eager")
    recorded = eager.generate(**mixed_batch(), **options, output_attentions=True).cache
    assert [layer.key_index is None for layer in recorded.layers] == [True, False, False, False]
    assert all(layer.key_index.shape == layer.key_mask.shape for layer in recorded.layers[1:])


def test_offloading_leaves_the_key_masks_on_the_compute_stream():
    """An offloaded cache moves keys on a side stream; the key masks are read before `Cache.update` waits for it.

    They stay where the compute stream wrote them (a meta tensor here: any copy of it would raise).
    """
    layer = AdscCacheLayer()
    layer.key_mask = torch.ones(2, 5, dtype=torch.bool, device="meta")
    layer.key_index = torch.zeros(2, 5, dtype=torch.long, device="meta")
    key_mask, key_index = layer.key_mask, layer.key_index
    layer.offload()
    layer.prefetch()
    assert layer.key_mask is key_mask and layer.key_index is key_index


@pytest.mark.parametrize("rows", [[2, 0, 1], [1, 1, 0]], ids=["permutation", "repeat"])
def test_reorder_cache_keeps_masks_in_step(rows):
    model = tiny_adsc_model(**SCHEDULE)
    batch = mixed_batch()
    cache = prefill(model, batch)
    cache.reorder_cache(torch.tensor(rows))
    reordered = select_rows(batch, rows)
    assert (decode_logits(model, reordered, cache) - fresh_decode_logits(model, reordered)).abs().max() <= MAX_ABS_DIFF


def test_batch_select_indices_keeps_masks_in_step():
    model = tiny_adsc_model(**SCHEDULE)
    batch = mixed_batch()
    cache = prefill(model, batch)
    cache.batch_select_indices(torch.tensor([0, 2]))
    kept = select_rows(batch, [0, 2])
    assert (decode_logits(model, kept, cache) - fresh_decode_logits(model, kept)).abs().max() <= MAX_ABS_DIFF


def test_batch_repeat_interleave_keeps_masks_in_step():
    model = tiny_adsc_model(**SCHEDULE)
    batch = mixed_batch()
    cache = prefill(model, batch)
    cache.batch_repeat_interleave(2)
    repeated = select_rows(batch, [0, 0, 1, 1, 2, 2])
    assert (decode_logits(model, repeated, cache) - fresh_decode_logits(model, repeated)).abs().max() <= MAX_ABS_DIFF


def test_crop_removes_keys_and_their_masks_together():
    """Assisted decoding crops rejected candidates: decoding the same token again gives the same logits."""
    model = tiny_adsc_model(**SCHEDULE)
    batch = mixed_batch()
    cache = prefill(model, batch)
    first = decode_logits(model, batch, cache, token=7)
    lengths = [cache.get_seq_length(i) for i in range(4)]
    cache.crop(-1)
    assert [cache.get_seq_length(i) for i in range(4)] == [length - 1 for length in lengths]
    assert all(layer.key_mask.shape[1] == layer.keys.shape[2] for layer in cache.layers)
    assert (decode_logits(model, batch, cache, token=7) - first).abs().max() <= MAX_ABS_DIFF


def test_reset_cache_is_reusable():
    model = tiny_adsc_model(**SCHEDULE)
    batch = mixed_batch()
    cache = prefill(model, make_batch([2, 1], text_lengths=[9, 2]))
    cache.reset()
    assert all(layer.key_mask is None for layer in cache.layers)
    assert (
        decode_logits(model, batch, prefill(model, batch, cache)) - fresh_decode_logits(model, batch)
    ).abs().max() <= (MAX_ABS_DIFF)


def test_a_users_empty_dynamic_cache_is_adopted_in_place():
    model = tiny_adsc_model(**SCHEDULE)
    batch = mixed_batch()
    cache = DynamicCache(config=model.config.text_config)
    logits = decode_logits(model, batch, prefill(model, batch, cache))
    assert type(cache) is DynamicCache and all(isinstance(layer, AdscCacheLayer) for layer in cache.layers)
    assert (logits - fresh_decode_logits(model, batch)).abs().max() <= MAX_ABS_DIFF
    lazy = DynamicCache()  # no config: layers would be created lazily
    assert (decode_logits(model, batch, prefill(model, batch, lazy)) - logits).abs().max() <= MAX_ABS_DIFF


def test_tensors_changed_behind_the_cache_are_detected():
    model = tiny_adsc_model(**SCHEDULE)
    batch = mixed_batch()
    cache = prefill(model, batch)
    for layer in cache.layers:  # bypasses the Cache methods: the masks cannot follow
        layer.keys, layer.values = layer.keys[:2], layer.values[:2]
    with pytest.raises(ValueError, match="changed directly rather than through the Cache methods"):
        decode_logits(model, select_rows(batch, [0, 1]), cache)


def test_caches_adsc_cannot_fill_are_refused_by_name():
    model = tiny_adsc_model(**SCHEDULE)
    batch = make_batch([1])
    with pytest.raises(ValueError, match="cannot use a StaticCache: static"):
        model(**batch, cache=StaticCache(config=model.config.text_config, max_cache_len=64), use_cache=True)
    filled = DynamicCache(config=model.config.text_config)
    filled.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), layer_idx=0)
    with pytest.raises(ValueError, match="cannot use a DynamicCache: it already holds keys"):
        model(**batch, cache=filled, use_cache=True)
    with pytest.raises(NotImplementedError, match="does not support continuous batching"):
        model.generate(**batch, max_new_tokens=2, cache_implementation="paged")


def test_quantized_cache_is_refused_by_name():
    from transformers import QuantizedCache

    model = tiny_adsc_model(**SCHEDULE)
    try:
        cache = QuantizedCache(backend="fp8", config=model.config.text_config)
    except (ImportError, ValueError, RuntimeError, TypeError) as error:
        pytest.skip(f"no quantized cache backend on this machine: {error}")
    with pytest.raises(ValueError, match="cannot use a QuantizedCache: its layers keep keys in a quantized store"):
        model(**make_batch([1]), cache=cache, use_cache=True)
