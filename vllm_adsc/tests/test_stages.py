"""The stage plan of one engine step against a naive reference that replays whole requests token by token.

Runs in the project's environment too (`stages` needs only torch): `.ci/run` collects this file.
"""

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from configuration_adsc_llava import AdscLlavaConfig, uniform_keep_positions  # noqa: E402
from vllm_adsc.stages import Progress, RequestProgress, VisionSchedule, image_offsets, plan_stages  # noqa: E402

IMAGE = 7  # placeholder id
BLOCK = 4  # tokens per KV block


def schedule_for(tokens_per_image: int, pruning_layers: list[int], drop_ratio: float) -> VisionSchedule:
    config = AdscLlavaConfig.from_dict(
        {
            "text_config": {"num_hidden_layers": 8},
            "image_seq_length": tokens_per_image,
            "image_token_index": IMAGE,
            "adsc_pruning_layers": pruning_layers,
            "adsc_drop_ratio": drop_ratio,
        }
    )
    return VisionSchedule.from_config(config)


def naive_kept_positions(token_ids: list[int], tokens_per_image: int, num_stages: int, drop_ratio: float):
    """For each stage, the positions of a whole sequence its layers see: HF's rule, one image at a time."""
    kept_by_stage = []
    # Runs of placeholders hold whole images back to back.
    images, position = [], 0
    while position < len(token_ids):
        if token_ids[position] == IMAGE:
            images.append(list(range(position, position + tokens_per_image)))
            position += tokens_per_image
        else:
            position += 1
    alive_images = images
    vision = {p for image in images for p in image}
    for _ in range(num_stages):
        alive_images = [
            [image[i] for i in uniform_keep_positions(len(image), int((1 - drop_ratio) * len(image)))]
            for image in alive_images
        ]
        alive = {p for image in alive_images for p in image}
        kept_by_stage.append([p for p in range(len(token_ids)) if p not in vision or p in alive])
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


def test_image_offsets_split_runs_into_images_and_continue_a_cut_image():
    ids = torch.tensor([1, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, IMAGE, 3, IMAGE, IMAGE, IMAGE, IMAGE])
    offsets, open_after = image_offsets(ids == IMAGE, torch.tensor([0, 10, 14]), torch.tensor([0, 0]), 4)
    assert offsets.tolist() == [-1, 0, 1, 2, 3, 0, 1, 2, 3, -1, 0, 1, 2, 3] and open_after.tolist() == [0, 0]
    # A step that ends two tokens into the second image, then the step that finishes it.
    offsets, open_after = image_offsets(ids[:7] == IMAGE, torch.tensor([0, 7]), torch.tensor([0]), 4)
    assert offsets[5:].tolist() == [0, 1] and open_after.tolist() == [2]
    offsets, open_after = image_offsets(ids[7:10] == IMAGE, torch.tensor([0, 3]), open_after, 4)
    assert offsets.tolist() == [2, 3, -1] and open_after.tolist() == [0]
    with pytest.raises(ValueError, match="went on with text"):
        image_offsets(ids[9:] == IMAGE, torch.tensor([0, 5]), torch.tensor([2]), 4)
    with pytest.raises(ValueError, match="not a whole number of images"):
        image_offsets(ids[2:] == IMAGE, torch.tensor([0, 12]), torch.tensor([0]), 4)


@pytest.mark.parametrize("seed", range(6))
def test_plans_of_concurrent_requests_match_a_whole_sequence_replay(seed):
    """Requests of different lengths with 0-2 images, prefilled in chunks (cut anywhere) then decoded, share steps."""
    rng = random.Random(seed)
    tokens_per_image, layers, drop_ratio = rng.choice([(4, [1, 3], 0.5), (9, [2], 0.6), (6, [1, 2, 5], 0.34)])
    schedule = schedule_for(tokens_per_image, layers, drop_ratio)
    requests = []
    for _request in range(4):
        ids = [rng.randint(10, 20) for _ in range(rng.randint(1, 4))]
        for _ in range(rng.randint(0, 2)):
            ids += [IMAGE] * tokens_per_image + [rng.randint(10, 20) for _ in range(rng.randint(0 if _ else 1, 3))]
        # Prefill in up to three chunks, cut anywhere (images too); then 3 decode steps of one text token.
        boundaries = sorted({rng.randint(1, len(ids)) for _ in range(2)} | {len(ids)})
        chunks = [b - a for a, b in zip([0, *boundaries], boundaries, strict=False) if b > a] + [1, 1, 1]
        ids += [rng.randint(10, 20) for _ in range(3)]
        blocks = rng.sample(range(100), len(ids) // BLOCK + 1)
        requests.append({"ids": ids, "chunks": chunks, "blocks": blocks, "done": 0})
    progress = RequestProgress(len(layers))
    while any(r["chunks"] for r in requests):
        waiting = [r for r in requests if r["chunks"]]
        step = [r for r in waiting if rng.random() < 0.8] or waiting[:1]
        input_ids, positions, query_lens = [], [], []
        for r in step:
            n = r["chunks"].pop(0)
            input_ids += r["ids"][r["done"] : r["done"] + n]
            positions += list(range(r["done"], r["done"] + n))
            query_lens.append(n)
            r["done"] += n
        width = max(len(r["blocks"]) for r in step)
        block_table = torch.tensor([r["blocks"] + [0] * (width - len(r["blocks"])) for r in step])
        first_blocks = block_table[:, 0].tolist()
        query_start_loc = torch.tensor([0, *torch.cumsum(torch.tensor(query_lens), 0).tolist()])
        starts = [positions[int(q)] for q in query_start_loc[:-1]]
        plans, after = plan_stages(
            torch.tensor(input_ids) == IMAGE,
            torch.tensor(positions),
            query_start_loc,
            torch.tensor([r["done"] for r in step]),
            progress.before(first_blocks, starts),
            schedule,
        )
        progress.update(first_blocks, after)
        previous = torch.arange(len(input_ids))
        for stage, plan in enumerate(plans):
            assert plan.stage == stage + 1 and torch.equal(previous[plan.from_previous], plan.step_rows)
            previous = plan.step_rows
            expected_rows, expected_slots, expected_lens = [], [], []
            for index, r in enumerate(step):
                kept = naive_kept_positions(r["ids"][: r["done"]], tokens_per_image, len(layers), drop_ratio)[stage]
                start = r["done"] - query_lens[index]
                for compact, position in enumerate(kept):
                    if position >= start:
                        expected_rows.append(int(query_start_loc[index]) + position - start)
                        block, offset = divmod(compact, BLOCK)
                        expected_slots.append(r["blocks"][block] * BLOCK + offset)
                expected_lens.append(len(kept))
            assert plan.step_rows.tolist() == expected_rows
            assert plan.slot_mapping(block_table, BLOCK).tolist() == expected_slots
            assert plan.seq_lens.tolist() == expected_lens
            assert plan.query_start_loc[-1] == len(expected_rows)


def test_a_new_request_on_a_reused_block_starts_from_nothing():
    progress = RequestProgress(2)
    progress.update([5], Progress(torch.tensor([[3, 4]]), torch.tensor([2])))
    before = progress.before([5, 6], [10, 0])
    assert before.dropped.tolist() == [[3, 4], [0, 0]] and before.open_image_tokens.tolist() == [2, 0]
    before = progress.before([5], [0])  # block 5 now starts another request
    assert before.dropped.tolist() == [[0, 0]] and before.open_image_tokens.tolist() == [0]
