"""AdscLlavaConfig: the schedule, the budget solver, validation, and the keep rule."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlavaConfig

from adsc_llava import AdscLlavaConfig, uniform_keep_positions
from adsc_llava.configuration_adsc_llava import default_pruning_layers, solve_drop_ratio, vision_tokens_per_layer

from conftest import tiny_config

# LLaVA-1.5-7B pruned at [2, 8, 16, 24]: tokens per layer and r from the paper's Table IV (facts file).
PAPER_SCHEDULES = {
    192: (0.418, [576] * 2 + [335] * 6 + [194] * 8 + [112] * 8 + [65] * 8),
    128: (0.561, [576] * 2 + [252] * 6 + [110] * 8 + [48] * 8 + [21] * 8),
    64: (0.800, [576] * 2 + [114] * 6 + [22] * 8 + [4] * 8 + [0] * 8),
}


@pytest.mark.parametrize("budget", sorted(PAPER_SCHEDULES))
def test_budget_solver_reproduces_paper_schedules(budget):
    paper_ratio, paper_tokens = PAPER_SCHEDULES[budget]
    config = AdscLlavaConfig.from_llava_config(LlavaConfig(), budget=budget)
    assert config.adsc_pruning_layers == [2, 8, 16, 24]
    assert round(config.adsc_drop_ratio, 3) == paper_ratio
    assert config.vision_tokens_per_layer() == paper_tokens
    assert config.average_vision_tokens() <= budget
    # The solved r is the smallest that meets the budget: a little less overshoots it.
    smaller = vision_tokens_per_layer(32, [2, 8, 16, 24], config.adsc_drop_ratio - 1e-3, 576)
    assert sum(smaller) / 32 > budget


def test_unreachable_budget_names_the_reachable_range():
    with pytest.raises(ValueError, match=r"reachable range is \[36, 576\]"):
        AdscLlavaConfig.from_llava_config(LlavaConfig(), budget=30)
    with pytest.raises(ValueError, match="unreachable"):
        AdscLlavaConfig.from_llava_config(LlavaConfig(), pruning_layers=[16], budget=200)
    assert solve_drop_ratio(32, [2, 8, 16, 24], 576, 576) == 0.0


def test_default_pruning_layers_scale_with_depth():
    assert default_pruning_layers(32) == [2, 8, 16, 24]
    assert default_pruning_layers(40) == [2, 10, 20, 30]
    assert default_pruning_layers(4) == [1, 2, 3]
    assert default_pruning_layers(2) == [1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"adsc_pruning_layers": [0, 2], "adsc_drop_ratio": 0.5}, r"entry 0 is out of range: each must be in \[1, 4"),
        ({"adsc_pruning_layers": [1, 4], "adsc_drop_ratio": 0.5}, r"entry 4 is out of range"),
        ({"adsc_pruning_layers": [2, 1], "adsc_drop_ratio": 0.5}, "strictly increasing"),
        ({"adsc_pruning_layers": [1, 1], "adsc_drop_ratio": 0.5}, "strictly increasing"),
        ({"adsc_pruning_layers": [1], "adsc_drop_ratio": 1.0}, r"adsc_drop_ratio must be in \[0, 1\), got 1.0"),
        ({"adsc_pruning_layers": [1], "adsc_drop_ratio": -0.1}, r"got -0.1"),
    ],
)
def test_bad_schedules_are_rejected_on_construction(kwargs, message):
    config_dict = tiny_config().to_dict()
    config_dict.update(kwargs)
    with pytest.raises(ValueError, match=message):
        AdscLlavaConfig(**config_dict)


def test_from_llava_config_keeps_fields_and_round_trips(tmp_path):
    stock = LlavaConfig(image_token_index=7, image_seq_length=100)
    config = AdscLlavaConfig.from_llava_config(stock, pruning_layers=[4, 20], drop_ratio=0.5)
    assert (config.image_token_id, config.image_seq_length) == (7, 100)
    assert config.vision_tokens_per_layer() == [100] * 4 + [50] * 16 + [25] * 12
    config.save_pretrained(tmp_path)
    reloaded = AdscLlavaConfig.from_pretrained(tmp_path)
    assert (reloaded.adsc_pruning_layers, reloaded.adsc_drop_ratio) == ([4, 20], 0.5)
    with pytest.raises(ValueError, match="either drop_ratio or budget"):
        AdscLlavaConfig.from_llava_config(stock, drop_ratio=0.5, budget=50)


@settings(deadline=None)  # pure Python, but a busy machine can pause one example past hypothesis' deadline
@given(num_tokens=st.integers(0, 800), data=st.data())
def test_uniform_keep_positions_are_evenly_spread(num_tokens, data):
    num_keep = data.draw(st.integers(0, num_tokens))
    keep = uniform_keep_positions(num_tokens, num_keep)
    assert len(keep) == num_keep
    if num_keep:
        assert 0 <= keep[0] and keep[-1] < num_tokens
        gaps = [later - earlier for earlier, later in zip(keep, keep[1:], strict=False)]
        assert all(gap >= 1 for gap in gaps)  # strictly increasing
        assert num_keep < 2 or max(gaps) - min(gaps) <= 1


def test_uniform_keep_positions_edge_cases():
    assert uniform_keep_positions(5, 5) == [0, 1, 2, 3, 4]
    assert uniform_keep_positions(5, 0) == []
    assert uniform_keep_positions(10, 3) == [1, 5, 8]  # bin centres of [0,10) in 3 bins
    with pytest.raises(ValueError, match=r"num_keep must be in \[0, num_tokens=4\], got 5"):
        uniform_keep_positions(4, 5)
