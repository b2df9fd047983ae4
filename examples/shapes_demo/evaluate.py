"""How the demo scores a model: exact-match accuracy on the held-out questions, cost ratios, a new image."""

import json
import random
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch

from adsc_llava import AdscLlavaConfig, AdscLlavaForConditionalGeneration
from adsc_llava.cost import format_schedule, stock_and_adsc_costs
from adsc_llava.shapes_demo import synthetic
from adsc_llava.shapes_demo.recipe import QUESTION_TYPES, DemoRecipe

# The categories a table reports, in order.
CATEGORIES = tuple(synthetic.QUESTION_CATEGORIES)


@dataclass
class Result:
    """One row of a demo table on one seed's test split."""

    method: str
    budget: float | None
    curriculum: str | None
    seed: int
    accuracy: float
    accuracy_by_category: dict[str, float]  # {"cell": 0.95, "counting": 0.71, "existence": ..., "relation": ...}
    accuracy_by_type: dict[str, float]  # per question type of the generator, e.g. {"color_at": 0.95, ...}
    num_questions: int
    vision_tokens: float
    flops_ratio: float
    kv_ratio: float
    pruning_layers: list[int]
    model_dir: str | None = None


@torch.no_grad()
def hits_by_type(
    model: AdscLlavaForConditionalGeneration, processor, test_json: Path, batch_size: int = 50
) -> dict[str, list[bool]]:
    """Exact match of the greedy one-word answer to each test question (prompts built with the chat template),
    grouped by question type."""
    records = json.loads(test_json.read_text())
    processor.tokenizer.padding_side = "left"
    model.eval()
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        turns = [record["conversations"][0]["value"] for record in batch]
        questions = [turn.replace(synthetic.IMAGE_TOKEN, "").strip() for turn in turns]
        prompts = [prompt_for(processor, question) for question in questions]
        images = [synthetic_image(test_json.parent / record["image"]) for record in batch]
        inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
        generated = model.generate(**inputs, max_new_tokens=1, do_sample=False)[:, -1]
        answers = processor.tokenizer.batch_decode(generated[:, None], skip_special_tokens=True)
        for question, answer, record in zip(questions, answers, batch, strict=True):
            hit = answer.strip() == record["conversations"][1]["value"]
            hits.setdefault(synthetic.question_type_of(question), []).append(hit)
    return hits


def _share(hits: list[bool]) -> float:
    return sum(hits) / len(hits)


def prompt_for(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def synthetic_image(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def cost_ratios(config: AdscLlavaConfig, prompt_tokens: int) -> tuple[float, float]:
    """(FLOPs, KV cache) of the model's schedule relative to no pruning, for one question and a one-word answer."""
    stock, adsc = stock_and_adsc_costs(config, prompt_tokens=prompt_tokens, new_tokens=2)
    return adsc.total_flops / stock.total_flops, adsc.kv_cache_bytes / stock.kv_cache_bytes


def evaluate_row(
    method: str,
    model: AdscLlavaForConditionalGeneration,
    processor,
    test_json: Path,
    budget: float | None,
    seed: int,
    curriculum: str | None = None,
    model_dir: Path | None = None,
) -> Result:
    config = model.config
    prompt_tokens = len(
        processor.tokenizer(prompt_for(processor, "what color is the shape at the top left ?")).input_ids
    )
    flops_ratio, kv_ratio = cost_ratios(config, prompt_tokens)
    hits = hits_by_type(model, processor, test_json)
    by_category: dict[str, list[bool]] = {}
    for question_type, type_hits in hits.items():
        by_category.setdefault(synthetic.category_of(question_type), []).extend(type_hits)
    all_hits = [hit for type_hits in hits.values() for hit in type_hits]
    result = Result(
        method=method,
        budget=budget,
        curriculum=curriculum,
        seed=seed,
        accuracy=_share(all_hits),
        accuracy_by_category={
            category: _share(by_category[category]) for category in CATEGORIES if category in by_category
        },
        accuracy_by_type={question_type: _share(hits[question_type]) for question_type in sorted(hits)},
        num_questions=len(all_hits),
        vision_tokens=config.average_vision_tokens(),
        flops_ratio=flops_ratio,
        kv_ratio=kv_ratio,
        pruning_layers=list(config.adsc_pruning_layers),
        model_dir=str(model_dir) if model_dir else None,
    )
    print(
        f"  seed {seed}  {method:<26} budget {budget if budget is not None else config.image_seq_length:>6.1f}  "
        f"accuracy {result.accuracy:.1%} ("
        + ", ".join(f"{category} {value:.1%}" for category, value in result.accuracy_by_category.items())
        + f")  FLOPs {flops_ratio:.1%}  KV {kv_ratio:.1%}  "
        f"tokens/layer {format_schedule(config.vision_tokens_per_layer())}",
        flush=True,
    )
    return result


PIPELINE_CHECK = textwrap.dedent(
    """
    import json, sys
    from transformers import pipeline
    model_dir, image_path, question = sys.argv[1:4]
    answerer = pipeline("image-text-to-text", model=model_dir, trust_remote_code=True)
    content = [{"type": "image", "path": image_path}, {"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    output = answerer(text=messages, max_new_tokens=1, return_full_text=False, generate_kwargs={"do_sample": False})
    print(json.dumps(output[0]["generated_text"]))
    """
)


def answer_new_image(model_dir: Path, output_dir: Path, recipe: DemoRecipe) -> tuple[str, str, str, bool]:
    """Draw a new scene, ask about it through `pipeline(..., trust_remote_code=True)` in a fresh process."""
    rng = random.Random(f"demo-new-image-{recipe.seed}")
    scene, (spec,) = synthetic.sample_example(
        rng,
        recipe.image_size,
        min_shapes=recipe.min_shapes,
        max_shapes=recipe.max_shapes,
        question_types=QUESTION_TYPES,
    )
    image_path = output_dir / "new_image.png"
    synthetic.draw_scene(scene).save(image_path)
    completed = subprocess.run(
        [sys.executable, "-c", PIPELINE_CHECK, str(model_dir), str(image_path), spec.text],
        capture_output=True,
        text=True,
        check=True,
        cwd=output_dir,
    )
    answer = json.loads(completed.stdout.strip().splitlines()[-1]).strip()
    expected = synthetic.answer(scene, spec)
    return str(image_path), spec.text, answer, answer == expected
