"""Tiny random LLaVA models and inputs for the tests: built offline from configs, fast on a CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from adsc_llava import AdscLlavaConfig, AdscLlavaForConditionalGeneration
from adsc_llava.testing import (
    PROMPT_WORDS,
    SPECIAL_TOKENS,
    build_tiny_processor,
    tiny_llava_config,
    tiny_llava_config_for,
)

# The test models are tiny: a second thread costs more in synchronisation than it saves, and on a shared 2-core
# machine it makes every step wait for a preempted thread.
torch.set_num_threads(1)

VOCAB_SIZE = 64
BOS_ID, EOS_ID = 1, 2
IMAGE_TOKEN_ID = 60
PAD_TOKEN_ID = 61
IMAGE_SIZE, PATCH_SIZE = 32, 8
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 16: strategy "default" drops CLS
TEXT_TOKEN_IDS = range(3, IMAGE_TOKEN_ID)  # ordinary words


def tiny_config(
    pruning_layers: list[int] | None = None,
    drop_ratio: float = 0.0,
    num_layers: int = 4,
    attn_implementation: str = "sdpa",
    text_model_type: str = "llama",
) -> AdscLlavaConfig:
    """A tiny ADSC config: CLIP 2 x 32 on 32 px images (16 vision tokens), Llama-style LM 4 x 64 with GQA."""
    llava_config = tiny_llava_config(
        VOCAB_SIZE,
        IMAGE_TOKEN_ID,
        PAD_TOKEN_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        text_layers=num_layers,
        text_kv_heads=2,
        max_position_embeddings=1024,
    )
    config_dict = AdscLlavaConfig.from_llava_config(
        llava_config, pruning_layers=pruning_layers or [], drop_ratio=drop_ratio
    ).to_dict()
    config_dict["text_config"]["model_type"] = text_model_type
    config = AdscLlavaConfig(**{key: value for key, value in config_dict.items() if key != "model_type"})
    config._attn_implementation = attn_implementation
    return config


def tiny_adsc_model(seed: int = 0, **config_kwargs) -> AdscLlavaForConditionalGeneration:
    torch.manual_seed(seed)
    return AdscLlavaForConditionalGeneration(tiny_config(**config_kwargs)).eval()


def stock_twin(model: AdscLlavaForConditionalGeneration) -> LlavaForConditionalGeneration:
    """A stock LLaVA with the same config (minus the schedule) and the same weights."""
    stock_config = model.config.to_llava_config()
    stock_config._attn_implementation = model.config._attn_implementation
    stock = LlavaForConditionalGeneration(stock_config).eval()
    stock.load_state_dict(model.state_dict())
    return stock


def make_batch(
    images_per_row: list[int],
    text_lengths: list[int] | None = None,
    padding_side: str = "left",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A padded batch: row i has `images_per_row[i]` images placed between random words.

    Returns `input_ids`, `attention_mask` and, if any image, `pixel_values` `(num_images, 3, H, W)`.
    """
    generator = torch.Generator().manual_seed(seed)
    text_lengths = text_lengths or [5 + 2 * i for i in range(len(images_per_row))]

    def words(count: int) -> list[int]:
        return torch.randint(TEXT_TOKEN_IDS.start, TEXT_TOKEN_IDS.stop, (count,), generator=generator).tolist()

    rows = []
    for num_images, text_length in zip(images_per_row, text_lengths, strict=False):
        row = [BOS_ID] + words(2)
        for _ in range(num_images):
            row += [IMAGE_TOKEN_ID] * TOKENS_PER_IMAGE + words(1)
        rows.append(row + words(text_length))
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), PAD_TOKEN_ID)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row)
        attention_mask[i, span] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if sum(images_per_row):
        batch["pixel_values"] = torch.randn(sum(images_per_row), 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return batch


def save_word_answering_checkpoint(folder: Path, new_tokens: int) -> Path:
    """A tiny pruned ADSC checkpoint (with its processor) whose greedy answers are `new_tokens` plain words."""
    processor = build_tiny_processor()
    config = AdscLlavaConfig.from_llava_config(tiny_llava_config_for(processor), pruning_layers=[1, 2], drop_ratio=0.5)
    torch.manual_seed(0)
    model = AdscLlavaForConditionalGeneration(config).eval()
    answer_in_words(model, processor.tokenizer, new_tokens)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def answer_in_words(model, tokenizer, new_tokens: int) -> None:
    """Make `model`'s greedy answers exactly `new_tokens` plain words (special tokens and prompt words suppressed)."""
    generation = model.generation_config
    generation.do_sample = False
    generation.max_new_tokens = generation.min_new_tokens = new_tokens
    generation.suppress_tokens = tokenizer.convert_tokens_to_ids([*SPECIAL_TOKENS, *PROMPT_WORDS])


def run_fresh_process(script: str, workdir: Path, request: dict, timeout_s: float = 180) -> dict:
    """Run `script` in a new isolated interpreter (`python -I`, fresh HF cache, offline) and return its report.

    The child reads `workdir/request.json` and writes `workdir/report.json`; hiding the project from its imports is the
    script's own job (each test checks that it really cannot import it).
    """
    (workdir / "request.json").write_text(json.dumps(request))
    (workdir / "child.py").write_text(script)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(workdir / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    completed = subprocess.run(
        [sys.executable, "-I", str(workdir / "child.py"), str(workdir)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if completed.returncode != 0:
        pytest.fail(f"The fresh process failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    return json.loads((workdir / "report.json").read_text())


# The vLLM plugin's suite runs in its own environment as a background job (tests/test_vllm_plugin.py): started when
# collection ends, collected by its test, which runs last. Under pytest-xdist every worker collects every test, so
# there the test starts the job itself.
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name == "test_vllm_plugin.py")


def pytest_collection_finish(session: pytest.Session) -> None:
    if "PYTEST_XDIST_WORKER" in os.environ or session.config.option.collectonly:
        return
    if any(item.path.name == "test_vllm_plugin.py" for item in session.items):
        from test_vllm_plugin import PLUGIN_SUITE

        PLUGIN_SUITE.start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    if "test_vllm_plugin" in sys.modules:
        sys.modules["test_vllm_plugin"].PLUGIN_SUITE.stop()
