"""transformers' own `ModelTesterMixin`, run on stock LLaVA, on ADSC with an empty schedule and on ADSC pruning.

The three test classes share one model tester and one list of tests skipped for every class (tests that stock LLaVA
itself does not pass on this CPU set-up, each with its reason), so ADSC with an empty schedule passes exactly what
stock LLaVA passes. The pruning class skips, in addition, only the tests that assert stock cache shapes or static
caches (`SKIPPED_WHEN_PRUNING`). See `transformers_common/__init__.py` for where the mixin comes from.
"""

import subprocess
import unittest
from unittest.mock import patch

import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaModel
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    MODEL_MAPPING,
    MODEL_MAPPING_NAMES,
)
from transformers_common.loader import fetch_source_release, load_model_tester_mixin

from adsc_llava import AdscLlavaConfig
from adsc_llava.modeling_adsc_llava import AdscLlavaForConditionalGeneration, AdscLlavaModel

try:
    fetch_source_release()
except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:  # PyPI out of reach: nothing to run
    pytest.skip(f"transformers' source release could not be downloaded from PyPI: {error}", allow_module_level=True)
common = load_model_tester_mixin()
ModelTesterMixin, floats_tensor, ids_tensor = common.ModelTesterMixin, common.floats_tensor, common.ids_tensor
# The project silences deprecation warnings in its own tests; transformers' tests assert some of them.
pytestmark = [
    pytest.mark.filterwarnings("default::FutureWarning"),
    pytest.mark.filterwarnings("default::DeprecationWarning"),
]

IMAGE_TOKEN_ID, PAD_TOKEN_ID = 0, 1
TEXT_CONFIG = dict(
    model_type="llama",
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    hidden_act="gelu",
    max_position_embeddings=512,
    initializer_range=0.02,
    pad_token_id=PAD_TOKEN_ID,
)
VISION_CONFIG = dict(
    image_size=8,
    patch_size=2,
    num_channels=3,
    hidden_size=32,
    projection_dim=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    dropout=0.1,
    attention_dropout=0.1,
    initializer_range=0.02,
)
PRUNING = dict(pruning_layers=[1], drop_ratio=0.5)

# Tests that stock LLaVA does not pass here either (CPU, these library versions), so no class runs them.
SKIPPED_FOR_ALL = {
    "test_generation_tester_mixin_inheritance": "GenerationTesterMixin is not in transformers' source release (see "
    "transformers_common); the project's own tests cover generation",
    "test_training_gradient_checkpointing": "fails for stock LLaVA as upstream skips it: the CLIP tower's unused "
    "post_layernorm gets no gradient",
    "test_training_gradient_checkpointing_use_reentrant_false": "as test_training_gradient_checkpointing",
    "test_training_gradient_checkpointing_use_reentrant_true": "as test_training_gradient_checkpointing",
}
# Tests that assert what pruning changes on purpose: stock cache shapes, or caches of one length for every layer.
SKIPPED_WHEN_PRUNING: dict[str, str] = {}


class TinyLlavaTester:
    """Three prompts of 7 text tokens after one 8-px image of 16 vision tokens, for a 2-layer Llama."""

    def __init__(self, parent: unittest.TestCase, config_class, schedule: dict):
        self.parent = parent
        self.config_class = config_class
        self.schedule = schedule
        self.text_config, self.vision_config = dict(TEXT_CONFIG), dict(VISION_CONFIG)
        self.batch_size = 3
        self.num_image_tokens = (VISION_CONFIG["image_size"] // VISION_CONFIG["patch_size"]) ** 2
        self.seq_length = 7 + self.num_image_tokens
        self.encoder_seq_length = self.seq_length
        self.hidden_size = TEXT_CONFIG["hidden_size"]
        self.num_hidden_layers = TEXT_CONFIG["num_hidden_layers"]
        self.num_attention_heads = TEXT_CONFIG["num_attention_heads"]
        self.vocab_size = TEXT_CONFIG["vocab_size"]
        self.is_training = True

    def get_config(self) -> LlavaConfig:
        config = LlavaConfig(
            text_config=self.text_config,
            vision_config=self.vision_config,
            image_token_index=IMAGE_TOKEN_ID,
            vision_feature_layer=-1,
            image_seq_length=self.num_image_tokens,
        )
        if self.config_class is LlavaConfig:
            return config
        return AdscLlavaConfig.from_llava_config(config, **self.schedule)

    def prepare_config_and_inputs_for_common(self) -> tuple[LlavaConfig, dict]:
        config = self.get_config()
        vision = self.vision_config
        pixel_values = floats_tensor(
            [self.batch_size, vision["num_channels"], vision["image_size"], vision["image_size"]]
        )
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 2) + 2
        input_ids[:, : self.num_image_tokens] = IMAGE_TOKEN_ID
        return config, {
            "pixel_values": pixel_values,
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
        }


def skipping(reasons: dict[str, str]):
    """A class decorator that replaces each named test by a skip with its one-line reason."""

    def decorate(test_class):
        for name, reason in reasons.items():
            setattr(test_class, name, unittest.skip(reason)(lambda self: None))
        return test_class

    return decorate


@skipping(SKIPPED_FOR_ALL)
class StockLlavaCommonTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (LlavaModel, LlavaForConditionalGeneration)
    _is_composite = True
    config_class, schedule = LlavaConfig, {}

    def setUp(self):
        self.model_tester = TinyLlavaTester(self, self.config_class, self.schedule)


@skipping(SKIPPED_FOR_ALL)
class AdscEmptyScheduleCommonTest(StockLlavaCommonTest):
    all_model_classes = (AdscLlavaModel, AdscLlavaForConditionalGeneration)
    config_class, schedule = AdscLlavaConfig, {}

    # The ADSC checkpoints' copyright line is not LLaVA's 2023 one, which the mixin reads as the model's age.
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        super().setUp()
        # transformers' tests look classes up in its own tables (is this a base model? does an image-text-to-text
        # head get labels?). For each test the ADSC classes stand where stock LLaVA's do, then the tables are restored.
        for table, entry in (
            (MODEL_MAPPING_NAMES, {AdscLlavaConfig.model_type: AdscLlavaModel.__name__}),
            (
                MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
                {AdscLlavaConfig.model_type: "AdscLlavaForConditionalGeneration"},
            ),
            (MODEL_MAPPING._extra_content, {AdscLlavaConfig: AdscLlavaModel}),
        ):
            patcher = patch.dict(table, entry)
            patcher.start()
            self.addCleanup(patcher.stop)


@skipping({**SKIPPED_FOR_ALL, **SKIPPED_WHEN_PRUNING})
class AdscPruningCommonTest(AdscEmptyScheduleCommonTest):
    all_model_classes = (AdscLlavaModel, AdscLlavaForConditionalGeneration)
    config_class, schedule = AdscLlavaConfig, PRUNING
