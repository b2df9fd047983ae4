"""Unit tests of the budget curricula, the callback that applies them, and the step count they are built for."""

from types import SimpleNamespace

import pytest
from transformers import LlavaConfig

from adsc_llava import AdscLlavaConfig
from adsc_llava.configuration_adsc_llava import vision_tokens_per_layer
from adsc_llava.train.args import AdscTrainConfig
from adsc_llava.train.curriculum import (
    CURRICULUM_FACTORS,
    CurriculumCallback,
    build_curriculum,
    describe_curriculum,
    phase_at,
)

TARGET = 192  # of LLaVA-1.5-7B's 576 vision tokens, pruned at [2, 8, 16, 24]
NUM_LAYERS, NUM_TOKENS, PRUNING_LAYERS = 32, 576, [2, 8, 16, 24]


@pytest.fixture
def config() -> AdscLlavaConfig:
    return AdscLlavaConfig.from_llava_config(LlavaConfig(), budget=TARGET)


def average(drop_ratio: float) -> float:
    return sum(vision_tokens_per_layer(NUM_LAYERS, PRUNING_LAYERS, drop_ratio, NUM_TOKENS)) / NUM_LAYERS


@pytest.mark.parametrize(
    "name, factors", [("reverse", (0.8, 0.9, 1.0)), ("standard", (1.2, 1.1, 1.0)), ("direct", (1.0,))]
)
def test_named_curricula_split_the_steps_into_equal_phases(config, name, factors):
    assert CURRICULUM_FACTORS[name] == factors
    phases = build_curriculum(config, TARGET, 300, CURRICULUM_FACTORS[name])
    assert [phase.factor for phase in phases] == list(factors)
    assert [(phase.first_step, phase.end_step) for phase in phases] == [
        (300 * i // len(factors), 300 * (i + 1) // len(factors)) for i in range(len(factors))
    ]
    for phase in phases:
        assert phase.budget == pytest.approx(phase.factor * TARGET)
        # r is solved per phase: the schedule closest to the phase budget from below, one notch less overshoots.
        assert average(phase.drop_ratio) <= phase.budget < average(phase.drop_ratio - 1e-3)
    assert config.adsc_pruning_layers == PRUNING_LAYERS  # every phase keeps the layers
    assert round(phases[-1].drop_ratio, 3) == 0.418  # the paper's r for budget 192 (Table IV)


def test_reverse_budgets_rise_and_standard_budgets_fall(config):
    reverse = [
        average(phase.drop_ratio) for phase in build_curriculum(config, TARGET, 9, CURRICULUM_FACTORS["reverse"])
    ]
    standard = [
        average(phase.drop_ratio) for phase in build_curriculum(config, TARGET, 9, CURRICULUM_FACTORS["standard"])
    ]
    assert reverse[0] < reverse[1] < reverse[2] == standard[2] < standard[1] < standard[0]


@pytest.mark.parametrize("name", ["reverse", "standard", "direct"])
def test_phase_at_switches_exactly_at_the_boundaries(config, name):
    phases = build_curriculum(config, TARGET, 10, CURRICULUM_FACTORS[name])
    for phase in phases:
        assert phase_at(phases, phase.first_step) is phase
        assert phase_at(phases, phase.end_step - 1) is phase
    assert [phase_at(phases, step).factor for step in range(10)] == [
        next(p.factor for p in phases if p.first_step <= step < p.end_step) for step in range(10)
    ]
    # Steps past the planned end (e.g. a longer resumed run) stay at the target.
    assert phase_at(phases, 10) is phases[-1] and phase_at(phases, 1000).factor == 1.0


def test_uneven_step_counts_and_custom_fractions_cover_every_step_once(config):
    phases = build_curriculum(config, TARGET, 10, (0.8, 0.9, 1.0))
    assert [(phase.first_step, phase.end_step) for phase in phases] == [(0, 3), (3, 7), (7, 10)]
    phases = build_curriculum(config, TARGET, 8, (0.7, 1.0), phase_fractions=(0.25, 0.75))
    assert [(phase.first_step, phase.end_step, phase.factor) for phase in phases] == [(0, 2, 0.7), (2, 8, 1.0)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"factors": ()}, "at least one phase"),
        ({"factors": (0.8, 1.0), "phase_fractions": (0.5, 0.4)}, "summing to 1"),
        ({"factors": (0.8, 1.0), "phase_fractions": (1.0,)}, "one non-negative share per factor"),
        ({"factors": (0.1, 1.0)}, r"0.1x of budget 192 = 19.2 tokens is outside the range \[36, 576\]"),
        ({"factors": (4.0,)}, "outside the range"),
        ({"factors": (0.8, 0.9, 1.0), "total_steps": 2}, "needs at least 3 optimizer steps, the run has 2"),
    ],
)
def test_bad_curricula_are_rejected(config, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_curriculum(config, TARGET, **{"total_steps": 10, **kwargs})


def test_callback_builds_its_phases_for_the_trainers_step_count_and_sets_the_drop_ratio(config, capsys):
    callback = CurriculumCallback(config, TARGET, CURRICULUM_FACTORS["reverse"], print_plan=True)
    state = SimpleNamespace(global_step=0, max_steps=6, is_world_process_zero=True)
    callback.on_train_begin(None, state, None)
    phases = callback.phases
    assert phases == build_curriculum(config, TARGET, 6, CURRICULUM_FACTORS["reverse"])
    assert describe_curriculum(config, phases) in capsys.readouterr().out
    for step in range(6):
        callback.on_step_begin(None, SimpleNamespace(global_step=step), None)
        assert config.adsc_drop_ratio == phase_at(phases, step).drop_ratio
        phase = phase_at(phases, step)
        assert callback.log_values() == {
            "adsc/phase": phases.index(phase) + 1, "adsc/budget": phase.budget, "adsc/drop_ratio": phase.drop_ratio
        }  # fmt: skip
    # A run resumed at step 3 starts in the middle phase, before its first step.
    callback.on_train_begin(None, SimpleNamespace(global_step=3, max_steps=6, is_world_process_zero=False), None)
    assert config.adsc_drop_ratio == phases[1].drop_ratio


def test_description_has_one_line_per_phase_with_the_schedule(config):
    phases = build_curriculum(config, TARGET, 9, CURRICULUM_FACTORS["reverse"])
    lines = describe_curriculum(config, phases).splitlines()
    assert len(lines) == 3
    assert "steps 6-8" in lines[2] and "budget 192.0" in lines[2] and f"r={phases[2].drop_ratio:.4f}" in lines[2]
    assert "576x2, 335x6, 194x8, 112x8, 65x8" in lines[2]


def test_train_config_rejects_inconsistent_options():
    with pytest.raises(ValueError, match="--push-to-hub needs --hub-model-id"):
        AdscTrainConfig(model="m", data="d.json", output_dir="o", push_to_hub=True)
    with pytest.raises(ValueError, match="need --budget"):
        AdscTrainConfig(model="m", data="d.json", output_dir="o", curriculum="standard")
    config = AdscTrainConfig(model="m", data="d.json", output_dir="o", budget=192, curriculum="standard")
    assert config.factors == (1.2, 1.1, 1.0)
    custom = AdscTrainConfig(model="m", data="d.json", output_dir="o", budget=192, curriculum_factors=[0.5, 1.0])
    assert custom.factors == (0.5, 1.0)
