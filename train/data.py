"""LLaVA-InstructionMix-665K data: JSON records -> chat-template prompts -> token ids, labels and pixel values.

A record is `{"id", "image"? (relative to the image folder), "conversations": [{"from": "human"|"gpt", "value"}]}`;
text-only records have no `image`. As in LLaVA, `<image>` is removed from the turns and put back once at the start
of the first human turn (the chat template renders it as `<image>\\n` before the question).

Labels: only assistant answers and the end-of-turn token that closes each of them (`</s>` for LLaVA-1.5) are
supervised; every other position is `IGNORE_INDEX` (-100). Prompts are built by the processor's own chat template,
so training sees exactly the format the checkpoint is prompted with:

- templates with `{% generation %}` markers (llava-hf's has them) go through `processor.apply_chat_template(...,
  return_assistant_tokens_mask=True)`, whose mask already accounts for the expansion of `<image>` into one
  placeholder token per vision token. The mask covers every token that overlaps the marked text, including one
  that only carries the template's space after an answer (Llama's `▁USER:` after `</s> `), so each marked run is
  cut back to the answer itself: from its first non-blank token through its EOS. The markers are tried once on a
  probe conversation when the dataset is built, so a template that cannot be used fails before training starts;
- templates without markers fall back to prefix rendering: the answer of assistant turn `k` is what
  `render(turns[:k + 1])` adds to `render(turns[:k], add_generation_prompt=True)`, located in the token ids
  through the tokenizer's offsets. Any template whose successive prefixes extend each other works; others raise
  `ChatTemplateError`.

Both paths give the same ids and labels for llava-hf's template with and without its markers (the tests check
this token for token). When the template does not emit the end-of-turn token itself (llava-hf's
LLaVA-1.5 template renders `ASSISTANT: <answer> USER: ...` without `</s>`, while LLaVA was trained to end every
answer with `</s>`), it is appended to each answer before rendering, so it is supervised as part of the answer.
Whitespace the template leaves after the last answer is dropped, as LLaVA's prompts end with the final `</s>`.

The pieces: `record_to_conversation` validates a record, `ConversationEncoder` turns a conversation and its image
into tensors, and `fit_to_length` enforces `max_length`. `adsc_llava.train.dataset.LlavaInstructDataset` indexes
the records, skips bad ones and scans them; `collator` batches them and `sampler` orders them as LLaVA does. Bad
records (missing or unreadable image, no conversations, malformed roles, too long, ...) either raise
`BadRecordError` naming the record and the problem (`on_bad_record="error"`) or are skipped and counted
(`on_bad_record="skip"`). `LlavaInstructDataset.scan()` checks every record up front so problems surface before
training starts rather than hours in.
"""

import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from transformers import ProcessorMixin

IGNORE_INDEX = -100
DEFAULT_IMAGE_TOKEN = "<image>"

BadRecordPolicy = Literal["error", "skip"]
BAD_RECORD_POLICIES = ("error", "skip")

# Why a record is rejected; `DataStats.skipped` counts skips under these keys.
MALFORMED_RECORD = "malformed_record"  # not a JSON object, or fields of the wrong type
NO_CONVERSATIONS = "no_conversations"  # `conversations` missing or empty
MALFORMED_ROLES = "malformed_roles"  # unknown role, turns not alternating human/gpt, or no final answer
IMAGE_TOKEN_WITHOUT_IMAGE = "image_token_without_image"  # `<image>` in the text of a text-only record
MISSING_IMAGE = "missing_image"  # the image file does not exist
UNREADABLE_IMAGE = "unreadable_image"  # the image file exists but PIL cannot decode it
TOO_LONG = "too_long"  # more than `max_length` tokens (and not safely truncatable)
BAD_RECORD_REASONS = (
    MALFORMED_RECORD,
    NO_CONVERSATIONS,
    MALFORMED_ROLES,
    IMAGE_TOKEN_WITHOUT_IMAGE,
    MISSING_IMAGE,
    UNREADABLE_IMAGE,
    TOO_LONG,
)

# LLaVA's speaker names, plus the chat-template names for data converted from other sources.
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

# The tag transformers uses to mark assistant content for `return_assistant_tokens_mask`.
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
# A minimal conversation for trying out a chat template before any record is encoded.
_PROBE_MESSAGES = [
    {"role": "user", "content": [{"type": "text", "text": "question"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "answer"}]},
]

# Errors PIL raises for corrupt, truncated or hostile files (UnidentifiedImageError is an OSError).
_IMAGE_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class BadRecordError(ValueError):
    """A data record that cannot be turned into a training sample; names the record, the reason and the detail."""

    def __init__(self, record_id: str, reason: str, detail: str):
        self.record_id = record_id
        self.reason = reason
        self.detail = detail
        super().__init__(f"Bad data record {record_id!r} ({reason}): {detail}")


class ChatTemplateError(ValueError):
    """The processor's chat template cannot be used to locate assistant turns (a setup problem, never skipped)."""


class DataValidationError(ValueError):
    """`scan()` found bad records while `on_bad_record="error"`; lists how many of each kind and the first few."""


@dataclass
class DataStats:
    """Counts of records checked, kept and skipped (by reason), with the first few skipped ids per reason."""

    checked: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def add_kept(self) -> None:
        self.checked += 1
        self.kept += 1

    def add_skipped(self, error: BadRecordError) -> None:
        self.checked += 1
        self.skipped[error.reason] += 1
        examples = self.examples.setdefault(error.reason, [])
        if len(examples) < self.max_examples:
            examples.append(error.record_id)

    def summary(self) -> str:
        """One line, e.g. `checked 10, kept 8, skipped 2 (missing_image: 1 e.g. ['a'], too_long: 1 e.g. ['b'])`."""
        parts = [f"{reason}: {count} e.g. {self.examples.get(reason, [])}" for reason, count in self.skipped.items()]
        detail = f" ({', '.join(parts)})" if parts else ""
        return f"checked {self.checked}, kept {self.kept}, skipped {self.num_skipped}{detail}"


@dataclass(frozen=True)
class Conversation:
    """A validated record: chat-template messages plus the image path (None for text-only records)."""

    record_id: str
    image: str | None
    messages: list[dict[str, Any]]


@dataclass(frozen=True)
class RenderedConversation:
    """Prompt text and the `[start, end)` character spans of the supervised assistant answers (each ends with EOS)."""

    text: str
    assistant_spans: list[tuple[int, int]]


def load_records(path: str | os.PathLike) -> list[Any]:
    """Records of a LLaVA JSON file (one list of records) or JSON-lines file (one record per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file not found: {path}")
    with path.open(encoding="utf-8") as handle:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in handle if line.strip()]
        records = json.load(handle)
    if not isinstance(records, list):
        raise ValueError(f"{path} must contain a JSON list of records, found {type(records).__name__}")
    return records


def record_id_of(record: Any, index: int) -> str:
    """The record's `id`, or `#<index>` when it has none (errors must name something the user can find)."""
    if isinstance(record, Mapping) and record.get("id") is not None:
        return str(record["id"])
    return f"#{index}"


def _check_turns(record_id: str, turns: Any) -> list[tuple[str, str]]:
    """(role, text) pairs of a record's `conversations`, alternating user/assistant and ending with an answer."""
    if not isinstance(turns, list) or not turns:
        raise BadRecordError(record_id, NO_CONVERSATIONS, "`conversations` is missing or empty")
    if isinstance(turns[0], Mapping) and ROLE_NAMES.get(turns[0].get("from")) == "assistant":
        turns = turns[1:]  # LLaVA's `preprocess` drops a leading answer (some ShareGPT records open with one)
        if not turns:
            raise BadRecordError(record_id, NO_CONVERSATIONS, "`conversations` holds only an answer")
    checked: list[tuple[str, str]] = []
    for position, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
            raise BadRecordError(record_id, MALFORMED_RECORD, f"turn {position} is not {{'from': ..., 'value': str}}")
        role = ROLE_NAMES.get(turn.get("from"))
        if role is None:
            raise BadRecordError(
                record_id, MALFORMED_ROLES, f"turn {position} has unknown role {turn.get('from')!r} (use human/gpt)"
            )
        expected = "user" if position % 2 == 0 else "assistant"
        if role != expected:
            raise BadRecordError(
                record_id, MALFORMED_ROLES, f"turn {position} is {turn.get('from')!r}; turns must alternate human/gpt"
            )
        checked.append((role, turn["value"]))
    if checked[-1][0] != "assistant":
        raise BadRecordError(record_id, MALFORMED_ROLES, "the last turn is a human turn with no answer")
    return checked


def _strip_image_token(text: str, image_token: str) -> str:
    """LLaVA's relocation: drop every `<image>` from a turn and strip the whitespace it leaves around the text."""
    return text.replace(image_token, "").strip() if image_token in text else text


def record_to_conversation(record: Any, index: int, image_token: str = DEFAULT_IMAGE_TOKEN) -> Conversation:
    """Validate a raw record and convert it to chat-template messages with the image in the first user turn."""
    record_id = record_id_of(record, index)
    if not isinstance(record, Mapping):
        raise BadRecordError(record_id, MALFORMED_RECORD, f"expected a JSON object, got {type(record).__name__}")
    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise BadRecordError(record_id, MALFORMED_RECORD, f"`image` must be a non-empty path string, got {image!r}")
    turns = _check_turns(record_id, record.get("conversations"))
    if image is None and any(image_token in text for _, text in turns):
        raise BadRecordError(record_id, IMAGE_TOKEN_WITHOUT_IMAGE, f"text contains {image_token!r} but no `image`")

    messages = []
    for position, (role, text) in enumerate(turns):
        content: list[dict[str, Any]] = []
        if image is not None:
            text = _strip_image_token(text, image_token)
            if position == 0:
                content.append({"type": "image"})
        content.append({"type": "text", "text": text})
        messages.append({"role": role, "content": content})
    return Conversation(record_id=record_id, image=image, messages=messages)


def check_image_file(path: Path, record_id: str) -> tuple[int, int]:
    """(width, height) of the image at `path`, reading only its header; raises `BadRecordError` if unusable."""
    if not path.is_file():
        raise BadRecordError(record_id, MISSING_IMAGE, f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
    except _IMAGE_DECODE_ERRORS as error:
        raise BadRecordError(record_id, UNREADABLE_IMAGE, f"cannot read image {path}: {error}") from error
    return size


def load_image(path: Path, record_id: str) -> Image.Image:
    """The image at `path` decoded as RGB; raises `BadRecordError` if missing, truncated or corrupt."""
    if not path.is_file():
        raise BadRecordError(record_id, MISSING_IMAGE, f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            # convert() decodes the whole file, so bad data fails here with the record named, not deep in a worker.
            return image.convert("RGB")
    except _IMAGE_DECODE_ERRORS as error:
        raise BadRecordError(record_id, UNREADABLE_IMAGE, f"cannot read image {path}: {error}") from error


def has_generation_markers(chat_template: str | Mapping[str, str] | None) -> bool:
    """Whether a chat template marks assistant content with `{% generation %}` (needed for the assistant mask)."""
    if isinstance(chat_template, Mapping):
        # A processor with several named templates renders chats with its "default" one.
        chat_template = chat_template.get("default")
    return isinstance(chat_template, str) and GENERATION_MARKER.search(chat_template) is not None


def _with_eos(messages: list[dict[str, Any]], eos_token: str) -> list[dict[str, Any]]:
    """Copy of `messages` with `eos_token` appended to every assistant text."""
    return [
        {
            **message,
            "content": [
                {**item, "text": item["text"] + eos_token} if item["type"] == "text" else item
                for item in message["content"]
            ],
        }
        if message["role"] == "assistant"
        else message
        for message in messages
    ]


def _render(processor: ProcessorMixin, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _starts_with_bos(processor: ProcessorMixin, text: str) -> bool:
    # A template that writes the BOS token itself must not get a second one from the tokenizer.
    bos_token = processor.tokenizer.bos_token
    return bos_token is not None and text.startswith(bos_token)


def chat_template_emits_eos(processor: ProcessorMixin) -> bool:
    """Whether the processor's chat template itself closes an assistant answer with the tokenizer's EOS token."""
    eos_token = processor.tokenizer.eos_token
    prompt = _render(processor, _PROBE_MESSAGES[:1], add_generation_prompt=True)
    full = _render(processor, _PROBE_MESSAGES, add_generation_prompt=False)
    return full[len(prompt) :].rstrip().endswith(eos_token)


def _answer_span(text: str, start: int, end: int) -> tuple[int, int]:
    """Shrink `[start, end)` to exclude the whitespace a template puts around an answer."""
    answer = text[start:end]
    return start + len(answer) - len(answer.lstrip()), start + len(answer.rstrip())


def _spans_by_prefixes(
    processor: ProcessorMixin, messages: list[dict[str, Any]], text: str, eos_token: str
) -> list[tuple[int, int]]:
    """Character spans of the answers in `text`: an answer is what `render(turns[:k + 1])` adds to the prompt
    `render(turns[:k], add_generation_prompt=True)`. Works for any template whose prefixes extend each other."""
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(processor, messages[:turn], add_generation_prompt=True)
        through_answer = _render(processor, messages[: turn + 1], add_generation_prompt=False)
        if not (through_answer.startswith(prompt) and text.startswith(through_answer)):
            raise ChatTemplateError(
                "The chat template renders a conversation prefix differently from the full conversation, so "
                f"assistant turns cannot be located. Prefix ending at turn {turn}: {through_answer!r}"
            )
        start, end = _answer_span(text, len(prompt), len(through_answer))
        if not text[start:end].endswith(eos_token):
            raise ChatTemplateError(
                f"Assistant turn {turn} does not end with the EOS token {eos_token!r} after rendering: "
                f"{text[start:end]!r}"
            )
        spans.append((start, end))
    return spans


def render_conversation(processor: ProcessorMixin, messages: list[dict[str, Any]]) -> RenderedConversation:
    """Render `messages` with a chat template that has no generation markers and locate the answers in the text.

    Each span runs from the first non-space character of an answer to the end of its EOS token, so the role header
    and the whitespace the template puts around answers stay unsupervised. `messages` must already end every answer
    with EOS when the template does not write it.
    """
    text = _render(processor, messages, add_generation_prompt=False)
    spans = _spans_by_prefixes(processor, messages, text, processor.tokenizer.eos_token)
    # Trailing whitespace after the last answer would only add an unsupervised token.
    return RenderedConversation(text=text.rstrip(), assistant_spans=spans)


def _shift_spans(spans: list[tuple[int, int]], replacements: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Move character spans of the prompt to where they are after the processor expanded its `<image>` tokens."""
    shifted = []
    for start, end in spans:
        # Every placeholder that ends at or before the span start pushes the span right by what it grew.
        gained = sum(r["new_span"][1] - r["span"][1] for r in replacements if r["span"][1] <= start)
        shifted.append((start + gained, end + gained))
    return shifted


def tokens_in_spans(offsets: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """Bool mask `[seq_len]` of the tokens that overlap a character span.

    `offsets` is the tokenizer's offset mapping `[seq_len, 2]`; tokens it does not place in the text (such as the
    BOS token the tokenizer adds, offsets `(0, 0)`) never overlap a span.
    """
    inside = torch.zeros(len(offsets), dtype=torch.bool)
    for start, end in spans:
        inside |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    return inside


def _runs(flags: torch.Tensor) -> list[tuple[int, int]]:
    """`[start, end)` ranges of consecutive True values."""
    runs, start = [], None
    for position, flag in enumerate(flags.tolist() + [False]):
        if flag and start is None:
            start = position
        elif not flag and start is not None:
            runs.append((start, position))
            start = None
    return runs


def truncation_point(
    input_ids: torch.Tensor, labels: torch.Tensor, max_length: int, image_token_id: int
) -> int | None:
    """`max_length` if cutting there splits no image span and keeps a supervised token, else None."""
    if any(start < max_length < end for start, end in _runs(input_ids == image_token_id)):
        return None
    if not bool((labels[:max_length] != IGNORE_INDEX).any()):
        return None
    return max_length


# What a processor returns for images: LLaVA-1.5 pixels, NeXT / OneVision crops with image sizes, Qwen-VL patches
# with their grid.
IMAGE_TENSOR_KEYS = ("pixel_values", "image_sizes", "image_grid_thw")
# Per-image tensors a batch concatenates, image after image.
PER_IMAGE_KEYS = ("image_sizes", "image_grid_thw")


def image_tensors(encoding: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The image tensors of a processor's output (none for a text-only sample)."""
    return {key: encoding[key] for key in IMAGE_TENSOR_KEYS if encoding.get(key) is not None}


def fit_to_length(
    record_id: str,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    max_length: int,
    *,
    truncate: bool,
    image_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` and `labels` cut to `max_length` when `truncate` allows it; raises `BadRecordError` if too long."""
    if len(input_ids) <= max_length:
        return input_ids, labels
    cut = truncation_point(input_ids, labels, max_length, image_token_id) if truncate else None
    if cut is None:
        raise BadRecordError(
            record_id,
            TOO_LONG,
            f"{len(input_ids)} tokens > max_length {max_length}"
            + (" and truncation would split an image or drop every answer" if truncate else ""),
        )
    return input_ids[:cut], labels[:cut]


class ConversationEncoder:
    """Turns a `Conversation` and its decoded image into `{input_ids, labels, pixel_values}` with a LLaVA processor.

    Args:
        processor: A LLaVA processor with a chat template (`LlavaProcessor` of the checkpoint being trained).
        assistant_only_loss: Supervise the assistant answers only (LLaVA). False: every text token (prompts too,
            never image placeholders nor the token after one), the next-token loss of pretraining (from scratch).
    """

    def __init__(self, processor: ProcessorMixin, assistant_only_loss: bool = True):
        if getattr(processor, "chat_template", None) is None:
            raise ChatTemplateError("The processor has no chat template; prompts are built with it.")
        tokenizer = processor.tokenizer
        if tokenizer.eos_token is None:
            raise ValueError("The tokenizer has no EOS token; assistant turns must end with one.")
        self.processor = processor
        self.assistant_only_loss = assistant_only_loss
        self.image_token = getattr(processor, "image_token", DEFAULT_IMAGE_TOKEN)
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.append_eos = not chat_template_emits_eos(processor)
        self.uses_generation_markers = has_generation_markers(processor.chat_template)
        self._image_tokens_by_size: dict[tuple[int, int], int] = {}
        self._blank_tokens: dict[int, bool] = {}
        if self.uses_generation_markers:
            # Unusable markers are a setup problem: raise `ChatTemplateError` now, not at the first training sample.
            self.encode(Conversation("chat template probe", None, _PROBE_MESSAGES), image=None)

    def messages(self, conversation: Conversation) -> list[dict[str, Any]]:
        """The chat-template messages, each answer closed by EOS when the template does not write it."""
        if self.append_eos:
            return _with_eos(conversation.messages, self.processor.tokenizer.eos_token)
        return conversation.messages

    def render(self, conversation: Conversation) -> str:
        """The prompt text that `encode` tokenizes (one `<image>` per image, before expansion)."""
        messages = self.messages(conversation)
        if self.uses_generation_markers:
            return _render(self.processor, messages, add_generation_prompt=False).rstrip()
        # Also checks that the answers can be located, so `scan()` catches unusable templates.
        return render_conversation(self.processor, messages).text

    def count_tokens(self, conversation: Conversation, image_size: tuple[int, int] | None) -> int:
        """Length of `encode`'s output, counting image placeholders from the image size instead of its pixels."""
        text = self.render(conversation)
        tokens = self.processor.tokenizer(text, add_special_tokens=not _starts_with_bos(self.processor, text))
        length = len(tokens["input_ids"])
        if image_size is not None:
            # The text already counts the `<image>` token itself once.
            length += self.image_tokens_for_size(*image_size) - 1
        return length

    def image_tokens_for_size(self, width: int, height: int) -> int:
        """Placeholder tokens an image of this size expands to, by the processor's own count (the one vLLM uses)
        where it has one, else measured on a blank image; once per size either way."""
        size = (width, height)
        if size not in self._image_tokens_by_size:
            if hasattr(self.processor, "_get_num_multimodal_tokens"):
                counts = self.processor._get_num_multimodal_tokens(image_sizes=[(height, width)])
                self._image_tokens_by_size[size] = counts.num_image_tokens[0]
            else:
                self._image_tokens_by_size[size] = self.measured_image_tokens(width, height)
        return self._image_tokens_by_size[size]

    def measured_image_tokens(self, width: int, height: int) -> int:
        """Placeholder tokens the processor writes for a blank image of this size (runs the image processor)."""
        encoding = self.processor(images=[Image.new("RGB", (width, height))], text=[self.image_token])
        return sum(token == self.image_token_id for token in encoding["input_ids"][0])

    def encode(self, conversation: Conversation, image: Image.Image | None) -> dict[str, torch.Tensor]:
        """`input_ids` and `labels` `[seq_len]`, plus the processor's image tensors when `image` is given.

        These are `pixel_values` `[1, 3, H, W]` (LLaVA-1.5), or `[1, crops, 3, H, W]` and `image_sizes` `[1, 2]`
        (LLaVA-NeXT / OneVision, whose images are cut into a size-dependent number of crops).
        """
        messages = self.messages(conversation)
        if self.uses_generation_markers:
            input_ids, answers, visual = self._tokenize_with_mask(messages, image)
        else:
            input_ids, answers, visual = self._tokenize_with_spans(messages, image)
        if self.assistant_only_loss:
            labels = input_ids.masked_fill(~answers, IGNORE_INDEX)
        else:
            # The token after an image is predicted from the image's last token, which ADSC drops at its first
            # pruning layer when an image keeps fewer than half its tokens: that label would train a shallow state.
            image = input_ids == self.image_token_id
            after_image = torch.nn.functional.pad(image[:-1], (1, 0)) & ~image
            labels = input_ids.masked_fill(image | after_image, IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels, **visual}

    def _tokenize_with_mask(
        self, messages: list[dict[str, Any]], image: Image.Image | None
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Token ids, answer mask and image tensors from the assistant mask of `apply_chat_template` (markers)."""
        encoding = self.processor.apply_chat_template(
            messages,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            return_tensors="pt",
            processor_kwargs={"images": [image]} if image is not None else {},
        )
        input_ids = encoding["input_ids"][0]
        marked = encoding["assistant_masks"][0].bool()
        # LLaVA's prompts end with the last `</s>`; the space some templates write after it would be a blank token.
        end = len(input_ids)
        while end > 0 and self._is_blank(int(input_ids[end - 1])):
            end -= 1
        input_ids, marked = input_ids[:end], marked[:end]
        return input_ids, self._answers_in_marked_runs(input_ids, marked), image_tensors(encoding)

    def _answers_in_marked_runs(self, input_ids: torch.Tensor, marked: torch.Tensor) -> torch.Tensor:
        """Each run of marked tokens cut back to its answer: first non-blank token through the closing EOS.

        The mask covers every token overlapping the template's generation block, including tokens that only carry
        the whitespace the template writes around the answer (Llama's "▁USER:" after `</s> `). A template that
        writes EOS right after the block, outside it, still gets that EOS supervised.
        """
        runs = _runs(marked)
        if not runs:
            raise ChatTemplateError("The chat template's {% generation %} blocks mark no token of the conversation.")
        eos_token_id = self.processor.tokenizer.eos_token_id
        answers = torch.zeros_like(marked)
        for start, end in runs:
            while start < end and self._is_blank(int(input_ids[start])):
                start += 1
            eos_positions = (input_ids[start:end] == eos_token_id).nonzero().flatten().tolist()
            if eos_positions:
                end = start + eos_positions[-1] + 1
            elif end < len(input_ids) and int(input_ids[end]) == eos_token_id:
                end += 1
            else:
                text = self.processor.tokenizer.decode(input_ids[start:end])
                raise ChatTemplateError(
                    f"A {{% generation %}} block of the chat template is not closed by the EOS token: {text!r}"
                )
            answers[start:end] = True
        return answers

    def _is_blank(self, token_id: int) -> bool:
        """Whether a token decodes to whitespace only ("▁", "Ġ", "<0x0A>", ...: decoding covers every family)."""
        if token_id not in self._blank_tokens:
            text = self.processor.tokenizer.decode([token_id], skip_special_tokens=False)
            self._blank_tokens[token_id] = not text.strip()
        return self._blank_tokens[token_id]

    def _tokenize_with_spans(
        self, messages: list[dict[str, Any]], image: Image.Image | None
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Token ids, answer mask and image tensors from prefix rendering (templates without generation markers)."""
        rendered = render_conversation(self.processor, messages)
        encoding = self.processor(
            images=[image] if image is not None else None,
            text=[rendered.text],
            add_special_tokens=not _starts_with_bos(self.processor, rendered.text),
            return_offsets_mapping=True,
            return_text_replacement_offsets=True,
            return_tensors="pt",
        )
        spans = _shift_spans(rendered.assistant_spans, encoding["text_replacement_offsets"][0])
        answers = tokens_in_spans(encoding["offset_mapping"][0], spans)
        return encoding["input_ids"][0], answers, image_tensors(encoding)
