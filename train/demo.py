"""`python -m train.demo`: the paper's experiment in miniature, end to end on a CPU, with nothing downloaded.

1. A synthetic visual question answering set (coloured shapes on a grid, `train.synthetic`) in LLaVA-665K format.
2. A tiny LLaVA (CLIP tower + Llama, offline word-level tokenizer) trained from scratch on full tokens with
   `python -m train --tune full`: the stand-in for pretrained LLaVA-1.5. Cached, so reruns skip it.
3. Table I in miniature: at budgets of about 1/3, 2/9 and 1/9 of the vision tokens, the full model, training-free
   ADSC (same schedule, no fine-tuning) and ADSC + LoRA with the reverse curriculum (`python -m train`), with the
   FLOPs and KV-cache ratios of the cost model.
4. Table III in miniature at the middle budget: direct vs standard vs reverse curriculum, same steps.
5. The best ADSC model, saved as a remote-code checkpoint, answers a question about a newly drawn image through
   `pipeline("image-text-to-text", trust_remote_code=True)` in a fresh process.
6. Markdown tables and a PNG plot (accuracy vs vision tokens per method) in the output folder.

Everything here calls the project's public pieces; nothing re-implements them.
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from adsc_llava import AdscLlavaConfig, AdscLlavaForConditionalGeneration
from adsc_llava.configuration_adsc_llava import default_pruning_layers
from train import synthetic
from train.args import AdscTrainConfig
from train.cost import format_schedule, schedule_for_budget, stock_and_adsc_costs
from train.tiny import (
    build_processor,
    build_word_tokenizer,
    init_patch_position_embeddings,
    tiny_llava_config_for,
)
from train.trainer import run_training

# Questions the demo asks: what is at a place, and what is where.
QUESTION_TYPES = ("color_at", "shape_at")
BUDGET_FRACTIONS = (1 / 3, 2 / 9, 1 / 9)  # the paper's 192, 128 and 64 of 576


@dataclass(frozen=True)
class DemoRecipe:
    """Sizes and hyper-parameters of one demo run (the full run and `--quick` differ only here)."""

    num_train_images: int
    num_test_images: int
    questions_per_image: int
    base_steps: int
    base_learning_rate: float
    lora_steps: int
    lora_learning_rate: float
    projector_learning_rate: float
    batch_size: int = 16
    base_batch_size: int = 32
    lora_rank: int = 32
    image_size: int = 48
    patch_size: int = 4  # 48 / 4 = 12 x 12 = 144 vision tokens per image
    text_hidden: int = 64
    text_layers: int = 12  # the reverse curriculum's 0.8 x (1/9) budget needs the first pruning layer at 1/12
    text_heads: int = 4
    # From scratch, the LM must learn to match the cell named in the question with the position of vision tokens
    # up to ~200 positions back. With Llama's RoPE base 10,000 most channels of a 16-wide head rotate too fast over
    # that span for such content matching; a base of 1e6 (as in recent Llama/Qwen models) leaves it more of them.
    rope_theta: float = 1e6
    # The CLIP tower starts with 2-D sin-cos patch position embeddings (a pretrained CLIP already knows its grid).
    position_init_scale: float = 0.3
    # Llama's init std of 0.02 suits 4096-wide layers; at width 64 it leaves the attention logits near zero (uniform
    # attention) for hundreds of steps. 0.1 (about 1 / sqrt(64)) learns where things are sooner.
    text_initializer_range: float = 0.1
    vision_hidden: int = 64
    vision_layers: int = 2
    # The projector reads the tower's last layer: a shallow from-scratch tower has no layer to spare (LLaVA-1.5
    # reads the second-to-last of CLIP-L's 24).
    vision_feature_layer: int = -1
    # Scenes hold 2-4 shapes (train and test alike): with always 2, "attend to both coloured shapes" already answers
    # half the questions, and that shortcut held up learning *where* things are (measured in the README).
    min_shapes: int = 2
    max_shapes: int = 4
    # The base model's batches are big enough for a second thread to pay (1.3x here, data loading included); the
    # LoRA runs' are not.
    base_threads: int = 2
    seed: int = 0


FULL = DemoRecipe(
    num_train_images=40000,
    num_test_images=400,
    questions_per_image=4,
    base_steps=1800,
    base_learning_rate=1e-3,
    lora_steps=120,
    lora_learning_rate=1e-3,
    projector_learning_rate=3e-4,
)
QUICK = replace(
    FULL,
    num_train_images=64,
    num_test_images=32,
    questions_per_image=4,
    base_steps=6,
    lora_steps=3,
    batch_size=8,
    base_batch_size=8,
)


@dataclass
class Result:
    method: str
    budget: float | None
    curriculum: str | None
    accuracy: float
    accuracy_by_type: dict[str, float]  # per question type, e.g. {"color_at": 0.95, "shape_at": 0.88}
    vision_tokens: float
    flops_ratio: float
    kv_ratio: float
    model_dir: str | None = None


def recipe_key(recipe: DemoRecipe) -> str:
    """A short hash naming the cached data and base model of a recipe (rerunning the same recipe reuses them).

    The data generator's settings are part of it, so changing how scenes are drawn never reuses stale data.
    """
    identity = {"recipe": asdict(recipe), "generator": synthetic.generator_settings()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def make_data(folder: Path, recipe: DemoRecipe, show_progress: bool) -> tuple[Path, Path]:
    """Training and held-out test splits in LLaVA-665K JSON (test: one question per image)."""
    if not (folder / "test.json").exists():
        common = dict(
            image_size=recipe.image_size,
            min_shapes=recipe.min_shapes,
            max_shapes=recipe.max_shapes,
            question_types=QUESTION_TYPES,
            progress=show_progress,
        )
        synthetic.write_split(
            folder,
            "train",
            recipe.num_train_images,
            recipe.seed,
            questions_per_image=recipe.questions_per_image,
            **common,
        )
        synthetic.write_split(
            folder,
            "test",
            recipe.num_test_images,
            recipe.seed,
            questions_per_image=1,
            **common,
        )
    return folder / "train.json", folder / "test.json"


def build_base_checkpoint(folder: Path, recipe: DemoRecipe) -> Path:
    """A randomly initialised stock LLaVA + processor: the starting point of from-scratch training."""
    processor = build_processor(
        build_word_tokenizer(synthetic.vocabulary()), image_size=recipe.image_size, patch_size=recipe.patch_size
    )
    config = tiny_llava_config_for(
        processor,
        image_size=recipe.image_size,
        patch_size=recipe.patch_size,
        text_hidden=recipe.text_hidden,
        text_layers=recipe.text_layers,
        text_heads=recipe.text_heads,
        text_intermediate=2 * recipe.text_hidden,
        vision_hidden=recipe.vision_hidden,
        vision_layers=recipe.vision_layers,
        vision_heads=max(2, recipe.vision_hidden // 32),
        vision_feature_layer=recipe.vision_feature_layer,
        rope_theta=recipe.rope_theta,
        text_initializer_range=recipe.text_initializer_range,
    )
    torch.manual_seed(recipe.seed)
    model = LlavaForConditionalGeneration(config)
    init_patch_position_embeddings(model, recipe.position_init_scale)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def train_config(recipe: DemoRecipe, **overrides) -> AdscTrainConfig:
    """`python -m train` options shared by every run of the demo."""
    options = dict(
        per_device_train_batch_size=recipe.batch_size,
        gradient_checkpointing=False,  # tiny activations: recomputation would only cost time
        save_steps=10**9,  # no intermediate checkpoints: each run takes a minute or two
        logging_steps=max(recipe.base_steps // 10, 1),
        seed=recipe.seed,
        max_length=512,
        disable_tqdm=False,
        dataloader_num_workers=1,  # decode images in a second process while the model computes
    )
    options.update(overrides)
    return AdscTrainConfig(**options)


def train_base_model(cache: Path, recipe: DemoRecipe, train_json: Path) -> Path:
    """From-scratch training on full tokens with `--tune full`, cached under the recipe's key.

    The loss covers every text token, questions included (`--assistant-only-loss false`), as an LLM's pretraining
    does: predicting "what color is the shape at the ..." means finding the shapes in the image, which teaches the
    tiny model where things are far sooner than one supervised answer word per question.
    """
    final = cache / "base" / "final"
    if (final / "config.json").exists():
        print(f"Base model: reusing {final}", flush=True)
        return final
    init = build_base_checkpoint(cache / "base-init", recipe)
    config = train_config(
        recipe,
        model=str(init),
        data=str(train_json),
        output_dir=str(cache / "base"),
        tune="full",
        assistant_only_loss=False,
        per_device_train_batch_size=recipe.base_batch_size,
        max_steps=recipe.base_steps,
        learning_rate=recipe.base_learning_rate,
        weight_decay=0.01,
        warmup_ratio=0.05,
        dataloader_num_workers=0,  # both cores compute; a loader process would compete with them
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(min(recipe.base_threads, os.cpu_count() or 1))
    try:
        return run_training(config)
    finally:
        torch.set_num_threads(threads)


def with_budget(model: AdscLlavaForConditionalGeneration, budget: float | None) -> AdscLlavaForConditionalGeneration:
    """Set the model's schedule for `budget` average vision tokens (None: no pruning)."""
    config = model.config
    if budget is None:
        config.adsc_pruning_layers, config.adsc_drop_ratio = [], 0.0
    else:
        config.adsc_pruning_layers = default_pruning_layers(config.text_config.num_hidden_layers)
        config.adsc_drop_ratio, _ = schedule_for_budget(config, budget, config.adsc_pruning_layers)
    return model


@torch.no_grad()
def accuracy(
    model: AdscLlavaForConditionalGeneration, processor, test_json: Path, batch_size: int = 50
) -> tuple[float, dict[str, float]]:
    """Exact match of the greedy one-word answer on the test split (prompts built with the chat template).

    Returns the accuracy over all questions and per question type.
    """
    records = json.loads(test_json.read_text())
    processor.tokenizer.padding_side = "left"
    model.eval()
    hits_by_type: dict[str, list[bool]] = {}
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
            hits_by_type.setdefault(synthetic.question_type_of(question), []).append(hit)
    all_hits = [hit for hits in hits_by_type.values() for hit in hits]
    return sum(all_hits) / len(all_hits), {kind: sum(hits) / len(hits) for kind, hits in sorted(hits_by_type.items())}


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
    curriculum: str | None = None,
    model_dir: Path | None = None,
) -> Result:
    config = model.config
    prompt_tokens = len(
        processor.tokenizer(prompt_for(processor, "what color is the shape at the top left ?")).input_ids
    )
    flops_ratio, kv_ratio = cost_ratios(config, prompt_tokens)
    overall, by_type = accuracy(model, processor, test_json)
    result = Result(
        method=method,
        budget=budget,
        curriculum=curriculum,
        accuracy=overall,
        accuracy_by_type=by_type,
        vision_tokens=config.average_vision_tokens(),
        flops_ratio=flops_ratio,
        kv_ratio=kv_ratio,
        model_dir=str(model_dir) if model_dir else None,
    )
    print(
        f"  {method:<26} budget {budget if budget is not None else config.image_seq_length:>6.1f}  "
        f"accuracy {result.accuracy:.1%} ("
        + ", ".join(f"{kind} {value:.1%}" for kind, value in by_type.items())
        + f")  FLOPs {flops_ratio:.1%}  KV {kv_ratio:.1%}  "
        f"tokens/layer {format_schedule(config.vision_tokens_per_layer())}",
        flush=True,
    )
    return result


def fine_tune(base: Path, train_json: Path, out: Path, recipe: DemoRecipe, budget: float, curriculum: str) -> Path:
    """ADSC + LoRA at `budget` with `curriculum` through `python -m train`'s `run_training`.

    Always trained afresh (about 100 s for all five): a model left in `out` by an earlier run may come from another
    base.
    """
    if out.exists():
        shutil.rmtree(out)  # an undeletable folder fails here, not later as a half-stale run
    return run_training(
        train_config(
            recipe,
            model=str(base),
            data=str(train_json),
            output_dir=str(out),
            budget=budget,
            curriculum=curriculum,
            max_steps=recipe.lora_steps,
            learning_rate=recipe.lora_learning_rate,
            projector_learning_rate=recipe.projector_learning_rate,
            lora_r=recipe.lora_rank,
            lora_alpha=2 * recipe.lora_rank,
            lora_dropout=0.0,
            scan_data=False,  # the base model's run already checked every record
            logging_steps=max(recipe.lora_steps // 6, 1),
        )
    )


def load(path: Path) -> AdscLlavaForConditionalGeneration:
    return AdscLlavaForConditionalGeneration.from_pretrained(path)


def run_experiment(output_dir: Path, cache_dir: Path, recipe: DemoRecipe) -> tuple[list[Result], list[Result]]:
    """Tables I and III in miniature; every trained model stays in `output_dir`."""
    key = recipe_key(recipe)
    cache = cache_dir / key
    train_json, test_json = make_data(cache / "data", recipe, show_progress=True)
    base_dir = train_base_model(cache, recipe, train_json)
    processor = AutoProcessor.from_pretrained(base_dir, trust_remote_code=True)
    num_tokens = AdscLlavaConfig.from_pretrained(base_dir).image_seq_length
    budgets = [round(fraction * num_tokens, 1) for fraction in BUDGET_FRACTIONS]

    print("\nTable I in miniature (test split accuracy)", flush=True)
    base = load(base_dir)
    full = evaluate_row("full model", with_budget(base, None), processor, test_json, None, model_dir=base_dir)
    table_one = [full]
    for budget in budgets:
        table_one.append(evaluate_row("ADSC, training-free", with_budget(base, budget), processor, test_json, budget))
        tuned_dir = fine_tune(base_dir, train_json, output_dir / f"adsc-{budget:g}-reverse", recipe, budget, "reverse")
        table_one.append(
            evaluate_row("ADSC + LoRA (reverse)", load(tuned_dir), processor, test_json, budget, "reverse", tuned_dir)
        )

    middle = budgets[1]
    print(f"\nTable III in miniature (budget {middle:g})", flush=True)
    table_three = [row for row in table_one if row.budget == middle and row.curriculum == "reverse"]
    for curriculum in ("direct", "standard"):
        tuned_dir = fine_tune(
            base_dir, train_json, output_dir / f"adsc-{middle:g}-{curriculum}", recipe, middle, curriculum
        )
        table_three.insert(
            0, evaluate_row(f"ADSC + LoRA ({curriculum})", load(tuned_dir), processor, test_json, middle, curriculum)
        )
    return [full, *table_one[1:]], table_three


def markdown_tables(table_one: list[Result], table_three: list[Result]) -> str:
    full_accuracy = table_one[0].accuracy
    kinds = list(table_one[0].accuracy_by_type)
    lines = [
        "Table I in miniature: accuracy on the held-out test split",
        "",
        "| method | budget (avg vision tokens/layer) | accuracy | vs full | "
        + "".join(f"{kind} | " for kind in kinds)
        + "FLOPs | KV cache |",
        "|---|---|---|---|" + "---|" * len(kinds) + "---|---|",
    ]
    for row in table_one:
        lines.append(
            f"| {row.method} | {row.vision_tokens:.1f} | {row.accuracy:.1%} | "
            f"{row.accuracy / max(full_accuracy, 1e-9):.1%} | "
            + "".join(f"{row.accuracy_by_type[kind]:.1%} | " for kind in kinds)
            + f"{row.flops_ratio:.1%} | {row.kv_ratio:.1%} |"
        )
    lines += [
        "",
        f"Table III in miniature: curricula at budget {table_three[0].budget:g}, same steps",
        "",
        "| curriculum | accuracy | vs full |",
        "|---|---|---|",
    ]
    for row in table_three:
        lines.append(f"| {row.curriculum} | {row.accuracy:.1%} | {row.accuracy / max(full_accuracy, 1e-9):.1%} |")
    return "\n".join(lines) + "\n"


def plot(table_one: list[Result], path: Path) -> Path | None:
    """Accuracy vs average vision tokens per method, like the paper's Figure 2."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[plot]'): no plot written", flush=True)
        return None
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.axhline(table_one[0].accuracy, linestyle="--", color="gray", label="full model (144 tokens)")
    for method, marker in (("ADSC, training-free", "s"), ("ADSC + LoRA (reverse)", "o")):
        rows = [row for row in table_one if row.method == method]
        axes.plot([r.vision_tokens for r in rows], [r.accuracy for r in rows], marker=marker, label=method)
    axes.set_xlabel("average vision tokens per LLM layer")
    axes.set_ylabel("test accuracy")
    axes.set_ylim(0, 1)
    axes.legend()
    axes.set_title("ADSC in miniature: accuracy vs vision-token budget")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


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
    scene = synthetic.sample_scene(rng, recipe.image_size, recipe.min_shapes, recipe.max_shapes)
    spec = synthetic.sample_question(rng, scene, QUESTION_TYPES[0])
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/demo"), help="Tables, plot and models.")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(".cache/adsc-demo"), help="Data and base model, reused by reruns."
    )
    parser.add_argument("--quick", action="store_true", help="A 2-minute smoke version (tiny data, few steps).")
    args = parser.parse_args(argv)
    # Absolute paths: the new-image check runs in a fresh process whose working directory is the output folder.
    args.output_dir, args.cache_dir = args.output_dir.resolve(), args.cache_dir.resolve()
    recipe = QUICK if args.quick else FULL
    torch.set_num_threads(1)  # tiny models: a second thread costs more than it brings (and CI shares the cores)
    started = time.time()
    args.output_dir.mkdir(parents=True, exist_ok=True)

    table_one, table_three = run_experiment(args.output_dir, args.cache_dir, recipe)
    tables = markdown_tables(table_one, table_three)
    (args.output_dir / "results.md").write_text(tables)
    (args.output_dir / "results.json").write_text(
        json.dumps({"table_one": [asdict(r) for r in table_one], "table_three": [asdict(r) for r in table_three]})
    )
    plot_path = plot(table_one, args.output_dir / "accuracy_vs_tokens.png")

    adsc_rows = [row for row in table_one if row.model_dir and row.budget is not None]
    best = max(adsc_rows, key=lambda row: (row.accuracy, -row.vision_tokens))
    image_path, question, answer, right = answer_new_image(Path(best.model_dir), args.output_dir, recipe)
    print("\n" + tables)
    print(f"Best ADSC model: {best.model_dir} (budget {best.budget:g}, accuracy {best.accuracy:.1%})")
    print(f"New image {image_path}: '{question}' -> '{answer}' ({'right' if right else 'wrong'})")
    print(f"Tables: {args.output_dir / 'results.md'}" + (f", plot: {plot_path}" if plot_path else ""))
    print(f"Total time: {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
