"""Per-layer hidden states and attention weights at the input positions, and the stock output conventions."""

import pytest
import torch
from reference import reference_alive_masks, reference_forward

from adsc_llava.modeling_adsc_llava import AdscLlavaForConditionalGeneration, AdscLlavaModel

from conftest import IMAGE_TOKEN_ID, make_batch, stock_twin, tiny_adsc_model

MAX_ABS_DIFF = 1e-5
NUM_LAYERS = 4


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_without_pruning_per_layer_outputs_equal_stock(attn_implementation):
    model = tiny_adsc_model(attn_implementation=attn_implementation)
    stock = stock_twin(model)
    batch = make_batch([1, 2], text_lengths=[3, 7], padding_side="left")
    flags = dict(output_hidden_states=True, output_attentions=attn_implementation == "eager")
    with torch.no_grad():
        ours, theirs = model(**batch, **flags), stock(**batch, **flags)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == NUM_LAYERS + 1
    for mine, stock_state in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        assert max_abs_diff(mine, stock_state) <= MAX_ABS_DIFF
    if attn_implementation == "eager":
        assert len(ours.attentions) == len(theirs.attentions) == NUM_LAYERS
        for mine, stock_weights in zip(ours.attentions, theirs.attentions, strict=True):
            assert mine.shape == stock_weights.shape and max_abs_diff(mine, stock_weights) <= MAX_ABS_DIFF
    else:
        assert ours.attentions == theirs.attentions  # sdpa computes no weights, for stock LLaVA neither


def test_config_flags_behave_like_arguments():
    model = tiny_adsc_model(pruning_layers=[1], drop_ratio=0.5, attn_implementation="eager")
    batch = make_batch([1])
    with torch.no_grad():
        by_argument = model(**batch, output_hidden_states=True, output_attentions=True)
        model.config.output_hidden_states = model.config.output_attentions = True
        by_config = model(**batch)
        overridden = model(**batch, output_hidden_states=False, output_attentions=False)
    assert len(by_config.hidden_states) == NUM_LAYERS + 1 and len(by_config.attentions) == NUM_LAYERS
    for mine, theirs in zip(
        by_argument.hidden_states + by_argument.attentions, by_config.hidden_states + by_config.attentions, strict=True
    ):
        assert torch.equal(mine, theirs)
    assert overridden.hidden_states is None and overridden.attentions is None  # the call's flags win


@pytest.mark.parametrize("pruning_layers, drop_ratio", [([1], 0.5), ([1, 3], 0.7), ([2], 0.99)])
def test_pruned_hidden_states_and_attentions_equal_the_naive_reference(pruning_layers, drop_ratio):
    """Kept tokens: the reference's states and weights. Dropped ones: the state they had when dropped, zero weights."""
    model = tiny_adsc_model(pruning_layers=pruning_layers, drop_ratio=drop_ratio, attn_implementation="eager")
    batch = make_batch([1, 2, 0], text_lengths=[3, 5, 9], padding_side="left")
    alive = reference_alive_masks(batch["input_ids"], pruning_layers, drop_ratio, NUM_LAYERS)
    with torch.no_grad():
        reference = reference_forward(model, batch, alive)
        ours = model(**batch, output_hidden_states=True, output_attentions=True)
    padding = batch["attention_mask"].bool()
    for layer in range(NUM_LAYERS):
        seen = alive[layer] & padding  # (batch, seq) tokens this layer computed on
        state = ours.hidden_states[layer + 1]
        if layer < NUM_LAYERS - 1:  # the last entry is the normed output, as for stock models
            assert max_abs_diff(state[seen], reference["layer_outputs"][layer][seen]) <= MAX_ABS_DIFF
        # A token dropped at the input of pruning layer p keeps the output of layer p - 1 from then on.
        dropped = ~alive[layer] & padding
        last_seen = torch.stack([alive[earlier] for earlier in range(layer + 1)]).long().cumsum(0).argmax(0)
        for row, position in dropped.nonzero().tolist():
            when_dropped = ours.hidden_states[int(last_seen[row, position]) + 1][row, position]
            if layer == NUM_LAYERS - 1:
                when_dropped = model.model.language_model.norm(when_dropped)
            assert torch.equal(state[row, position], when_dropped)
        # Attention rows by query, `(batch, seq, heads, keys)`: padding queries attend uniformly, as in stock LLaVA.
        weights = ours.attentions[layer].transpose(1, 2)
        assert max_abs_diff(weights[seen], reference["attentions"][layer].transpose(1, 2)[seen]) <= MAX_ABS_DIFF
        assert torch.allclose(weights[seen].sum(-1), torch.tensor(1.0))
        assert (weights[~alive[layer]] == 0).all()  # a dropped token does not attend at this layer
    seen_at_end = alive[-1] & padding
    assert max_abs_diff(ours.hidden_states[-1][seen_at_end], reference["normed"][seen_at_end]) <= MAX_ABS_DIFF
    assert torch.equal(ours.hidden_states[-1], model.model(**batch).last_hidden_state)


def test_cached_decode_step_attentions_index_the_full_sequence():
    """A decode step attends to the cached keys at their original positions: (batch, heads, 1, past + 1)."""
    model = tiny_adsc_model(pruning_layers=[1], drop_ratio=0.75, attn_implementation="eager")
    batch = make_batch([1, 0], text_lengths=[2, 20], padding_side="left")
    options = dict(max_new_tokens=3, do_sample=False, suppress_tokens=[IMAGE_TOKEN_ID], return_dict_in_generate=True)
    output = model.generate(**batch, **options, output_attentions=True, output_hidden_states=True)
    prompt_length = batch["input_ids"].shape[1]
    image = batch["input_ids"][0] == IMAGE_TOKEN_ID
    for step, step_attentions in enumerate(output.attentions[1:], start=1):
        assert len(step_attentions) == NUM_LAYERS
        for layer, weights in enumerate(step_attentions):
            assert weights.shape[-2:] == (1, prompt_length + step)
            dropped_keys = weights[0, :, 0, :prompt_length][:, image] == 0
            # Layer 0 sees all 16 vision tokens; from the pruning layer on, 12 of them are gone.
            assert int(dropped_keys.all(dim=0).sum()) == (0 if layer == 0 else 12)
            assert torch.allclose(weights.sum(-1), torch.tensor(1.0))
    assert len(output.hidden_states[0]) == NUM_LAYERS + 1


def test_return_dict_false_returns_tuples():
    model = tiny_adsc_model(pruning_layers=[1], drop_ratio=0.5)
    batch = make_batch([1])
    with torch.no_grad():
        as_dict = model.model(**batch)
        as_tuple = model.model(**batch, return_dict=False)
        logits_tuple = model(**batch, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], as_dict.last_hidden_state)
    assert isinstance(logits_tuple, tuple) and torch.equal(logits_tuple[0], model(**batch).logits)


def test_classes_do_not_claim_a_single_graph():
    assert AdscLlavaForConditionalGeneration._can_compile_fullgraph is False
    assert AdscLlavaModel._can_compile_fullgraph is False
