"""A Qwen-VL processor for images and text only, for machines without torchvision (the project's tests).

transformers 5.24 builds every Qwen2.5-VL / Qwen3-VL processor with a video processor, which needs torchvision; on a
machine without it the stock processors cannot even be constructed. This one is `Qwen2_5_VLProcessor` without the
video processor: the same image placeholders (`image_grid_thw` merged patches per `<|image_pad|>`), the same
`mm_token_type_ids`, the same chat template handling (Qwen3-VL writes images exactly like Qwen2.5-VL). Saved with
`save_pretrained`, it travels as remote code (`auto_map`), so `AutoProcessor.from_pretrained(folder,
trust_remote_code=True)` loads it anywhere. Real checkpoints keep their stock processor.

This file is remote code: it imports only transformers.
"""

from transformers import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin


class QwenVLImageProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` with images and text only (no video processor, so no torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
        self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


QwenVLImageProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["QwenVLImageProcessor"]
