"""The baselines as keep policies: FastV and PyramidDrop pick which vision tokens survive, with ADSC's counts.

Each policy is checked against the naive full-length reference (`reference_forward`), which takes its scores from its
own attention weights and picks tokens one image at a time in plain Python; then cached == uncached generation, the
same cache lengths (budget accounting) for every policy, the vectorised top-k against a loop with ties, and errors.
"""

import importlib.util
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import reference_alive_masks, reference_forward
from transformers import DynamicCache, LlavaConfig

from adsc_llava import AdscLlavaConfig
from adsc_llava import configuration_adsc_llava as configuration
from adsc_llava import modeling_adsc_llava as modeling
from adsc_llava.configuration_adsc_llava import policy_pruning_layers
from adsc_llava.families import adsc_config_for
from adsc_llava.modeling_adsc_llava import StageLayout, VisualUnits, top_scored_keep

from conftest import IMAGE_TOKEN_ID, make_batch, tiny_adsc_model

MAX_ABS_DIFF = 1e-5
SCORED_POLICIES = ["fastv", "pyramiddrop"]


def policy_model(keep_policy: str, pruning_layers: list[int], drop_ratio: float, attn_implementation: str = "sdpa"):
    model = tiny_adsc_model(
        pruning_layers=pruning_layers, drop_ratio=drop_ratio, attn_implementation=attn_implementation
    )
    model.config.adsc_keep_policy = keep_policy
    return model


@pytest.mark.parametrize("keep_policy", SCORED_POLICIES)
@pytest.mark.parametrize(
    "pruning_layers, drop_ratio, padding_side, attn_implementation",
    [([2], 0.75, "left", "eager"), ([1, 2], 0.5, "left", "sdpa"), ([1, 3], 0.5, "right", "sdpa")],
    ids=["fastv-like-eager", "consecutive-sdpa", "right-padding-sdpa"],
)
def test_pruned_prefill_equals_naive_reference(keep_policy, pruning_layers, drop_ratio, padding_side,
                                               attn_implementation):  # fmt: skip
    model = policy_model(keep_policy, pruning_layers, drop_ratio, attn_implementation)
    batch = make_batch([1, 2, 0], text_lengths=[4, 3, 9], padding_side=padding_side)
    alive = torch.ones(4, *batch["input_ids"].shape, dtype=torch.bool)
    with torch.no_grad():
        ours = model.model(**batch).last_hidden_state
        reference = reference_forward(model, batch, alive, keep_policy=keep_policy)
    text_positions = (batch["input_ids"] != IMAGE_TOKEN_ID) & batch["attention_mask"].bool()
    assert (ours[text_positions] - reference["normed"][text_positions]).abs().max() <= MAX_ABS_DIFF
    # The policy keeps ADSC's counts but other tokens than ADSC's uniform positions.
    uniform = reference_alive_masks(batch["input_ids"], pruning_layers, drop_ratio, num_layers=4)
    assert torch.equal(reference["alive"].sum(dim=2), uniform.sum(dim=2))
    assert not torch.equal(reference["alive"], uniform)


@pytest.mark.parametrize("num_beams", [1, 2], ids=["greedy", "beam"])
@pytest.mark.parametrize("keep_policy", ["uniform", *SCORED_POLICIES])
def test_cached_generation_equals_uncached_and_cache_lengths_match_the_budget(keep_policy, num_beams):
    model = policy_model(keep_policy, [1, 3], 0.5)
    batch = make_batch([1, 2], text_lengths=[6, 2])  # images_per_row below
    settings_ = {"max_new_tokens": 6, "do_sample": False, "num_beams": num_beams,
                 "pad_token_id": model.config.text_config.pad_token_id}  # fmt: skip
    with torch.no_grad():
        cached = model.generate(**batch, use_cache=True, **settings_)
        uncached = model.generate(**batch, use_cache=False, **settings_)
        cache = model(**batch, use_cache=True).cache
    assert torch.equal(cached, uncached)
    # Per layer: the longest row of text, padding and kept vision tokens (shorter rows end in filler slots).
    tokens_per_layer = model.config.vision_tokens_per_layer()
    width, images_per_row = batch["input_ids"].shape[1], [1, 2]
    for layer_idx, layer in enumerate(cache.layers):
        dropped = tokens_per_layer[0] - tokens_per_layer[layer_idx]
        assert layer.keys.shape[-2] == max(width - images * dropped for images in images_per_row)


@st.composite
def scored_rows(draw):
    """Rows of text tokens and units (possibly adjacent), filler after shorter rows, integer scores (ties common)."""
    batch_size = draw(st.integers(1, 3))
    pieces = [draw(st.lists(st.integers(0, 6), min_size=1, max_size=5)) for _ in range(batch_size)]
    row_lengths = [sum(max(piece, 1) for piece in row) for row in pieces]
    rows, starts, lengths = [], [], []
    for row, row_pieces in enumerate(pieces):  # 0: one text token, n > 0: a unit of n tokens
        start = 0
        for piece in row_pieces:
            if piece:
                rows, starts, lengths = rows + [row], starts + [start], lengths + [piece]
            start += max(piece, 1)
    layout = StageLayout(max(row_lengths), tuple(row_lengths), VisualUnits(tuple(rows), tuple(starts), tuple(lengths)))
    scores = [draw(st.lists(st.integers(0, 3), min_size=layout.width, max_size=layout.width)) for _ in pieces]
    drop_ratio = draw(st.sampled_from([0.0, 0.25, 0.5, 0.6, 0.9]))
    return layout, scores, drop_ratio


@settings(max_examples=200, deadline=None)
@given(scored_rows())
def test_top_scored_keep_equals_a_loop_with_ties(case):
    """Each unit keeps its `floor((1 - r) * n)` best scores, the earlier token on ties; text stays, filler goes."""
    layout, scores, drop_ratio = case
    expected = [[index < length for index in range(layout.width)] for length in layout.row_lengths]
    for row, start, length in layout.units:
        unit = range(start, start + length)
        ranked = sorted(unit, key=lambda i: (-scores[row][i], i))[: math.floor((1 - drop_ratio) * length)]
        for i in unit:
            expected[row][i] = i in ranked
    keep = top_scored_keep(torch.tensor(scores, dtype=torch.float), layout, drop_ratio)
    assert keep.tolist() == expected


def test_unknown_policy_and_images_after_cached_tokens_are_refused():
    with pytest.raises(ValueError, match="adsc_keep_policy must be one of"):
        AdscLlavaConfig.from_llava_config(tiny_adsc_model().config.to_llava_config(), keep_policy="random")
    model = policy_model("fastv", [1], 0.5)
    model.config.adsc_keep_policy = "topk"
    with pytest.raises(ValueError, match="adsc_keep_policy must be one of"):
        model(**make_batch([1]))
    model.config.adsc_keep_policy = "fastv"
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(**make_batch([0]), cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="images must come in the cache's first forward"):
            second = make_batch([1], seed=1)
            mask = torch.cat([torch.ones(1, cache.get_seq_length()), second["attention_mask"]], dim=1).long()
            model(**second | {"attention_mask": mask}, cache=cache, use_cache=True)


def test_policies_share_the_budget_and_round_trip_through_the_config():
    config = tiny_adsc_model().config.to_llava_config()
    uniform = AdscLlavaConfig.from_llava_config(config, pruning_layers=[2], budget=10)
    fastv = AdscLlavaConfig.from_llava_config(config, pruning_layers=[2], budget=10, keep_policy="fastv")
    assert fastv.adsc_drop_ratio == uniform.adsc_drop_ratio
    assert fastv.vision_tokens_per_layer() == uniform.vision_tokens_per_layer()
    assert fastv.with_budget(8).adsc_keep_policy == "fastv"
    assert AdscLlavaConfig.from_dict(fastv.to_dict()).schedule == fastv.schedule
    assert "adsc_keep_policy" not in fastv.to_llava_config().to_dict()


@pytest.mark.parametrize("keep_policy", ["uniform", *SCORED_POLICIES])
def test_a_policy_without_layers_gets_its_own(keep_policy):
    """FastV prunes once at K = 2 of 32, PyramidDrop at 8, 16, 24: a config built without layers has the policy's."""
    stock = LlavaConfig()  # 32 layers, 576 tokens
    own = policy_pruning_layers(keep_policy, 32)
    by_ratio = AdscLlavaConfig.from_llava_config(stock, drop_ratio=0.5, keep_policy=keep_policy)
    by_budget = AdscLlavaConfig.from_llava_config(stock, budget=300, keep_policy=keep_policy)
    assert by_ratio.adsc_pruning_layers == by_budget.adsc_pruning_layers == own
    assert by_budget.average_vision_tokens() <= 300
    assert by_budget.with_budget(400).adsc_pruning_layers == own


@pytest.mark.parametrize("keep_policy", SCORED_POLICIES)
def test_a_row_whose_query_sees_no_key_scores_zero_not_nan(keep_policy, monkeypatch):
    """An all-padding row has no token to query from: its scores are 0 (ties keep the earlier tokens), never NaN."""
    recorded, original = [], modeling.last_token_attention

    def recording(*args, **kwargs):
        recorded.append(original(*args, **kwargs))
        return recorded[-1]

    monkeypatch.setattr(modeling, "last_token_attention", recording)
    model = policy_model(keep_policy, [1, 2], 0.5)
    batch = make_batch([1, 1], text_lengths=[4, 4], padding_side="left")
    batch["attention_mask"][1] = 0  # the second row, image included, is all padding
    with torch.no_grad():
        logits = model(**batch).logits
    assert recorded and all(torch.isfinite(scores).all() for scores in recorded)
    assert torch.isfinite(logits[0]).all()


def test_a_remote_code_config_keeps_its_keep_policy_in_the_librarys_class():
    """A checkpoint's config loaded with `trust_remote_code` is another class object with the same fields; tools
    that solve budgets (`adsc-llava cost`, `bench`) turn it into the library's class, keep policy included."""
    spec = importlib.util.spec_from_file_location("remote_configuration_adsc_llava", configuration.__file__)
    remote_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(remote_module)
    remote = remote_module.AdscLlavaConfig.from_llava_config(LlavaConfig(), budget=192, keep_policy="fastv")
    assert not isinstance(remote, AdscLlavaConfig)
    library = adsc_config_for(remote)
    assert isinstance(library, AdscLlavaConfig)
    assert (
        library.schedule
        == remote.schedule
        == {
            "adsc_pruning_layers": [2],
            "adsc_drop_ratio": remote.adsc_drop_ratio,
            "adsc_keep_policy": "fastv",
        }
    )
