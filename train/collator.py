"""`LlavaDataCollator`: pads encoded samples into the batch `LlavaForConditionalGeneration.forward` takes."""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import ProcessorMixin

from adsc_llava.train.data import IGNORE_INDEX, PER_IMAGE_KEYS


@dataclass
class LlavaDataCollator:
    """Pads `LlavaInstructDataset` items into a batch for `LlavaForConditionalGeneration.forward`.

    Returns `input_ids` `[batch, seq_len]` (padded with `pad_token_id`), `attention_mask` `[batch, seq_len]`,
    `labels` `[batch, seq_len]` (padded with `label_pad_token_id`) and, when any item has an image,
    `pixel_values` `[num_images, 3, H, W]`: the images of the batch in order of appearance, which is the order in
    which LLaVA fills the image placeholder tokens. Text-only items contribute no image; a batch without images has
    no `pixel_values` key.
    """

    pad_token_id: int
    label_pad_token_id: int = IGNORE_INDEX
    padding_side: Literal["right", "left"] = "right"
    pad_to_multiple_of: int | None = None

    @classmethod
    def from_processor(cls, processor: ProcessorMixin, **kwargs: Any) -> "LlavaDataCollator":
        pad_token_id = processor.tokenizer.pad_token_id
        if pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; set one (llava-hf checkpoints use `<pad>`).")
        return cls(pad_token_id=pad_token_id, **kwargs)

    def __post_init__(self):
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")

    def _padded_length(self, features: list[Mapping[str, Any]]) -> int:
        length = max(len(feature["input_ids"]) for feature in features)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        return length

    def _pad(self, sequences: list[torch.Tensor], length: int, value: int) -> torch.Tensor:
        batch = torch.full((len(sequences), length), value, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            if self.padding_side == "right":
                batch[row, : len(sequence)] = sequence
            else:
                batch[row, length - len(sequence) :] = sequence
        return batch

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("Cannot collate an empty batch")
        input_ids = [torch.as_tensor(feature["input_ids"], dtype=torch.long) for feature in features]
        labels = [torch.as_tensor(feature["labels"], dtype=torch.long) for feature in features]
        for row, (ids, row_labels) in enumerate(zip(input_ids, labels, strict=True)):
            if ids.shape != row_labels.shape or ids.dim() != 1:
                raise ValueError(
                    f"Item {row}: input_ids {tuple(ids.shape)} and labels {tuple(row_labels.shape)} must be equal 1-D"
                )
        length = self._padded_length(features)
        batch = {
            "input_ids": self._pad(input_ids, length, self.pad_token_id),
            "attention_mask": self._pad([torch.ones_like(ids) for ids in input_ids], length, 0),
            "labels": self._pad(labels, length, self.label_pad_token_id),
        }
        pixel_values = [feature["pixel_values"] for feature in features if feature.get("pixel_values") is not None]
        if not pixel_values:
            return batch
        pixel_values = [torch.as_tensor(pixels) for pixels in pixel_values]
        if any(feature.get("image_sizes") is not None for feature in features):
            # NeXT / OneVision: `[1, crops, 3, H, W]` per image, crops by image size: zero-pad to the most crops, as
            # their image processors pad a batch; the model reads each image's crop count from `image_sizes`.
            most = max(pixels.shape[1] for pixels in pixel_values)
            pixel_values = [
                nn.functional.pad(pixels, (0, 0, 0, 0, 0, 0, 0, most - pixels.shape[1])) for pixels in pixel_values
            ]
        # Qwen-VL: `pixel_values` are `[patches, patch_dim]` per image, concatenated; each image's grid says how many.
        for key in PER_IMAGE_KEYS:
            if any(feature.get(key) is not None for feature in features):
                batch[key] = torch.cat([torch.as_tensor(f[key]) for f in features if f.get(key) is not None])
        shapes = {tuple(pixels.shape[1:]) for pixels in pixel_values}
        if len(shapes) != 1:
            raise ValueError(f"All images of a batch must have the same processed shape, got {sorted(shapes)}")
        batch["pixel_values"] = torch.cat(pixel_values, dim=0)
        return batch
