"""`adsc-llava demo`: the paper's experiment in miniature, end to end on a CPU, with nothing downloaded.

1. A synthetic visual question answering set (coloured shapes on a grid, `synthetic`) in LLaVA-665K format.
2. A tiny LLaVA (CLIP tower + Llama, offline word-level tokenizer) trained from scratch on full tokens with
   `adsc-llava train --tune full`: the stand-in for pretrained LLaVA-1.5. Cached, so reruns skip it.
3. Table I in miniature: at budgets of about 1/3, 2/9 and 1/9 of the vision tokens, the full model, training-free
   ADSC (same schedule, no fine-tuning) and ADSC + LoRA with the reverse curriculum (`adsc-llava train`), with the
   FLOPs and KV-cache ratios of the cost model.
4. Table III in miniature at the middle budget: direct vs standard vs reverse curriculum, same steps.
5. The best ADSC model, saved as a remote-code checkpoint, answers a question about a newly drawn image through
   `pipeline("image-text-to-text", trust_remote_code=True)` in a fresh process.
6. Markdown tables and a PNG plot (accuracy vs vision tokens per method) in the output folder.

Everything here calls the project's public pieces; nothing re-implements them.
"""

import argparse
import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from adsc_llava import AdscLlavaConfig, AdscLlavaForConditionalGeneration
from adsc_llava.cli import prog
from adsc_llava.configuration_adsc_llava import policy_pruning_layers, reachable_budget_range
from adsc_llava.shapes_demo import synthetic
from adsc_llava.shapes_demo.evaluate import Result, answer_new_image, evaluate_row
from adsc_llava.shapes_demo.recipe import BUDGET_FRACTIONS, FULL, QUESTION_TYPES, QUICK, DemoRecipe, recipe_key
from adsc_llava.shapes_demo.report import markdown_tables, plot
from adsc_llava.shapes_demo.threads import DropToOneThreadWhenBusy, choose_threads
from adsc_llava.testing import (
    build_processor,
    build_word_tokenizer,
    init_patch_position_embeddings,
    tiny_llava_config_for,
)
from adsc_llava.train.args import AdscTrainConfig
from adsc_llava.train.trainer import run_training

# The base model's batches are big enough for a second thread to pay on an idle machine; the LoRA runs' are not.
MAX_BASE_THREADS = 2
# Table I's training-free rows: each keep policy on the base model, at the same budgets.
TRAINING_FREE = {"uniform": "ADSC, training-free", "fastv": "FastV", "pyramiddrop": "PyramidDrop"}


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
    """`adsc-llava train` options shared by every run of the demo."""
    options = dict(
        per_device_train_batch_size=recipe.batch_size,
        gradient_checkpointing=False,  # tiny activations: recomputation would only cost time
        save_steps=10**9,  # no intermediate checkpoints: the runs are short and never resumed
        logging_steps=max(recipe.base_steps // 10, 1),
        seed=recipe.seed,
        max_length=512,
        disable_tqdm=False,
        dataloader_num_workers=1,  # decode images in a second process while the model computes
    )
    options.update(overrides)
    return AdscTrainConfig(**options)


def train_base_model(cache: Path, recipe: DemoRecipe, train_json: Path, threads: int | None = None) -> Path:
    """From-scratch training on full tokens with `--tune full`, cached under the recipe's key.

    `threads`: torch threads to train on; None chooses them from the CPU's load (`threads.choose_threads`) and drops
    to one if other processes start competing. What was used is written to `threads.json` in the model's folder.

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
        dataloader_num_workers=0,  # the cores compute; a loader process would compete with them
    )
    previous_threads = torch.get_num_threads()
    guard = DropToOneThreadWhenBusy() if threads is None else None
    threads = choose_threads(MAX_BASE_THREADS) if threads is None else threads
    chosen = " (chosen from the CPU's load)" if guard else ""
    print(f"Base model: training on {threads} thread(s){chosen}", flush=True)
    torch.set_num_threads(threads)
    try:
        final = run_training(config, callbacks=[guard] if guard else None)
    finally:
        torch.set_num_threads(previous_threads)
    record = {"threads": threads, "one_thread_from_step": guard.switched_at_step if guard else None}
    (final / "threads.json").write_text(json.dumps(record))
    return final


def fine_tune(base: Path, train_json: Path, out: Path, recipe: DemoRecipe, budget: float, curriculum: str) -> Path:
    """ADSC + LoRA at `budget` with `curriculum` through `adsc-llava train`'s `run_training`.

    Always trained afresh: a model left in `out` by an earlier run may come from another base.
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


def baseline_layers_for(policy: str, config: AdscLlavaConfig, budget: float, adsc_layers: list[int]) -> list[int]:
    """A policy's own pruning layers (`policy_pruning_layers`), or ADSC's where its own cannot reach `budget`.

    PyramidDrop's stages at 1/4, 1/2 and 3/4 of the depth keep the first quarter full, so budgets under a quarter of
    the tokens need earlier stages; on ADSC's layers the two rules differ only in which tokens they keep.
    """
    num_layers = config.text_config.num_hidden_layers
    own = policy_pruning_layers(policy, num_layers)
    lowest, _ = reachable_budget_range(num_layers, own, config.reference_vision_tokens)
    return own if budget >= lowest else adsc_layers


def load(path: Path) -> AdscLlavaForConditionalGeneration:
    return AdscLlavaForConditionalGeneration.from_pretrained(path)


def run_experiment(
    output_dir: Path, cache_dir: Path, recipe: DemoRecipe, base_threads: int | None = None
) -> tuple[list[Result], list[Result]]:
    """Tables I and III in miniature; every trained model stays in `output_dir`."""
    key = recipe_key(recipe)
    cache = cache_dir / key
    train_json, test_json = make_data(cache / "data", recipe, show_progress=True)
    base_dir = train_base_model(cache, recipe, train_json, base_threads)
    processor = AutoProcessor.from_pretrained(base_dir, trust_remote_code=True)
    num_tokens = AdscLlavaConfig.from_pretrained(base_dir).image_seq_length
    budgets = [round(fraction * num_tokens, 1) for fraction in BUDGET_FRACTIONS]

    print("\nTable I in miniature (test split accuracy)", flush=True)
    base = load(base_dir)
    full = evaluate_row("full model", base, processor, test_json, None, model_dir=base_dir)
    table_one = [full]
    adsc_layers = policy_pruning_layers("uniform", base.config.text_config.num_hidden_layers)
    for budget in budgets:
        for policy in TRAINING_FREE:
            layers = baseline_layers_for(policy, base.config, budget, adsc_layers)
            base.config.update(base.config.with_budget(budget, layers).schedule | {"adsc_keep_policy": policy})
            table_one.append(evaluate_row(TRAINING_FREE[policy], base, processor, test_json, budget))
        base.config.update({"adsc_keep_policy": "uniform"})
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog("demo"),
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog="examples:\n  adsc-llava demo                 # the full run\n  adsc-llava demo --quick         "
        "# the smoke version CI runs\n  adsc-llava demo --seed 1 --threads 1 --output-dir runs/seed1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output-dir", type=Path, default=Path("runs/demo"), help="Tables, plot and models.")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(".cache/adsc-demo"), help="Data and base model, reused by reruns."
    )
    parser.add_argument("--quick", action="store_true", help="A smoke version (tiny data, few steps).")
    parser.add_argument("--seed", type=int, default=None, help="Seed of data, initialisation and order (default 0).")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the base model's training (default: as many as the CPU's load leaves idle, at most 2, "
        "dropping to 1 if other processes start competing). Give it to reproduce a run exactly.",
    )
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}.")
    # Absolute paths: the new-image check runs in a fresh process whose working directory is the output folder.
    args.output_dir, args.cache_dir = args.output_dir.resolve(), args.cache_dir.resolve()
    recipe = QUICK if args.quick else FULL
    if args.seed is not None:
        recipe = replace(recipe, seed=args.seed)
    torch.set_num_threads(1)  # tiny models: a second thread costs more than it brings (and CI shares the cores)
    started = time.time()
    args.output_dir.mkdir(parents=True, exist_ok=True)

    table_one, table_three = run_experiment(args.output_dir, args.cache_dir, recipe, args.threads)
    tables = markdown_tables(table_one, table_three)
    (args.output_dir / "results.md").write_text(tables)
    threads_file = Path(table_one[0].model_dir) / "threads.json"
    base_threads = json.loads(threads_file.read_text()) if threads_file.is_file() else None
    (args.output_dir / "results.json").write_text(
        json.dumps(
            {
                "recipe": asdict(recipe),
                "base_threads": base_threads,
                "table_one": [asdict(r) for r in table_one],
                "table_three": [asdict(r) for r in table_three],
            }
        )
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
    return 0
