"""`LlavaInstructDataset`: LLaVA instruction records indexed, encoded lazily, and checked up front (`scan`).

Records are validated and encoded by `adsc_llava.train.data`; this module serves them to the Trainer and decides,
before training starts, which records are used.
"""

import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import distributed as dist
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
MIN_RECORDS_PER_SCAN_WORKER = 1000  # fewer records per loader process than this: check them in-process
SCAN_FORMAT = 1  # bump when what `check` accepts changes, so that cached scans are redone


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
            never image placeholders nor the token after one), the next-token loss of pretraining (from scratch).
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
        self.source: Path | None = None  # the file the records were read from (`from_json`), for `scan_key`
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
        dataset = cls(load_records(path), processor, image_folder, **kwargs)
        dataset.source = Path(path)
        return dataset

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
        # The records mark images with LLaVA's `<image>` whatever the processor's own placeholder (Qwen's differs).
        return record_to_conversation(self.records[record_index], record_index)

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

    def check_records(
        self,
        record_indices: Sequence[int],
        *,
        decode_images: bool = False,
        num_workers: int = 0,
        show_progress: bool = True,
    ) -> "ScanOutcome":
        """`check` every record of `record_indices` (in `num_workers` processes); changes nothing in the dataset."""
        outcome = ScanOutcome(DataStats(), [], [])
        checks = DataLoader(
            _RecordChecks(self, list(record_indices), decode_images), batch_size=64, num_workers=num_workers,
            collate_fn=list,
        )  # fmt: skip
        with tqdm(total=len(record_indices), desc="Checking data", disable=not show_progress, unit="record") as bar:
            for results in checks:
                for record_index, problem in results:
                    if problem is None:
                        outcome.stats.add_kept()
                        outcome.good.append(record_index)
                        continue
                    outcome.stats.add_skipped(BadRecordError(*problem))
                    if len(outcome.problems) < MAX_LISTED_ERRORS:
                        outcome.problems.append(problem)
                bar.update(len(results))
        return outcome

    def apply_scan(self, outcome: "ScanOutcome") -> DataStats:
        """Serve only `outcome`'s good records; stores and returns its counts.

        Under "skip" the bad records leave the dataset (so `len(self)` and `modality_lengths()` cover only good
        ones); under "error" a `DataValidationError` lists the problems found.
        """
        stats, errors = outcome.stats, [BadRecordError(*problem) for problem in outcome.problems]
        self.stats = stats
        if errors and self.on_bad_record == "error":
            listed = "\n".join(f"  - {error}" for error in errors)
            more = f"\n  ... and {stats.num_skipped - len(errors)} more" if stats.num_skipped > len(errors) else ""
            raise DataValidationError(
                f"{stats.num_skipped} bad data record(s) ({stats.summary()}):\n{listed}{more}\n"
                'Fix them, or skip them with --on-bad-record skip (on_bad_record="skip").'
            )
        if not outcome.good:
            raise DataValidationError(f"No usable record in the data set ({stats.summary()})")
        if errors:
            logger.warning("Data scan: %s", stats.summary())
        self.indices = list(outcome.good)
        return stats

    def scan(self, *, decode_images: bool = False, num_workers: int = 0, show_progress: bool = True) -> DataStats:
        """Check every record up front in this process (`scan_once` shares the work between processes); returns,
        and stores in `self.stats`, the counts. Bad records are handled as `apply_scan` says."""
        outcome = self.check_records(
            self.indices, decode_images=decode_images, num_workers=num_workers, show_progress=show_progress
        )
        return self.apply_scan(outcome)

    def scan_key(self) -> dict[str, Any]:
        """What a scan's outcome depends on: the data file, the image folder, the length rules and the processor."""
        source = Path(self.source).resolve() if self.source is not None else None
        processor = hashlib.sha256()
        processor.update(self.processor.to_json_string().encode())
        processor.update(json.dumps(sorted(self.processor.tokenizer.get_vocab().items())).encode())
        return {
            "format": SCAN_FORMAT,
            "data": str(source),
            "data_size": source.stat().st_size if source else len(self.records),
            "data_mtime_ns": source.stat().st_mtime_ns if source else None,
            "image_folder": str(self.image_folder.resolve()) if self.image_folder is not None else None,
            "max_length": self.max_length,
            "truncate_long_samples": self.truncate_long_samples,
            "assistant_only_loss": self.encoder.assistant_only_loss,
            "processor": processor.hexdigest(),
        }

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
    """`LlavaInstructDataset.check` over some records as a dataset, so a DataLoader can spread it over processes.

    Items are `(record_index, None)` or `(record_index, (record_id, reason, detail))`: plain tuples, because
    exceptions with custom constructors do not survive the trip back from a worker.
    """

    def __init__(self, dataset: LlavaInstructDataset, record_indices: list[int], decode_images: bool):
        self.dataset = dataset
        self.record_indices = record_indices
        self.decode_images = decode_images

    def __len__(self) -> int:
        return len(self.record_indices)

    def __getitem__(self, position: int) -> tuple[int, tuple[str, str, str] | None]:
        record_index = self.record_indices[position]
        try:
            self.dataset.check(record_index, decode_images=self.decode_images)
        except BadRecordError as error:
            return record_index, (error.record_id, error.reason, error.detail)
        return record_index, None


@dataclass
class ScanOutcome:
    """What checking records found: the counts, the first `MAX_LISTED_ERRORS` problems as `(record_id, reason,
    detail)`, and the indices of the good records, in record order."""

    stats: DataStats
    problems: list[tuple[str, str, str]]
    good: list[int]

    @classmethod
    def merged(cls, outcomes: Sequence["ScanOutcome"]) -> "ScanOutcome":
        """One outcome of the outcomes of disjoint sets of records (e.g. the shards of several processes)."""
        stats = DataStats()
        for outcome in outcomes:
            stats.checked += outcome.stats.checked
            stats.kept += outcome.stats.kept
            stats.skipped.update(outcome.stats.skipped)
            for reason, record_ids in outcome.stats.examples.items():
                examples = stats.examples.setdefault(reason, [])
                examples += record_ids[: stats.max_examples - len(examples)]
        problems = [problem for outcome in outcomes for problem in outcome.problems][:MAX_LISTED_ERRORS]
        return cls(stats, problems, sorted(index for outcome in outcomes for index in outcome.good))

    def to_json(self) -> dict[str, Any]:
        stats = {"checked": self.stats.checked, "kept": self.stats.kept, "skipped": dict(self.stats.skipped),
                 "examples": self.stats.examples}  # fmt: skip
        return {"stats": stats, "problems": [list(problem) for problem in self.problems], "good": self.good}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> "ScanOutcome":
        stats = value["stats"]
        return cls(
            DataStats(stats["checked"], stats["kept"], Counter(stats["skipped"]), dict(stats["examples"])),
            [tuple(problem) for problem in value["problems"]],
            list(value["good"]),
        )


def scan_once(
    dataset: LlavaInstructDataset, cache_file: Path | None, *, num_workers: int = 0, show_progress: bool = True
) -> tuple[DataStats, str]:
    """`dataset.scan()` for a run on any number of processes: done once, shared, and kept for reruns and resumes.

    Every process checks its own share of the records (`num_workers` loader processes each, for big shares) and
    they exchange what they found, so every process ends up serving exactly the same records, whatever one of them
    alone might have seen (a file system hiccup must not give two processes different data sets). The outcome is
    written to `cache_file` (by the main process), keyed by `LlavaInstructDataset.scan_key()`; a later run with the
    same key (`--resume`, or a rerun into the same output folder) reads it instead of scanning. Delete the file to
    check the records again (e.g. after fixing images).

    Returns the counts and a note on how they were obtained (how long the scan took, or which file was reused).
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    key = dataset.scan_key()
    cached = [read_scan_cache(cache_file, key) if rank == 0 and cache_file is not None else None]
    if world > 1:
        dist.broadcast_object_list(cached, src=0)
    if cached[0] is not None:
        return dataset.apply_scan(cached[0]), f"reused {cache_file}"
    start = time.perf_counter()
    shard = dataset.indices[rank::world]
    workers = min(num_workers, len(shard) // MIN_RECORDS_PER_SCAN_WORKER)
    outcome = dataset.check_records(shard, num_workers=workers, show_progress=show_progress and rank == 0)
    if world > 1:
        outcomes: list[ScanOutcome | None] = [None] * world
        dist.all_gather_object(outcomes, outcome)
        outcome = ScanOutcome.merged(outcomes)
    seconds = time.perf_counter() - start
    stats = dataset.apply_scan(outcome)  # raises on every process alike
    if rank == 0 and cache_file is not None:
        write_scan_cache(cache_file, key, outcome)
    return stats, f"scanned in {seconds:.1f} s by {world} process(es) x {max(workers, 1)} worker(s)"


def read_scan_cache(cache_file: Path, key: dict[str, Any]) -> ScanOutcome | None:
    """The outcome stored in `cache_file` if it was scanned with `key`, else None."""
    try:
        stored = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if stored.get("key") != key:
        logger.info("Data scan cache %s is for other data or settings: scanning again", cache_file)
        return None
    return ScanOutcome.from_json(stored["outcome"])


def write_scan_cache(cache_file: Path, key: dict[str, Any], outcome: ScanOutcome) -> None:
    """Write atomically: a run killed mid-write leaves the old file or none, never half of one."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    staging = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
    staging.write_text(json.dumps({"key": key, "outcome": outcome.to_json()}), encoding="utf-8")
    os.replace(staging, cache_file)
