"""LLaVA's `group_by_modality_length` sampler: megabatches of image-only or text-only records, longest first."""

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler


def split_to_even_chunks(indices: list[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """Split `indices` into `num_chunks` chunks of equal size and roughly equal total length (LLaVA's rule)."""
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    chunk_lengths = [0.0] * num_chunks
    for index in indices:
        shortest = chunk_lengths.index(min(chunk_lengths))
        chunks[shortest].append(index)
        chunk_lengths[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            chunk_lengths[shortest] = float("inf")
    return chunks


def get_length_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator | None = None
) -> list[int]:
    """Random permutation where each megabatch (`world_size * batch_size`) is sorted longest first and split evenly."""
    indices = torch.randperm(len(lengths), generator=generator).tolist()
    megabatch_size = world_size * batch_size
    megabatches = [indices[i : i + megabatch_size] for i in range(0, len(lengths), megabatch_size)]
    megabatches = [sorted(megabatch, key=lambda i: lengths[i], reverse=True) for megabatch in megabatches]
    chunked = [split_to_even_chunks(megabatch, lengths, world_size) for megabatch in megabatches]
    return [i for megabatch in chunked for chunk in megabatch for i in chunk]


def get_modality_length_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator | None = None
) -> list[int]:
    """LLaVA's `group_by_modality_length` order: every megabatch is all-image or all-text (except one mixed tail).

    `lengths` are `modality_lengths()` (positive: image, negative: text-only). Unlike LLaVA, the generator is used
    for every random draw (LLaVA passes None to the inner shuffles), so the order is reproducible from a seed, and a
    single-modality data set falls back to plain length grouping instead of failing an assertion.
    """
    if any(length == 0 for length in lengths):
        raise ValueError("Modality lengths must be non-zero (the sign carries the modality)")
    mm = [(i, length) for i, length in enumerate(lengths) if length > 0]
    lang = [(i, -length) for i, length in enumerate(lengths) if length < 0]
    if not mm or not lang:
        return get_length_grouped_indices([abs(length) for length in lengths], batch_size, world_size, generator)

    def grouped(pairs: list[tuple[int, int]]) -> list[int]:
        order = get_length_grouped_indices([length for _, length in pairs], batch_size, world_size, generator)
        return [pairs[i][0] for i in order]

    megabatch_size = world_size * batch_size
    mm_shuffle, lang_shuffle = grouped(mm), grouped(lang)
    mm_megabatches = [mm_shuffle[i : i + megabatch_size] for i in range(0, len(mm_shuffle), megabatch_size)]
    lang_megabatches = [lang_shuffle[i : i + megabatch_size] for i in range(0, len(lang_shuffle), megabatch_size)]
    additional_batch = mm_megabatches[-1] + lang_megabatches[-1]
    megabatches = mm_megabatches[:-1] + lang_megabatches[:-1]
    megabatches = [megabatches[i] for i in torch.randperm(len(megabatches), generator=generator).tolist()]
    if len(additional_batch) >= megabatch_size:
        megabatches = [additional_batch[:megabatch_size]] + megabatches
        additional_batch = additional_batch[megabatch_size:]
    if additional_batch:
        megabatches.append(additional_batch)
    return [i for megabatch in megabatches for i in megabatch]


class ModalityLengthGroupedSampler(Sampler[int]):
    """LLaVA's `LengthGroupedSampler(group_by_modality=True)`, seeded and epoch-aware for exact resumption.

    For a HF `Trainer`, return `ModalityLengthGroupedSampler.from_training_args(dataset.modality_lengths(), args)`
    from `_get_train_sampler`: like LLaVA it uses `batch_size=args.train_batch_size` and `world_size=args.world_size
    * args.gradient_accumulation_steps` (one megabatch = one optimizer step). The order depends only on `seed` and
    the epoch (`set_epoch`, which accelerate calls), so a resumed run replays the same order and skips what it saw.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        world_size: int = 1,
        seed: int = 0,
        group_by_modality: bool = True,
    ):
        if batch_size <= 0 or world_size <= 0:
            raise ValueError(f"batch_size ({batch_size}) and world_size ({world_size}) must be positive")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.group_by_modality = group_by_modality
        self.epoch = 0

    @classmethod
    def from_training_args(cls, lengths: Sequence[int], args: Any) -> "ModalityLengthGroupedSampler":
        """The sampler LLaVA's trainer builds from `TrainingArguments` (`args.data_seed` if set, else `args.seed`)."""
        seed = args.data_seed if getattr(args, "data_seed", None) is not None else args.seed
        return cls(
            lengths,
            batch_size=args.train_batch_size,
            world_size=args.world_size * args.gradient_accumulation_steps,
            seed=seed,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.group_by_modality:
            order = get_modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, generator)
        else:
            lengths = [abs(length) for length in self.lengths]
            order = get_length_grouped_indices(lengths, self.batch_size, self.world_size, generator)
        return iter(order)
