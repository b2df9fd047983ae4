"""The unit plan: where visual units of any length sit (one device read), and what ADSC's rule keeps of them."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adsc_llava import uniform_keep_positions
from adsc_llava.modeling_adsc_llava import StageLayout, VisualUnits, kept_slot_order, locate_visual_units


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=3000), min_size=1, max_size=4),
    text=st.lists(st.integers(min_value=0, max_value=3), min_size=5, max_size=5),
    drop_ratio=st.floats(min_value=0.0, max_value=0.999),
)
def test_uniform_keep_is_the_configs_rule_unit_by_unit(lengths, text, drop_ratio):
    """Units between text runs keep `uniform_keep_positions(n, floor((1 - r) n))`; the next layout moves them up."""
    starts, position = [], text[0]
    for length, gap in zip(lengths, text[1:], strict=False):
        starts.append(position)
        position += length + gap
    units = VisualUnits((0,) * len(lengths), tuple(starts), tuple(lengths))
    layout = StageLayout(position, (position,), units)
    keep = layout.uniform_keep(drop_ratio)[0]
    pruned = layout.pruned(drop_ratio)
    kept_positions = kept_slot_order(keep[None], pruned.width)[0]
    for unit, (start, length) in enumerate(zip(starts, lengths, strict=True)):
        num_keep = math.floor((1.0 - drop_ratio) * length)
        expected = [start + offset for offset in uniform_keep_positions(length, num_keep)]
        assert [start + offset for offset in keep[start : start + length].nonzero().flatten().tolist()] == expected
        # In the next stage the unit is its kept tokens, contiguous, at its new start.
        new_start, new_length = pruned.units.starts[unit], pruned.units.lengths[unit]
        assert new_length == num_keep
        assert kept_positions[new_start : new_start + new_length].tolist() == expected
    assert pruned.row_lengths == (position - sum(lengths) + sum(pruned.units.lengths),)
    assert not pruned.has_filler  # one row: nothing to fill


def test_units_of_different_lengths_touching_and_across_rows():
    # Row 0: text, a unit of 3, a unit of 2 right after it, text. Row 1: a unit of 4, text.
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    units, positions, masks_padding = locate_visual_units([mask], [[3, 2, 4]])
    assert units == VisualUnits(rows=(0, 0, 1), starts=(1, 4, 0), lengths=(3, 2, 4))
    assert positions[0].tolist() == [1, 2, 3, 4, 5, 7, 8, 9, 10]  # flat `row * seq + column`, where features go
    assert masks_padding is False


def test_units_of_two_kinds_are_merged_in_order_and_padding_is_read_with_them():
    images = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    videos = torch.tensor([[1, 0, 0, 0, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    padding = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    units, _, masks_padding = locate_visual_units([images, videos], [[2], [1, 3]], padding)
    assert units == VisualUnits(rows=(0, 0, 1), starts=(0, 2, 1), lengths=(1, 2, 3))
    assert masks_padding is True


def test_a_kind_without_features_or_placeholders_has_no_units():
    units, positions, _ = locate_visual_units([torch.zeros(2, 4, dtype=torch.bool)], [[]])
    assert units == VisualUnits() and positions[0].numel() == 0


@pytest.mark.parametrize(
    "mask, lengths",
    [
        ([[1, 1, 0, 1, 1, 1]], [3, 2]),  # the first unit is cut by text
        ([[0, 0, 1, 1], [1, 1, 0, 0]], [4]),  # one unit split across two rows
    ],
)
def test_broken_units_are_refused(mask, lengths):
    with pytest.raises(ValueError, match="Truncated image span"):
        locate_visual_units([torch.tensor(mask, dtype=torch.bool)], [lengths])


def test_counts_that_do_not_add_up_are_refused():
    with pytest.raises(ValueError, match="holds 4 image tokens but the images give 5 features"):
        locate_visual_units([torch.ones(1, 4, dtype=torch.bool)], [[2, 3]])
    with pytest.raises(ValueError, match="holds 4 image tokens but the images give 0 features"):
        locate_visual_units([torch.ones(1, 4, dtype=torch.bool)], [[]])


def test_rows_keeping_different_counts_end_in_filler():
    units = VisualUnits(rows=(0, 1), starts=(1, 0), lengths=(8, 2))
    pruned = StageLayout(10, (10, 10), units).pruned(0.5)
    assert (pruned.width, pruned.row_lengths, pruned.units.starts, pruned.units.lengths) == (9, (6, 9), (1, 0), (4, 1))
    assert pruned.has_filler and pruned.valid_slots().sum(dim=1).tolist() == [6, 9]
