"""`LlavaInstructDataset`: LLaVA instruction records indexed, encoded lazily, and checked up front (`scan`).

Records are validated and encoded by `adsc_llava.train.data`; this module serves them to the Trainer and decides,
before training starts, which records are used.
"""

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import ProcessorMixin

from adsc_llava.train.data import (
    BAD_RECORD_POLICIES,
    BadRecordError,
    BadRecordPolicy,
    Conversation,
    ConversationEncoder,
    DataStats,
    DataValidationError,
    check_image_file,
    fit_to_length,
    load_image,
    load_records,
    record_to_conversation,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048
MAX_LISTED_ERRORS = 20  # bad records quoted in full by a failing `scan()`


def _word_count(record: Any) -> int:
    """Whitespace-separated words of all turns of a raw record (0 when it has none)."""
    if not isinstance(record, Mapping) or not isinstance(record.get("conversations"), list):
        return 0
    return sum(
        len(turn["value"].split())
        for turn in record["conversations"]
        if isinstance(turn, Mapping) and isinstance(turn.get("value"), str)
    )


class LlavaInstructDataset(Dataset):
    """Map-style dataset of LLaVA instruction records, encoded lazily with the checkpoint's processor.

    Each item is `{"input_ids": LongTensor[seq_len], "labels": LongTensor[seq_len], "pixel_values":
    FloatTensor[1, 3, H, W] (image records only), "id": str}`; batch items with `LlavaDataCollator`.

    Args:
        records: Raw records (see module docstring).
        processor: A LLaVA processor with a chat template (`LlavaProcessor` of the checkpoint being trained).
        image_folder: Folder the records' `image` paths are relative to (None: paths are used as given).
        max_length: Longest sample in tokens, image placeholders included (LLaVA-1.5: 2048).
        on_bad_record: "error" raises `BadRecordError`; "skip" logs, counts (`self.stats`) and uses the next
            good record instead.
        truncate_long_samples: Cut too-long samples to `max_length` instead of rejecting them, as LLaVA does,
            but only when the cut splits no image and leaves at least one supervised token.
        assistant_only_loss: Supervise the assistant answers only (LLaVA). False: every text token (prompts too,
            image placeholders never), the next-token loss of pretraining, e.g. for a model trained from scratch.
    """

    def __init__(
        self,
        records: Sequence[Any],
        processor: ProcessorMixin,
        image_folder: str | os.PathLike | None = None,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        on_bad_record: BadRecordPolicy = "error",
        truncate_long_samples: bool = False,
        assistant_only_loss: bool = True,
    ):
        if on_bad_record not in BAD_RECORD_POLICIES:
            raise ValueError(f"on_bad_record must be one of {BAD_RECORD_POLICIES}, got {on_bad_record!r}")
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.encoder = ConversationEncoder(processor, assistant_only_loss=assistant_only_loss)
        self.records = records
        self.processor = processor
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.max_length = max_length
        self.on_bad_record = on_bad_record
        self.truncate_long_samples = truncate_long_samples
        self.stats = DataStats()
        # Positions in `records` that this dataset serves; `scan()` removes bad ones under the "skip" policy.
        self.indices: list[int] = list(range(len(records)))

    @classmethod
    def from_json(
        cls,
        path: str | os.PathLike,
        processor: ProcessorMixin,
        image_folder: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> "LlavaInstructDataset":
        """Dataset over a LLaVA JSON (or JSON-lines) file; `kwargs` go to the constructor."""
        return cls(load_records(path), processor, image_folder, **kwargs)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Encoded sample `index`; under the "skip" policy a bad record is replaced by the next good one."""
        if not -len(self.indices) <= index < len(self.indices):
            raise IndexError(f"index {index} out of range for a data set of {len(self.indices)} samples")
        index %= len(self.indices)
        for attempt in range(len(self.indices)):
            record_index = self.indices[(index + attempt) % len(self.indices)]
            try:
                return self.encode(record_index)
            except BadRecordError as error:
                if self.on_bad_record == "error":
                    raise
                self.stats.add_skipped(error)
                logger.warning("Skipping %s", error)
        raise RuntimeError(f"No usable record in the data set ({self.stats.summary()})")

    def image_path(self, image: str) -> Path:
        return self.image_folder / image if self.image_folder is not None else Path(image)

    def conversation(self, record_index: int) -> Conversation:
        """Validated chat-template messages of `records[record_index]` (raises `BadRecordError`)."""
        return record_to_conversation(self.records[record_index], record_index, self.encoder.image_token)

    def encode(self, record_index: int) -> dict[str, Any]:
        """Full encoding of `records[record_index]` (image decoded and processed); raises `BadRecordError`."""
        conversation = self.conversation(record_index)
        image = None
        if conversation.image is not None:
            image = load_image(self.image_path(conversation.image), conversation.record_id)
        encoded = self.encoder.encode(conversation, image)
        encoded["input_ids"], encoded["labels"] = fit_to_length(
            conversation.record_id,
            encoded["input_ids"],
            encoded["labels"],
            self.max_length,
            truncate=self.truncate_long_samples,
            image_token_id=self.encoder.image_token_id,
        )
        return {"id": conversation.record_id, **encoded}

    def check(self, record_index: int, decode_images: bool = False) -> None:
        """Validate `records[record_index]` without producing tensors (raises `BadRecordError`).

        Checks structure, chat rendering, the image file header and the token length (image placeholders counted
        without decoding pixels). `decode_images=True` runs the full `encode` instead, which also catches truncated
        or corrupt image data, at the cost of decoding every image.
        """
        if decode_images:
            self.encode(record_index)
            return
        conversation = self.conversation(record_index)
        image_size = None
        if conversation.image is not None:
            image_size = check_image_file(self.image_path(conversation.image), conversation.record_id)
        if self.encoder.count_tokens(conversation, image_size) > self.max_length:
            # Rare: whether truncation is allowed depends on exact positions, so encode for real.
            self.encode(record_index)

    def scan(self, *, decode_images: bool = False, num_workers: int = 0, show_progress: bool = True) -> DataStats:
        """Check every record up front (in `num_workers` processes); returns, and stores in `self.stats`, the counts.

        Under "skip" the bad records are removed from the dataset (so `len(self)` and `modality_lengths()` cover only
        good ones); under "error" a `DataValidationError` lists the problems found, after checking all records.
        """
        stats, errors, good = self._check_all(decode_images, num_workers, show_progress)
        self.stats = stats
        if errors and self.on_bad_record == "error":
            listed = "\n".join(f"  - {error}" for error in errors)
            more = f"\n  ... and {stats.num_skipped - len(errors)} more" if stats.num_skipped > len(errors) else ""
            raise DataValidationError(
                f"{stats.num_skipped} bad data record(s) ({stats.summary()}):\n{listed}{more}\n"
                'Fix them or pass on_bad_record="skip" to skip them.'
            )
        if not good:
            raise DataValidationError(f"No usable record in the data set ({stats.summary()})")
        if errors:
            logger.warning("Data scan: %s", stats.summary())
        self.indices = good
        return stats

    def _check_all(
        self, decode_images: bool, num_workers: int, show_progress: bool
    ) -> tuple[DataStats, list[BadRecordError], list[int]]:
        """Counts, the first `MAX_LISTED_ERRORS` problems and the good record indices, over `self.indices`."""
        stats = DataStats()
        errors: list[BadRecordError] = []
        good: list[int] = []
        checks = DataLoader(
            _RecordChecks(self, decode_images), batch_size=64, num_workers=num_workers, collate_fn=list
        )
        with tqdm(total=len(self.indices), desc="Checking data", disable=not show_progress, unit="record") as bar:
            for outcomes in checks:
                for record_index, problem in outcomes:
                    if problem is None:
                        stats.add_kept()
                        good.append(record_index)
                        continue
                    error = BadRecordError(*problem)
                    stats.add_skipped(error)
                    if len(errors) < MAX_LISTED_ERRORS:
                        errors.append(error)
                bar.update(len(outcomes))
        return stats, errors, good

    def modality_lengths(self) -> list[int]:
        """LLaVA's lengths for `group_by_modality_length`: word count of the conversation, negative if text-only.

        Word counts (not tokens) as in LLaVA, so this is cheap on 665K records; never 0 (the sampler needs a sign).
        """
        lengths = []
        for record_index in self.indices:
            record = self.records[record_index]
            words = max(_word_count(record), 1)
            has_image = isinstance(record, Mapping) and record.get("image") is not None
            lengths.append(words if has_image else -words)
        return lengths


class _RecordChecks(Dataset):
    """`LlavaInstructDataset.check` as a dataset, so a DataLoader can spread `scan()` over worker processes.

    Items are `(record_index, None)` or `(record_index, (record_id, reason, detail))`: plain tuples, because
    exceptions with custom constructors do not survive the trip back from a worker.
    """

    def __init__(self, dataset: LlavaInstructDataset, decode_images: bool):
        self.dataset = dataset
        self.decode_images = decode_images

    def __len__(self) -> int:
        return len(self.dataset.indices)

    def __getitem__(self, position: int) -> tuple[int, tuple[str, str, str] | None]:
        record_index = self.dataset.indices[position]
        try:
            self.dataset.check(record_index, decode_images=self.decode_images)
        except BadRecordError as error:
            return record_index, (error.record_id, error.reason, error.detail)
        return record_index, None
