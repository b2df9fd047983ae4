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
   After the base models, the seeds' fine-tuning and scoring jobs run in worker processes of one thread each.
6. The best ADSC model, saved as a remote-code checkpoint, answers a question about a newly drawn image through
   `pipeline("image-text-to-text", trust_remote_code=True)` in a fresh process.
7. Markdown tables, a PNG plot (accuracy vs vision tokens per method, one panel per category) and where the time
   went (wall and CPU seconds per phase, the machine's load) in the output folder.

Everything here calls the project's public pieces; nothing re-implements them.
"""

import argparse
import json
import multiprocessing
import os
import shutil
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack
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
        scan_data=False,  # the records come from the generator, whose tests check them (the scan re-reads 40,000)
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
            scan_data=False,  # generated records, checked by the generator's tests
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


@dataclass(frozen=True)
class SeedInputs:
    """What one seed's rows are computed from, and the folder its fine-tuned models go to."""

    seed: int
    base_dir: Path
    train_json: Path
    test_json: Path
    output_dir: Path


def budgets_of(base_dir: Path) -> list[float]:
    num_tokens = AdscLlavaConfig.from_pretrained(base_dir).image_seq_length
    return [round(fraction * num_tokens, 1) for fraction in BUDGET_FRACTIONS]


def training_free_rows(inputs: SeedInputs, clock: PhaseClock) -> list[Result]:
    """The full model, then at each budget each training-free keep policy (`TRAINING_FREE`) on the base model."""
    processor = AutoProcessor.from_pretrained(inputs.base_dir, trust_remote_code=True)
    base = load(inputs.base_dir)
    with clock.phase("training-free rows"):
        rows = [
            evaluate_row("full model", base, processor, inputs.test_json, None, inputs.seed, None, inputs.base_dir)
        ]
        adsc_layers = policy_pruning_layers("uniform", base.config.text_config.num_hidden_layers)
        for budget in budgets_of(inputs.base_dir):
            for policy in TRAINING_FREE:
                layers = baseline_layers_for(policy, base.config, budget, adsc_layers)
                base.config.update(base.config.with_budget(budget, layers).schedule | {"adsc_keep_policy": policy})
                rows.append(
                    evaluate_row(TRAINING_FREE[policy], base, processor, inputs.test_json, budget, inputs.seed)
                )
    return rows


def tuned_row(inputs: SeedInputs, recipe: DemoRecipe, budget: float, curriculum: str, clock: PhaseClock) -> Result:
    """ADSC + LoRA at `budget` with `curriculum`, fine-tuned on the seed's seed, scored on its test split."""
    with clock.phase("LoRA training"):
        tuned_dir = fine_tune(
            inputs.base_dir,
            inputs.train_json,
            inputs.output_dir / f"adsc-{budget:g}-{curriculum}",
            replace(recipe, seed=inputs.seed),
            budget,
            curriculum,
        )
    with clock.phase("LoRA rows"):
        processor = AutoProcessor.from_pretrained(inputs.base_dir, trust_remote_code=True)
        method = f"ADSC + LoRA ({curriculum})"
        return evaluate_row(
            method, load(tuned_dir), processor, inputs.test_json, budget, inputs.seed, curriculum, tuned_dir
        )


def run_job(
    inputs: SeedInputs, recipe: DemoRecipe, budget: float | None, curriculum: str | None
) -> tuple[list[Result], dict]:
    """One unit of a seed's work, in this process or a worker: the training-free rows (`budget` None) or one
    fine-tuned row. Returns the rows and the job's phase times."""
    clock = PhaseClock(every=None)
    if budget is None:
        rows = training_free_rows(inputs, clock)
    else:
        rows = [tuned_row(inputs, recipe, budget, curriculum, clock)]
    return rows, clock.stop()["phases"]


def seed_jobs(inputs: SeedInputs) -> list[tuple[float | None, str | None]]:
    """A seed's jobs as (budget, curriculum): the fine-tuning runs first (the longest), then the training-free rows."""
    budgets = budgets_of(inputs.base_dir)
    return [(budget, "reverse") for budget in budgets] + [
        (budgets[1], "direct"),
        (budgets[1], "standard"),
        (None, None),
    ]


def assemble(inputs: SeedInputs, results: dict[tuple[float | None, str | None], list[Result]]) -> SeedRun:
    """Tables I and III of one seed from its jobs' rows, in table order."""
    full, *training_free = results[(None, None)]
    budgets = budgets_of(inputs.base_dir)
    table_one = [full]
    for budget in budgets:
        table_one += [row for row in training_free if row.budget == budget] + results[(budget, "reverse")]
    table_three = [results[(budgets[1], curriculum)][0] for curriculum in ("direct", "standard", "reverse")]
    return SeedRun(inputs.seed, inputs.base_dir, table_one, table_three)


def run_experiment(
    output_dir: Path,
    cache_dir: Path,
    recipe: DemoRecipe,
    seeds: list[int],
    base_per_seed: bool = False,
    base_threads: int | None = None,
    clock: PhaseClock | None = None,
    processes: int | None = 1,
) -> list[SeedRun]:
    """Tables I and III on every seed: on the base model of `recipe.seed`, or with `base_per_seed` on one base model
    per seed (its own training data, initialisation and order). Data and base models are cached in `cache_dir`.

    Base models train one after the other (on up to `MAX_BASE_THREADS` threads); then the seeds' fine-tuning and
    scoring jobs, one thread each, run in `processes` worker processes (1: in this process; None: as many as the CPU's
    other processes then leave cores idle). Every job is seeded and single-threaded, so the numbers do not depend on
    `processes`.
    """
    clock = clock or PhaseClock()
    seed_inputs = []
    for seed in seeds:
        base_recipe = replace(recipe, seed=seed) if base_per_seed else recipe
        cache = cache_dir / recipe_key(base_recipe)
        with clock.phase("data"):
            train_json = make_train_data(cache / "data", base_recipe, show_progress=True)
            test_json = make_test_data(cache / "data", base_recipe, seed)
        with clock.phase("base model"):
            base_dir = train_base_model(cache, base_recipe, train_json, base_threads)
        seed_inputs.append(SeedInputs(seed, base_dir, train_json, test_json, output_dir / f"seed{seed}"))

    num_jobs = sum(len(seed_jobs(inputs)) for inputs in seed_inputs)
    # Chosen after the base models: the load now is what the jobs will share the CPU with.
    processes = min(processes or choose_threads(os.cpu_count() or 1), num_jobs)
    runs = []
    with clock.phase(f"fine-tuning and scoring, {processes} process(es): elapsed"), ExitStack() as stack:
        if processes > 1:
            print(f"\nFine-tuning and scoring in {processes} processes of one thread each", flush=True)
            pool = stack.enter_context(
                ProcessPoolExecutor(processes, multiprocessing.get_context("spawn"), initializer=_init_worker)
            )
            submit = pool.submit
        else:
            submit = _run_now
        futures = [{job: submit(run_job, inputs, recipe, *job) for job in seed_jobs(inputs)} for inputs in seed_inputs]
        for inputs, seed_futures in zip(seed_inputs, futures, strict=True):
            results = {}
            for job, future in seed_futures.items():
                results[job], phases = future.result()
                clock.add(phases)
            run = assemble(inputs, results)
            # Each seed's rows as soon as they exist: a long run that stops later still shows what it measured.
            (inputs.output_dir / "results.json").write_text(json.dumps(seed_record(run), indent=1))
            runs.append(run)
    return runs


def _init_worker() -> None:
    torch.set_num_threads(1)
    # A spawned worker defaults to spawning too: each fine-tuning run's data loader process would import torch
    # afresh (3x the CPU of a 3-step run). Fork it, as the main process does.
    multiprocessing.set_start_method("fork", force=True)


def _run_now(function, *args) -> Future:
    """`Executor.submit` without an executor: runs `function` here, now."""
    future = Future()
    future.set_result(function(*args))
    return future


def seed_record(run: SeedRun) -> dict:
    return {
        "seed": run.seed,
        "base_model": str(run.base_dir),
        "base_threads": base_threads_used(run.base_dir),
        "table_one": [asdict(row) for row in run.table_one],
        "table_three": [asdict(row) for row in run.table_three],
    }


def build_parser() -> argparse.ArgumentParser:
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
        "--processes",
        type=int,
        default=None,
        help="Worker processes (one thread each) for the fine-tuning and scoring jobs after the base models (default: "
        "as many as the CPU's load leaves idle cores, 1 = in this process). The numbers do not depend on it.",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the base model's training (default: as many as the CPU's load leaves idle, at most 2, "
        "dropping to 1 if other processes start competing). Give it to reproduce a run exactly.",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for option in ("threads", "processes"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option} must be >= 1, got {getattr(args, option)}.")
    seeds = args.seeds or list(QUICK_SEEDS if args.quick else SEEDS)
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        parser.error(f"--seeds must be distinct non-negative integers, got {seeds}.")
    # Absolute paths: the new-image check runs in a fresh process whose working directory is the output folder.
    args.output_dir, args.cache_dir = args.output_dir.resolve(), args.cache_dir.resolve()
    recipe = replace(QUICK if args.quick else FULL, seed=seeds[0])
    torch.set_num_threads(1)  # tiny models: a second thread costs more than it brings (and CI shares the cores)
    clock = PhaseClock()
    args.output_dir.mkdir(parents=True, exist_ok=True)

    runs = run_experiment(
        args.output_dir, args.cache_dir, recipe, seeds, args.base_per_seed, args.threads, clock, args.processes
    )
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
    record = {
        "recipe": asdict(recipe),
        "seeds": seeds,
        "base_per_seed": args.base_per_seed,
        "table_one": [asdict(row) for row in table_one],
        "table_three": [asdict(row) for row in table_three],
        "runs": [seed_record(run) for run in runs],
        "timing": timing,
    }
    (args.output_dir / "results.json").write_text(json.dumps(record, indent=1))
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
