"""Tiny checkpoints and their HF greedy answers, for the vLLM tests to compare against.

Runs in the *project's* environment (transformers 5.24, `adsc_llava`), which the vLLM environment cannot hold:
    python vllm_adsc/tests/hf_reference.py OUT_DIR

Writes OUT_DIR/{adsc,adsc-empty,stock}/ (the same random weights: ADSC with a schedule, ADSC with the schedule
emptied, stock LLaVA), OUT_DIR/images/*.png and OUT_DIR/reference.json: for every checkpoint and prompt, the prompt
token ids and `generate`'s greedy token ids (fp32, one prompt at a time).
"""

import json
import random
import re
import shutil
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import LlavaConfig, LlavaForConditionalGeneration

from adsc_llava import AdscLlavaConfig, AdscLlavaForConditionalGeneration, shipped_file
from adsc_llava.cost import CONFIGS_DIR
from adsc_llava.testing import build_tiny_processor, tiny_llava_config_for

IMAGE_SIZE, PATCH_SIZE = 48, 8  # 36 vision tokens per image
PRUNING_LAYERS, DROP_RATIO = [1, 3], 0.5  # 36 -> 18 -> 9 tokens per image
NEW_TOKENS = 8
# (images, question): images of different sizes, text-only prompts, two images, questions of different lengths.
PROMPTS = [
    ([(40, 40)], "what color is the shape ?"),
    ([], "describe the picture ."),
    ([(64, 48), (30, 50)], "how many shapes are there in the image and what color is it ?"),
    ([(48, 48)], "is there a red square on a white background ? describe it ."),
    ([], "what is in the image ? is it a circle or a square ? how many are there ?"),
    ([(90, 60)], "describe it"),
]


def chat_prompt(processor, num_images: int, question: str) -> str:
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def random_image(size: tuple[int, int], rng: random.Random) -> Image.Image:
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(6):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        image.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, min(x + 12, size[0]), min(y + 12, size[1])))
    return image


def save_checkpoints(out: Path, processor) -> dict[str, Path]:
    torch.manual_seed(0)
    config = AdscLlavaConfig.from_llava_config(
        # Heads of 32 (the smallest vLLM CPU attention runs); weights of std 0.1 give answers that vary by prompt.
        tiny_llava_config_for(
            processor, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, text_heads=2, text_initializer_range=0.1
        ),
        pruning_layers=PRUNING_LAYERS,
        drop_ratio=DROP_RATIO,
    )
    model = AdscLlavaForConditionalGeneration(config).eval()
    folders = {name: out / name for name in ("adsc", "adsc-empty", "stock")}
    model.save_pretrained(folders["adsc"])
    model.config.update({"adsc_pruning_layers": [], "adsc_drop_ratio": 0.0})
    model.save_pretrained(folders["adsc-empty"])
    stock = LlavaForConditionalGeneration(config.to_stock_config())
    stock.load_state_dict(model.state_dict())
    stock.save_pretrained(folders["stock"])
    for folder in folders.values():
        processor.save_pretrained(folder)
    hub_layout(folders["stock"] / "model.safetensors")
    return folders


def hub_layout(weights: Path) -> None:
    """Rename the CLIP tower's weights as llava-hf's hub checkpoints name them (`vision_tower.vision_model.*`):
    stock vLLM 0.32 loads only that layout; transformers loads both."""
    tensors = load_file(weights)
    renamed = {
        re.sub(r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model.", k): v for k, v in tensors.items()
    }
    save_file(renamed, weights, metadata={"format": "pt"})


@torch.no_grad()
def main(out: Path) -> None:
    processor = build_tiny_processor(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    folders = save_checkpoints(out, processor)
    rng = random.Random(0)
    (out / "images").mkdir(parents=True, exist_ok=True)
    prompts = []
    for index, (sizes, question) in enumerate(PROMPTS):
        paths = []
        for image_index, size in enumerate(sizes):
            path = out / "images" / f"{index}-{image_index}.png"
            random_image(size, rng).save(path)
            paths.append(str(path))
        prompts.append({"prompt": chat_prompt(processor, len(sizes), question), "images": paths})
    reference = {"new_tokens": NEW_TOKENS, "prompts": prompts, "checkpoints": {}}
    for name, folder in folders.items():
        model_class = LlavaForConditionalGeneration if name == "stock" else AdscLlavaForConditionalGeneration
        model = model_class.from_pretrained(folder, dtype=torch.float32).eval()
        answers = []
        for prompt in prompts:
            images = [Image.open(path).convert("RGB") for path in prompt["images"]] or None
            inputs = processor(images=images, text=prompt["prompt"], return_tensors="pt")
            generated = model.generate(
                **inputs,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
            prompt_ids = inputs["input_ids"][0].tolist()
            output_ids = generated.sequences[0, len(prompt_ids) :].tolist()
            # The model's own log-probabilities (before generation's processors), as vLLM reports them.
            logprobs = [torch.log_softmax(step[0].double(), -1) for step in generated.logits]
            answers.append(
                {
                    "prompt_ids": prompt_ids,
                    "output_ids": output_ids,
                    "text": processor.tokenizer.decode(output_ids, skip_special_tokens=True),
                    "tokens": processor.tokenizer.convert_ids_to_tokens(output_ids),
                    "top_logprobs": [
                        {int(i): float(v) for v, i in zip(*step.topk(5), strict=True)} for step in logprobs
                    ],
                    "chosen_logprobs": [float(step[token]) for step, token in zip(logprobs, output_ids, strict=True)],
                }
            )
        reference["checkpoints"][name] = {"path": str(folder), "answers": answers}
    reference["llava_7b"] = save_7b_config(out / "llava-1.5-7b-adsc")
    (out / "reference.json").write_text(json.dumps(reference, indent=1))


def save_7b_config(folder: Path) -> dict:
    """An ADSC config of LLaVA-1.5-7B's shape at budget 192 (no weights), and the vision tokens of one image that
    each of its layers sees, per the HF model's schedule."""
    config = AdscLlavaConfig.from_llava_config(
        LlavaConfig.from_json_file(CONFIGS_DIR / "llava-1.5-7b.json"), budget=192
    )
    config.save_pretrained(folder)
    shutil.copy(shipped_file("configuration_adsc_llava.py"), folder)
    return {"path": str(folder), "vision_tokens_per_layer": config.vision_tokens_per_layer()}


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
