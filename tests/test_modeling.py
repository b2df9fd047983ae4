"""AdscLlavaForConditionalGeneration against stock LLaVA, an independent reference, and itself (cache vs no cache)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_alive_masks, reference_text_hidden_states
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from conftest import (
    IMAGE_TOKEN_ID,
    TOKENS_PER_IMAGE,
    make_batch,
    stock_twin,
    tiny_adsc_model,
)

MAX_ABS_DIFF = 1e-5


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# 1. Nothing pruned == stock LLaVA


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("schedule", [([], 0.0), ([1, 3], 0.0)], ids=["empty-schedule", "ratio-zero"])
def test_without_pruning_logits_equal_stock_llava(attn_implementation, schedule):
    pruning_layers, drop_ratio = schedule
    model = tiny_adsc_model(
        pruning_layers=pruning_layers, drop_ratio=drop_ratio, attn_implementation=attn_implementation
    )
    stock = stock_twin(model)
    for batch in (make_batch([1]), make_batch([1, 1], text_lengths=[3, 8], padding_side="left")):
        with torch.no_grad():
            ours, theirs = model(**batch).logits, stock(**batch).logits
        assert ours.shape == theirs.shape
        assert max_abs_diff(ours, theirs) <= MAX_ABS_DIFF


def test_without_pruning_generate_equals_stock_llava():
    model = tiny_adsc_model()
    stock = stock_twin(model)
    batch = make_batch([1, 2], text_lengths=[2, 6], padding_side="left")
    options = dict(max_new_tokens=10, do_sample=False, suppress_tokens=[IMAGE_TOKEN_ID])
    assert torch.equal(model.generate(**batch, **options), stock.generate(**batch, **options))


# 2. Pruned prefill == an independent naive reference


@pytest.mark.parametrize(
    "pruning_layers, drop_ratio",
    [([1], 0.5), ([1, 2, 3], 0.3), ([2], 0.99), ([1, 3], 0.7)],
    ids=["one-layer", "three-layers", "drop-all", "two-layers"],
)
def test_pruned_prefill_equals_naive_reference(pruning_layers, drop_ratio):
    model = tiny_adsc_model(pruning_layers=pruning_layers, drop_ratio=drop_ratio, attn_implementation="eager")
    batch = make_batch([1, 2, 0], text_lengths=[4, 3, 9], padding_side="left")
    alive = reference_alive_masks(batch["input_ids"], pruning_layers, drop_ratio, num_layers=4)
    with torch.no_grad():
        ours = model.model(**batch).last_hidden_state
        reference = reference_text_hidden_states(model, batch, alive)
    text_positions = (batch["input_ids"] != IMAGE_TOKEN_ID) & batch["attention_mask"].bool()
    assert max_abs_diff(ours[text_positions], reference[text_positions]) <= MAX_ABS_DIFF
    # The reference really prunes: it differs from the unpruned model at text positions.
    assert not alive[-1].all()


# 3. Cached generation == uncached generation (property-based)

MODELS_BY_DEPTH = {}


def model_with_schedule(num_layers: int, pruning_layers: list[int], drop_ratio: float):
    if num_layers not in MODELS_BY_DEPTH:
        MODELS_BY_DEPTH[num_layers] = tiny_adsc_model(num_layers=num_layers, seed=num_layers)
    model = MODELS_BY_DEPTH[num_layers]
    model.config.adsc_pruning_layers, model.config.adsc_drop_ratio = pruning_layers, drop_ratio
    return model


@st.composite
def generation_cases(draw):
    num_layers = draw(st.integers(2, 4))
    pruning_layers = sorted(draw(st.sets(st.integers(1, num_layers - 1), min_size=1)))
    drop_ratio = draw(st.sampled_from([0.0, 0.25, 0.5, 0.8, 0.99]))  # 0.99 drops every vision token
    images_per_row = draw(st.lists(st.integers(0, 2), min_size=1, max_size=3))
    text_lengths = draw(st.lists(st.integers(1, 6), min_size=len(images_per_row), max_size=len(images_per_row)))
    padding_side = draw(st.sampled_from(["left", "right"]))
    num_beams = draw(st.sampled_from([1, 2]))
    return num_layers, pruning_layers, drop_ratio, images_per_row, text_lengths, padding_side, num_beams


@settings(max_examples=60, deadline=None, derandomize=True)
@given(case=generation_cases())
def test_cached_generation_equals_uncached(case):
    num_layers, pruning_layers, drop_ratio, images_per_row, text_lengths, padding_side, num_beams = case
    model = model_with_schedule(num_layers, pruning_layers, drop_ratio)
    batch = make_batch(images_per_row, text_lengths, padding_side=padding_side, seed=sum(text_lengths))
    options = dict(max_new_tokens=6, do_sample=False, num_beams=num_beams, suppress_tokens=[IMAGE_TOKEN_ID])
    with_cache = model.generate(**batch, **options, use_cache=True)
    without_cache = model.generate(**batch, **options, use_cache=False)
    assert torch.equal(with_cache, without_cache)


def test_decode_positions_continue_from_original_length():
    """Decode tokens sit at original length + step: moving them to the shortened cache length changes the output."""
    model = tiny_adsc_model(pruning_layers=[1], drop_ratio=0.75)
    batch = make_batch([1])
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(**batch, cache=cache, use_cache=True)
        next_token = torch.tensor([[7]])
        mask = torch.cat([batch["attention_mask"], torch.ones(1, 1, dtype=torch.long)], dim=1)
        original_length = batch["input_ids"].shape[1]
        right = model(input_ids=next_token, attention_mask=mask, cache=cache, use_cache=True).logits
        full = model(
            input_ids=torch.cat([batch["input_ids"], next_token], 1),
            pixel_values=batch["pixel_values"],
            attention_mask=mask,
        ).logits
    assert cache.get_seq_length(0) == original_length + 1
    assert cache.get_seq_length(1) < cache.get_seq_length(0)
    assert max_abs_diff(right[:, -1], full[:, -1]) <= MAX_ABS_DIFF


# 4. Per-layer cache lengths after prefill


@pytest.mark.parametrize("pruning_layers, drop_ratio", [([1], 0.5), ([1, 2, 3], 0.4), ([2, 3], 0.99), ([], 0.0)])
def test_cache_lengths_follow_vision_tokens_per_layer(pruning_layers, drop_ratio):
    model = tiny_adsc_model(pruning_layers=pruning_layers, drop_ratio=drop_ratio)
    images_per_row = [2, 2]
    batch = make_batch(images_per_row, text_lengths=[4, 4])
    text_length = int((batch["input_ids"][0] != IMAGE_TOKEN_ID).sum())
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(**batch, cache=cache, use_cache=True)
    expected = [text_length + 2 * tokens for tokens in model.config.vision_tokens_per_layer(TOKENS_PER_IMAGE)]
    assert [cache.get_seq_length(i) for i in range(4)] == expected
    assert (expected[-1] < expected[0]) == bool(pruning_layers and drop_ratio > 0)


def test_mixed_batch_cache_is_as_long_as_its_longest_row():
    """A text-only row keeps all its tokens; the image row shrinks; the cache fits the longer one."""
    model = tiny_adsc_model(pruning_layers=[1], drop_ratio=0.5)
    batch = make_batch([1, 0], text_lengths=[3, 25])
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(**batch, cache=cache, use_cache=True)
    text_only_length = int(batch["attention_mask"][1].sum())
    image_row_pruned = int(batch["attention_mask"][0].sum()) - TOKENS_PER_IMAGE // 2
    assert cache.get_seq_length(1) == max(text_only_length, image_row_pruned) + (
        batch["input_ids"].shape[1] - text_only_length
    )


# Training


def test_training_loss_and_gradient_checkpointing():
    model = tiny_adsc_model(pruning_layers=[1, 2], drop_ratio=0.5)
    batch = make_batch([1, 1], text_lengths=[4, 6], padding_side="right")
    labels = batch["input_ids"].masked_fill(
        (batch["input_ids"] == IMAGE_TOKEN_ID) | (batch["attention_mask"] == 0), -100
    )
    model.train()
    loss = model(**batch, labels=labels, use_cache=False).loss
    model.gradient_checkpointing_enable()
    checkpointed = model(**batch, labels=labels, use_cache=False)
    checkpointed.loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - checkpointed.loss.item()) <= 1e-6
    assert checkpointed.logits.shape == (*batch["input_ids"].shape, model.config.text_config.vocab_size)
    projector_grad = model.model.multi_modal_projector.linear_1.weight.grad
    deep_layer_grad = model.model.language_model.layers[3].self_attn.q_proj.weight.grad
    assert projector_grad.abs().sum() > 0 and deep_layer_grad.abs().sum() > 0


def test_image_token_id_in_a_decode_step_is_an_ordinary_token():
    """Without image features in the forward there is nothing to prune; stock LLaVA just embeds the token."""
    model = tiny_adsc_model(pruning_layers=[1], drop_ratio=0.5)
    stock = stock_twin(model)
    batch = make_batch([1])
    mask = torch.cat([batch["attention_mask"], torch.ones(1, 1, dtype=torch.long)], dim=1)
    logits = []
    for candidate in (model, stock):
        cache = DynamicCache(config=model.config.text_config)
        with torch.no_grad():
            candidate(**batch, cache=cache, use_cache=True)
            step = candidate(input_ids=torch.tensor([[IMAGE_TOKEN_ID]]), attention_mask=mask, cache=cache)
        logits.append(step.logits)
    assert torch.isfinite(logits[0]).all()
    model.config.adsc_pruning_layers = []  # unpruned, the two models agree on that step too
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(**batch, cache=cache, use_cache=True)
        unpruned = model(input_ids=torch.tensor([[IMAGE_TOKEN_ID]]), attention_mask=mask, cache=cache).logits
    assert max_abs_diff(unpruned, logits[1]) <= MAX_ABS_DIFF


def test_gradient_checkpointing_with_the_default_use_cache_returns_no_cache_as_stock():
    """Checkpointed layers run without their cache, so stock turns `use_cache` off; a cache would hold no keys."""
    model = tiny_adsc_model(pruning_layers=[1, 2], drop_ratio=0.5)
    batch = make_batch([1, 1], text_lengths=[4, 6], padding_side="right")
    caches = []
    for candidate in (stock_twin(model), model):
        candidate.train()
        candidate.gradient_checkpointing_enable()
        caches.append(candidate(**batch).cache)  # no use_cache argument: the config says True
    assert caches == [None, None]


# transformers features around the forward


def test_output_attentions_under_sdpa_falls_back_to_eager_attention():
    """sdpa computes no weights; the forwards that ask for them run eager attention, so they get them all."""
    sdpa = tiny_adsc_model(pruning_layers=[1], drop_ratio=0.5)
    eager = tiny_adsc_model(pruning_layers=[1], drop_ratio=0.5, attn_implementation="eager")
    batch = make_batch([1, 0], padding_side="left")
    with torch.no_grad():
        ours, reference = sdpa(**batch, output_attentions=True), eager(**batch, output_attentions=True)
    assert len(ours.attentions) == len(reference.attentions) == 4
    for mine, theirs in zip(ours.attentions, reference.attentions, strict=True):
        assert max_abs_diff(mine, theirs) <= MAX_ABS_DIFF
    assert sdpa.config.text_config._attn_implementation == "sdpa"  # back to sdpa after the forward


def test_chunked_prefill_of_a_prompt_with_images_is_refused_and_of_text_allowed():
    """transformers gives each chunk its feature rows as one entry: units would be pruned in pieces."""
    model = tiny_adsc_model(pruning_layers=[1], drop_ratio=0.5)
    options = dict(max_new_tokens=3, do_sample=False, suppress_tokens=[IMAGE_TOKEN_ID])
    for images_per_row in ([1], [1, 1]):
        batch = make_batch(images_per_row, padding_side="left")
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=batch.pop("pixel_values"), return_dict=True)
        with pytest.raises(
            ValueError, match=r"cannot prefill in chunks \(prefill_chunk_size=8\) a prompt with images"
        ):
            model.generate(**batch, mm_encoder_outputs={"image": features}, prefill_chunk_size=8, **options)
    with pytest.raises(ValueError, match="cannot prefill in chunks"):  # pixels are encoded before the prefill
        model.generate(**make_batch([1]), prefill_chunk_size=8, **options)
    text = make_batch([0], text_lengths=[20])
    assert torch.equal(model.generate(**text, prefill_chunk_size=8, **options), model.generate(**text, **options))


def test_an_empty_feature_list_is_a_prompt_without_images():
    model = tiny_adsc_model(pruning_layers=[1], drop_ratio=0.5)
    batch = make_batch([0, 0])
    with torch.no_grad():
        expected = model(**batch).logits
        empty = BaseModelOutputWithPooling(pooler_output=[])
        assert torch.equal(model(**batch, mm_encoder_outputs={"image": empty}).logits, expected)


def test_adsc_prompt_length_never_reaches_the_vision_tower():
    """Score-based policies take it in every forward (`generate` passes it); CLIP's layers must not get it."""
    model = tiny_adsc_model(pruning_layers=[1], drop_ratio=0.5)
    model.config.adsc_keep_policy = "fastv"
    seen = []
    model.model.vision_tower.register_forward_pre_hook(lambda module, args, kwargs: seen.append(set(kwargs)),
                                                       with_kwargs=True)  # fmt: skip
    batch = make_batch([1])
    with torch.no_grad():
        model(**batch, adsc_prompt_length=batch["input_ids"].shape[1] - 2)
    assert seen and not any("adsc_prompt_length" in kwargs for kwargs in seen)
