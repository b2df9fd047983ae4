"""The per-unit pruning rule for visual units of any length (LLaVA-NeXT / OneVision images, videos)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adsc_llava.modeling_adsc_llava import kept_in_unit, uniform_keep_indices, visual_unit_offsets


@settings(max_examples=300, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=3000), min_size=1, max_size=4),
    drop_ratio=st.floats(min_value=0.0, max_value=0.999),
)
def test_closed_form_keeps_exactly_uniform_keep_indices(lengths, drop_ratio):
    """One integer test per token picks the same tokens as `uniform_keep_indices`, unit by unit."""
    offsets = torch.cat([torch.arange(n) for n in lengths])[None]
    unit_lengths = torch.cat([torch.full((n,), n) for n in lengths])[None]
    keep, index, kept_length = kept_in_unit(offsets, unit_lengths, drop_ratio)
    start = 0
    for n in lengths:
        k = math.floor((1.0 - drop_ratio) * n)
        expected = uniform_keep_indices(n, k)
        unit = slice(start, start + n)
        assert torch.equal(keep[0, unit].nonzero().flatten(), expected)
        assert torch.equal(index[0, unit][keep[0, unit]], torch.arange(k))  # new offsets among the survivors
        assert (kept_length[0, unit] == k).all()
        start += n


def test_text_tokens_are_never_kept_as_vision():
    keep, _, _ = kept_in_unit(torch.full((1, 5), -1), torch.zeros(1, 5, dtype=torch.long), 0.5)
    assert not keep.any()


def test_units_of_different_lengths_touching_and_across_rows():
    # Row 0: text, a unit of 3, a unit of 2 right after it, text. Row 1: a unit of 4, text.
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    offsets, lengths = visual_unit_offsets(mask, [3, 2, 4])
    assert offsets.tolist() == [[-1, 0, 1, 2, 0, 1, -1], [0, 1, 2, 3, -1, -1, -1]]
    assert lengths.tolist() == [[0, 3, 3, 3, 2, 2, 0], [4, 4, 4, 4, 0, 0, 0]]


@pytest.mark.parametrize(
    "mask, lengths",
    [
        ([[1, 1, 0, 1, 1, 1]], [3, 2]),  # the first unit is cut by text
        ([[0, 0, 1, 1], [1, 1, 0, 0]], [4]),  # one unit split across two rows
    ],
)
def test_broken_units_are_refused(mask, lengths):
    with pytest.raises(ValueError, match="Truncated image span"):
        visual_unit_offsets(torch.tensor(mask, dtype=torch.bool), lengths)


def test_counts_that_do_not_add_up_are_refused():
    with pytest.raises(ValueError, match="holds 4 image tokens but the images give 5 features"):
        visual_unit_offsets(torch.ones(1, 4, dtype=torch.bool), [2, 3])
