"""The stage plan of one engine step against a naive reference that replays whole requests token by token.

Runs in the project's environment too (`stages` needs only numpy): `.ci/run` collects this file.
"""

import random
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from configuration_adsc_llava import AdscLlavaConfig, uniform_keep_positions  # noqa: E402
from vllm_adsc.stages import BatchImages, RequestImages, VisionSchedule, plan_step  # noqa: E402

BLOCK = 4  # tokens per KV block


def schedule_for(tokens_per_image: int, pruning_layers: list[int], drop_ratio: float) -> VisionSchedule:
    config = AdscLlavaConfig.from_dict(
        {
            "text_config": {"num_hidden_layers": 8},
            "image_seq_length": tokens_per_image,
            "adsc_pruning_layers": pruning_layers,
            "adsc_drop_ratio": drop_ratio,
        }
    )
    return VisionSchedule.from_config(config)


def naive_kept_positions(length: int, image_starts: list[int], tokens_per_image: int, num_stages: int, ratio: float):
    """For each stage after the first, the positions of a request's first `length` tokens its layers see: HF's rule,
    one whole image at a time, then cut at `length`."""
    images = [list(range(start, start + tokens_per_image)) for start in image_starts]
    vision = {p for image in images for p in image}
    kept_by_stage, alive_images = [], images
    for _ in range(num_stages):
        alive_images = [
            [image[i] for i in uniform_keep_positions(len(image), int((1 - ratio) * len(image)))]
            for image in alive_images
        ]
        alive = {p for image in alive_images for p in image}
        kept_by_stage.append([p for p in range(length) if p not in vision or p in alive])
    return kept_by_stage


def test_surviving_offsets_follow_the_counts_of_the_schedule():
    config = AdscLlavaConfig.from_dict(
        {"text_config": {"num_hidden_layers": 32}, "adsc_pruning_layers": [2, 8, 16, 24], "adsc_drop_ratio": 0.418}
    )
    surviving = config.surviving_vision_offsets(576)
    tokens = config.vision_tokens_per_layer(576)
    assert [len(offsets) for offsets in surviving] == [tokens[layer] for layer in (2, 8, 16, 24)]
    for outer, inner in zip(surviving, surviving[1:], strict=False):
        assert set(inner) < set(outer)  # each stage keeps a subset of the last one's survivors
    with pytest.raises(ValueError, match="attention scores"):
        AdscLlavaConfig.from_dict({**config.to_dict(), "adsc_keep_policy": "fastv"}).surviving_vision_offsets()


def random_requests(rng: random.Random, tokens_per_image: int, cached_prefix: bool) -> list[dict]:
    requests = []
    for _request in range(4):
        length, starts = rng.randint(1, 4), []
        for index in range(rng.randint(0, 2)):
            starts.append(length)
            length += tokens_per_image + rng.randint(0 if index else 1, 3)  # back-to-back images, text between
        # A prefix-cache hit ends before the first image (and before the last prompt token).
        limit = min(starts[0] if starts else length - 1, length - 1)
        done = rng.randint(0, limit) if cached_prefix and limit > 0 else 0
        # Prefill the rest in up to three chunks, cut anywhere (images too); then 3 decode steps of one text token.
        cuts = sorted({rng.randint(done + 1, length) for _ in range(2)} | {length})
        chunks = [b - a for a, b in zip([done, *cuts], cuts, strict=False) if b > a] + [1, 1, 1]
        blocks = rng.sample(range(100), (length + 3) // BLOCK + 1)
        requests.append({"starts": starts, "chunks": chunks, "blocks": blocks, "done": done})
    return requests


@pytest.mark.parametrize("cached_prefix", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_plans_of_concurrent_requests_match_a_whole_sequence_replay(seed, cached_prefix):
    """Requests of different lengths with 0-2 images, prefilled in chunks (cut anywhere), from a cached prefix or
    not, then decoded, share steps. Each stage's rows, compact slots, query and sequence lengths are the naive
    replay's, and each stage's cache length is what the KV managers allocate for (`RequestImages.kept`)."""
    rng = random.Random(seed)
    tokens_per_image, layers, ratio = rng.choice([(4, [1, 3], 0.5), (9, [2], 0.6), (6, [1, 2, 5], 0.34)])
    schedule = schedule_for(tokens_per_image, layers, ratio)
    requests = random_requests(rng, tokens_per_image, cached_prefix)
    for r in requests:
        r["images"] = RequestImages(schedule, r["starts"])
    while any(r["chunks"] for r in requests):
        waiting = [r for r in requests if r["chunks"]]
        step = [r for r in waiting if rng.random() < 0.8] or waiting[:1]
        num_computed = np.array([r["done"] for r in step])
        num_scheduled = np.array([r["chunks"].pop(0) for r in step])
        plan = plan_step(
            schedule, BatchImages.of([r["images"] for r in step], len(layers) + 1), num_computed, num_scheduled
        )
        width = max(len(r["blocks"]) for r in step)
        block_table = np.array([r["blocks"] + [0] * (width - len(r["blocks"])) for r in step])
        query_start_loc = np.concatenate([[0], np.cumsum(num_scheduled)])
        previous = np.arange(int(num_scheduled.sum()))
        drops = False
        for stage in range(1, len(layers) + 1):
            expected_rows, expected_slots, expected_lens, expected_query = [], [], [], [0]
            for index, r in enumerate(step):
                end = r["done"] + num_scheduled[index]
                kept = naive_kept_positions(end, r["starts"], tokens_per_image, len(layers), ratio)[stage - 1]
                for compact, position in enumerate(kept):
                    if position >= r["done"]:
                        expected_rows.append(int(query_start_loc[index]) + position - r["done"])
                        block, offset = divmod(compact, BLOCK)
                        expected_slots.append(r["blocks"][block] * BLOCK + offset)
                expected_lens.append(len(kept))
                expected_query.append(len(expected_rows))
                assert r["images"].kept(int(end), stage) == len(kept)
            drops |= len(expected_rows) < query_start_loc[-1]
            if not expected_rows:  # every row dropped: this stage and the deeper ones do not run
                assert len(plan.stages) == stage - 1
                break
            stage_plan = plan.stages[stage - 1]
            assert stage_plan.stage == stage
            rows = np.arange(query_start_loc[-1]) if stage_plan.rows is None else stage_plan.rows
            assert rows.tolist() == expected_rows
            if stage_plan.from_previous is not None:
                assert previous[stage_plan.from_previous].tolist() == expected_rows
            assert stage_plan.slot_mapping(block_table, BLOCK).tolist() == expected_slots
            assert stage_plan.seq_lens.tolist() == expected_lens
            assert stage_plan.query_start_loc.tolist() == expected_query
            assert stage_plan.max_seq_len == max(expected_lens)
            assert stage_plan.max_query_len == max(np.diff(expected_query))
            assert plan.seq_lens[stage - 1].tolist() == expected_lens  # the stacked copy the runner writes
            if plan.drops:
                bounds = np.cumsum([0] + [s.num_rows for s in plan.stages])
                assert plan.rows[bounds[stage - 1] : bounds[stage]].tolist() == expected_rows
            previous = rows
        assert plan.drops == drops
        for r, scheduled in zip(step, num_scheduled, strict=True):
            r["done"] += int(scheduled)


def test_a_step_of_only_dropped_image_tokens_plans_no_empty_stage():
    """The last chunk of a prompt that ends with its image can hold only tokens a stage drops: that stage and the
    deeper ones get no plan (their layers do not run), rather than a plan of zero rows (a zero-row kernel launch kills
    a GPU engine)."""
    schedule = schedule_for(4, [1, 3], 0.5)  # stage 1 keeps offsets 1 and 3 of each image, stage 2 offset 3
    assert schedule.alive.nonzero()[1].tolist() == [1, 3, 3]
    images = BatchImages.of([RequestImages(schedule, [2])], 3)
    plan = plan_step(schedule, images, np.array([4]), np.array([1]))  # only offset 2
    assert plan.drops and plan.stages == []
    assert plan.rows.tolist() == plan.from_previous.tolist() == [] and plan.query_start_loc.shape == (0, 2)
    plan = plan_step(schedule, images, np.array([3]), np.array([2]))  # offsets 1 and 2: stage 2 keeps neither
    assert plan.drops and [stage.rows.tolist() for stage in plan.stages] == [[0]]


def test_request_images_are_whole_images_of_the_schedule():
    schedule = schedule_for(4, [1], 0.5)

    def feature(modality="image", offset=3, length=4, is_embed=None):
        return SimpleNamespace(
            modality=modality, mm_position=SimpleNamespace(offset=offset, length=length, is_embed=is_embed)
        )

    images = RequestImages.from_features(schedule, [feature(offset=9), feature()])
    assert images.starts.tolist() == [3, 9] and images.end == 13
    assert [images.kept(n, 1) for n in (3, 5, 7, 13, 20)] == [3, 4, 5, 9, 16]
    with pytest.raises(ValueError, match="images of 4 placeholder tokens, got a image of 5"):
        RequestImages.from_features(schedule, [feature(length=5)])
    with pytest.raises(ValueError, match="got a video"):
        RequestImages.from_features(schedule, [feature(modality="video")])
    with pytest.raises(ValueError, match="every image placeholder token"):
        RequestImages.from_features(schedule, [feature(is_embed=np.array([True, False, True, True]))])


def test_batch_images_updated_in_some_rows_equal_a_rebuilt_batch():
    """The runner updates its batch's image table where requests changed rows (`BatchImages.with_rows`): the same
    arrays as a batch built from scratch, when it grows, shrinks or moves requests."""
    schedule = schedule_for(4, [1, 3], 0.5)
    requests = [RequestImages(schedule, starts) for starts in ([], [2], [1, 9], [5], [3])]
    batch = BatchImages.of(requests[:3], 3)
    for order in ([0, 1, 2, 3], [0, 4, 2], [2, 1], [2, 1, 3, 4, 0]):
        rows = [
            row
            for row, index in enumerate(order)
            if row >= len(batch.requests) or batch.requests[row] is not requests[index]
        ]
        updated = batch.with_rows(len(order), rows, [requests[order[row]] for row in rows])
        rebuilt = BatchImages.of([requests[index] for index in order], 3)
        assert updated.requests == rebuilt.requests
        for name in ("first", "end", "total"):
            assert getattr(updated, name).tolist() == getattr(rebuilt, name).tolist(), (order, name)
        batch = updated
