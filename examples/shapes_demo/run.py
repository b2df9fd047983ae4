"""`adsc-llava demo`: the paper's experiment in miniature, end to end on a CPU, with nothing downloaded.

1. A synthetic visual question answering set (coloured shapes on a grid, `synthetic`) in LLaVA-665K format, with
   questions about a named cell, counting, existence and relations between shapes.
2. A tiny LLaVA (CLIP tower + Llama, offline word-level tokenizer) trained from scratch on full tokens with
   `adsc-llava train --tune full`: the stand-in for pretrained LLaVA-1.5. Cached, so reruns skip it.
3. Table I in miniature: at budgets of about 1/3, 2/9 and 1/9 of the vision tokens, the full model, training-free
   ADSC (same schedule, no fine-tuning), FastV and PyramidDrop (keep policies of the same model) and ADSC + LoRA with
   the reverse curriculum (`adsc-llava train`), with the FLOPs and KV-cache ratios of the cost model, accuracy per
   question category.
4. Table III in miniature at the middle budget: direct vs standard vs reverse curriculum, same steps.
5. Both tables on several seeds (each its own test split and fine-tuning runs; by default on one base model, with
   `--base-per-seed` each seed trains its own): every cell a mean with its min-max, and which differences exceed it.
6. The best ADSC model, saved as a remote-code checkpoint, answers a question about a newly drawn image through
   `pipeline("image-text-to-text", trust_remote_code=True)` in a fresh process.
7. Markdown tables, a PNG plot (accuracy vs vision tokens per method, one panel per category) and where the time
   went (wall and CPU seconds per phase, the machine's load) in the output folder.

Everything here calls the project's public pieces; nothing re-implements them.
"""

import argparse
import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from adsc_llava import AdscLlavaConfig, AdscLlavaForConditionalGeneration
from adsc_llava.cli import prog
from adsc_llava.configuration_adsc_llava import policy_pruning_layers, reachable_budget_range
from adsc_llava.shapes_demo import synthetic
from adsc_llava.shapes_demo.evaluate import Result, answer_new_image, evaluate_row
from adsc_llava.shapes_demo.recipe import (
    BUDGET_FRACTIONS,
    FULL,
    QUESTION_TYPES,
    QUICK,
    QUICK_SEEDS,
    SEEDS,
    DemoRecipe,
    recipe_key,
)
from adsc_llava.shapes_demo.report import aggregate, markdown_tables, plot
from adsc_llava.shapes_demo.threads import DropToOneThreadWhenBusy, choose_threads
from adsc_llava.shapes_demo.timing import PhaseClock, timing_table
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


def make_train_data(folder: Path, recipe: DemoRecipe, show_progress: bool) -> Path:
    """The base model's training split in LLaVA-665K JSON (`recipe.questions_per_image` questions per image)."""
    if not (folder / "train.json").exists():
        synthetic.write_split(
            folder,
            "train",
            recipe.num_train_images,
            recipe.seed,
            questions_per_image=recipe.questions_per_image,
            **_scene_options(recipe),
            progress=show_progress,
        )
    return folder / "train.json"


def make_test_data(folder: Path, recipe: DemoRecipe, seed: int) -> Path:
    """Seed `seed`'s held-out test split: one question per image, its own random stream (`split_seed`)."""
    split = f"test-seed{seed}"
    if not (folder / f"{split}.json").exists():
        synthetic.write_split(
            folder,
            split,
            recipe.num_test_images,
            seed,
            questions_per_image=1,
            **_scene_options(recipe),
            progress=False,
        )
    return folder / f"{split}.json"


def _scene_options(recipe: DemoRecipe) -> dict:
    return dict(
        image_size=recipe.image_size,
        min_shapes=recipe.min_shapes,
        max_shapes=recipe.max_shapes,
        question_types=QUESTION_TYPES,
    )


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


@dataclass
class SeedRun:
    """Tables I and III on one seed: its test split and fine-tuning runs, on `base_dir`."""

    seed: int
    base_dir: Path
    table_one: list[Result]
    table_three: list[Result]


def run_seed(
    seed: int,
    base_dir: Path,
    train_json: Path,
    test_json: Path,
    output_dir: Path,
    recipe: DemoRecipe,
    clock: PhaseClock,
) -> SeedRun:
    """Tables I and III in miniature for one seed; every fine-tuned model stays in `output_dir`."""
    tuning = replace(recipe, seed=seed)
    processor = AutoProcessor.from_pretrained(base_dir, trust_remote_code=True)
    num_tokens = AdscLlavaConfig.from_pretrained(base_dir).image_seq_length
    budgets = [round(fraction * num_tokens, 1) for fraction in BUDGET_FRACTIONS]

    def tuned_row(budget: float, curriculum: str) -> Result:
        with clock.phase("LoRA training"):
            tuned_dir = fine_tune(
                base_dir, train_json, output_dir / f"adsc-{budget:g}-{curriculum}", tuning, budget, curriculum
            )
        with clock.phase("LoRA rows"):
            method = f"ADSC + LoRA ({curriculum})"
            return evaluate_row(method, load(tuned_dir), processor, test_json, budget, seed, curriculum, tuned_dir)

    print(f"\nSeed {seed}: Table I in miniature (test split {test_json.name})", flush=True)
    base = load(base_dir)
    with clock.phase("training-free rows"):
        table_one = [evaluate_row("full model", base, processor, test_json, None, seed, model_dir=base_dir)]
    adsc_layers = policy_pruning_layers("uniform", base.config.text_config.num_hidden_layers)
    for budget in budgets:
        with clock.phase("training-free rows"):
            for policy in TRAINING_FREE:
                layers = baseline_layers_for(policy, base.config, budget, adsc_layers)
                base.config.update(base.config.with_budget(budget, layers).schedule | {"adsc_keep_policy": policy})
                table_one.append(evaluate_row(TRAINING_FREE[policy], base, processor, test_json, budget, seed))
            base.config.update({"adsc_keep_policy": "uniform"})
        table_one.append(tuned_row(budget, "reverse"))

    middle = budgets[1]
    print(f"\nSeed {seed}: Table III in miniature (budget {middle:g})", flush=True)
    reverse = next(row for row in table_one if row.budget == middle and row.curriculum == "reverse")
    table_three = [tuned_row(middle, "direct"), tuned_row(middle, "standard"), reverse]
    return SeedRun(seed, base_dir, table_one, table_three)


def run_experiment(
    output_dir: Path,
    cache_dir: Path,
    recipe: DemoRecipe,
    seeds: list[int],
    base_per_seed: bool = False,
    base_threads: int | None = None,
    clock: PhaseClock | None = None,
) -> list[SeedRun]:
    """Tables I and III on every seed: on the base model of `recipe.seed`, or with `base_per_seed` on one base model
    per seed (its own training data, initialisation and order). Data and base models are cached in `cache_dir`."""
    clock = clock or PhaseClock()
    runs = []
    for seed in seeds:
        base_recipe = replace(recipe, seed=seed) if base_per_seed else recipe
        cache = cache_dir / recipe_key(base_recipe)
        with clock.phase("data"):
            train_json = make_train_data(cache / "data", base_recipe, show_progress=True)
            test_json = make_test_data(cache / "data", base_recipe, seed)
        with clock.phase("base model"):
            base_dir = train_base_model(cache, base_recipe, train_json, base_threads)
        run = run_seed(seed, base_dir, train_json, test_json, output_dir / f"seed{seed}", recipe, clock)
        # Each seed's rows as soon as they exist: a long run that stops later still shows what it measured.
        (output_dir / f"seed{seed}" / "results.json").write_text(json.dumps(seed_record(run), indent=1))
        runs.append(run)
    return runs


def seed_record(run: SeedRun) -> dict:
    return {
        "seed": run.seed,
        "base_model": str(run.base_dir),
        "base_threads": base_threads_used(run.base_dir),
        "table_one": [asdict(row) for row in run.table_one],
        "table_three": [asdict(row) for row in run.table_three],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog("demo"),
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog="examples:\n  adsc-llava demo                 # the full run (3 seeds on one base model)\n"
        "  adsc-llava demo --quick         # the smoke version CI runs\n"
        "  adsc-llava demo --base-per-seed # one base model per seed: the spread of the whole experiment\n"
        "  adsc-llava demo --seeds 1 --threads 1 --output-dir runs/seed1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output-dir", type=Path, default=Path("runs/demo"), help="Tables, plot and models.")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(".cache/adsc-demo"), help="Data and base models, reused by reruns."
    )
    parser.add_argument("--quick", action="store_true", help="A smoke version (tiny data, few steps, 2 seeds).")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help=f"Seeds of the test splits and fine-tuning runs (default {' '.join(map(str, SEEDS))}; --quick "
        f"{' '.join(map(str, QUICK_SEEDS))}). The base model is the first seed's.",
    )
    parser.add_argument(
        "--base-per-seed",
        action="store_true",
        help="Train a base model for every seed (its own data, initialisation and order) instead of sharing the first "
        "seed's: the spread then covers the whole experiment, at the cost of one base training per seed.",
    )
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
    seeds = args.seeds or list(QUICK_SEEDS if args.quick else SEEDS)
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        parser.error(f"--seeds must be distinct non-negative integers, got {seeds}.")
    # Absolute paths: the new-image check runs in a fresh process whose working directory is the output folder.
    args.output_dir, args.cache_dir = args.output_dir.resolve(), args.cache_dir.resolve()
    recipe = replace(QUICK if args.quick else FULL, seed=seeds[0])
    torch.set_num_threads(1)  # tiny models: a second thread costs more than it brings (and CI shares the cores)
    clock = PhaseClock()
    args.output_dir.mkdir(parents=True, exist_ok=True)

    runs = run_experiment(args.output_dir, args.cache_dir, recipe, seeds, args.base_per_seed, args.threads, clock)
    table_one = aggregate([run.table_one for run in runs])
    table_three = aggregate([run.table_three for run in runs])
    tables = markdown_tables(table_one, table_three, runs[0].table_one[0].num_questions)
    plot_path = plot(table_one, args.output_dir / "accuracy_vs_tokens.png")

    tuned = [row for run in runs for row in run.table_one if row.model_dir and row.budget is not None]
    best = max(tuned, key=lambda row: (row.accuracy, -row.vision_tokens))
    with clock.phase("new image (pipeline, fresh process)"):
        image_path, question, answer, right = answer_new_image(Path(best.model_dir), args.output_dir, recipe)
    timing = clock.stop()
    (args.output_dir / "results.md").write_text(tables + "\nWhere the time went\n\n" + timing_table(timing))
    (args.output_dir / "results.json").write_text(
        json.dumps(
            {
                "recipe": asdict(recipe),
                "seeds": seeds,
                "base_per_seed": args.base_per_seed,
                "table_one": [asdict(row) for row in table_one],
                "table_three": [asdict(row) for row in table_three],
                "runs": [seed_record(run) for run in runs],
                "timing": timing,
            },
            indent=1,
        )
    )
    print("\n" + tables)
    print(timing_table(timing))
    print(
        f"Best ADSC model: {best.model_dir} (seed {best.seed}, budget {best.budget:g}, accuracy {best.accuracy:.1%})"
    )
    print(f"New image {image_path}: '{question}' -> '{answer}' ({'right' if right else 'wrong'})")
    print(f"Tables: {args.output_dir / 'results.md'}" + (f", plot: {plot_path}" if plot_path else ""))
    print(f"Total time: {timing['total_wall_s']:.0f} s wall, {timing['total_cpu_s']:.0f} s CPU")
    return 0


def base_threads_used(base_dir: Path) -> dict | None:
    """What `train_base_model` wrote about its threads, None for a base model cached before it did."""
    threads_file = base_dir / "threads.json"
    return json.loads(threads_file.read_text()) if threads_file.is_file() else None
