"""Host-device syncs per forward, counted on the CPU (`benchmarks/syncs.py`): ADSC against stock LLaVA.

Targets: a prefill syncs at most `stock + number of pruning layers` times (ADSC: once, where it reads where the
images sit); a decode step never syncs, padded batches and beam search included. The counts are asserted exactly,
so a sync added anywhere in the forward fails here.
"""

import pytest
import torch

from adsc_llava.benchmarks.syncs import SyncCounter, syncs_per_forward

from conftest import IMAGE_TOKEN_ID, make_batch, stock_twin, tiny_adsc_model

PRUNING_LAYERS = [1, 2, 3]
NEW_TOKENS = 4
BATCHES = {
    "batch-1": lambda: make_batch([1]),
    "padded-batch-3": lambda: make_batch([1, 0, 2], padding_side="left"),
}
# Syncs of ADSC's prefill (the one read of where the units sit) and of each decode step.
ADSC_PREFILL, ADSC_DECODE = 1, 0


def generate_syncs(model, batch: dict, num_beams: int) -> list[int]:
    """Syncs of each forward `generate` runs: the prefill, then every decode step."""
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=num_beams, suppress_tokens=[IMAGE_TOKEN_ID])
    return syncs_per_forward(model, lambda: model.generate(**batch, **options))


@pytest.mark.parametrize("num_beams", [1, 2], ids=["greedy", "beam"])
@pytest.mark.parametrize("batch_name", list(BATCHES))
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_generate_syncs_once_per_prefill_and_never_per_decode_step(attn_implementation, batch_name, num_beams):
    model = tiny_adsc_model(pruning_layers=PRUNING_LAYERS, drop_ratio=0.5, attn_implementation=attn_implementation)
    batch = BATCHES[batch_name]()
    stock = generate_syncs(stock_twin(model), batch, num_beams)
    adsc = generate_syncs(model, batch, num_beams)
    assert len(adsc) == len(stock) == NEW_TOKENS
    assert adsc[0] <= stock[0] + len(PRUNING_LAYERS)  # the bound; stock itself syncs 1 to 3 times here
    assert adsc == [ADSC_PREFILL] + [ADSC_DECODE] * (NEW_TOKENS - 1)


@pytest.mark.parametrize("keep_policy", ["fastv", "pyramiddrop"])
def test_score_based_policies_add_no_sync(keep_policy):
    """Their kept tokens depend on attention scores, their counts do not: shapes stay known on the host."""
    model = tiny_adsc_model(pruning_layers=[1, 3], drop_ratio=0.5)
    model.config.adsc_keep_policy = keep_policy
    counts = generate_syncs(model, BATCHES["padded-batch-3"](), num_beams=1)
    assert counts == [ADSC_PREFILL] + [ADSC_DECODE] * (NEW_TOKENS - 1)


def test_a_direct_decode_step_reads_an_all_ones_mask_once_as_stock_does():
    """Outside `generate` a caller may pass an all-ones padding mask: whether it masks a key is read once, where
    stock's mask builder reads it too. A mask with padding in every stage's cache goes in unread."""
    model = tiny_adsc_model(pruning_layers=PRUNING_LAYERS, drop_ratio=0.5)
    stock = stock_twin(model)
    for batch, expected in ((make_batch([1]), 1), (make_batch([1, 0, 2], padding_side="left"), 0)):
        step = torch.full((batch["input_ids"].shape[0], 1), 7)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(step)], dim=1)
        counts = []
        for candidate in (stock, model):
            with torch.no_grad():
                cache = candidate(**batch, use_cache=True).cache
                with SyncCounter() as counter:
                    candidate(input_ids=step, attention_mask=mask, cache=cache, use_cache=True)
            counts.append(counter.count)
        assert counts == [1, expected]


def test_the_counter_sees_every_kind_of_sync():
    values, mask = torch.arange(6.0), torch.tensor([True, False] * 3)
    reads = [
        lambda: values.sum().item(),
        lambda: bool(values.any()),
        lambda: int(values.max()),
        lambda: values.tolist(),
        lambda: values.nonzero(),
        lambda: values[mask],
        lambda: values.masked_select(mask),
        lambda: torch.equal(values, values),
        lambda: values.long().repeat_interleave(values.long()),
    ]
    for read in reads:
        with SyncCounter() as counter:
            read()
        assert counter.count == 1, counter.calls
    with SyncCounter() as counter:  # static shapes and host-known sizes: no sync
        torch.nonzero_static(mask, size=3)
        values.index_select(0, torch.tensor([0, 2]))
        torch.argsort(mask.to(torch.int8), stable=True)[:3]
        values.long().repeat_interleave(values.long(), output_size=15)
    assert counter.count == 0, counter.calls


def test_the_counter_refuses_inference_mode_where_it_would_see_nothing():
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        SyncCounter().__enter__()
