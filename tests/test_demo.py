"""`adsc-llava demo --quick`: the whole experiment, end to end, in its 2-minute smoke version."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _demo(tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "adsc_llava",
            "demo",
            "--quick",
            "--output-dir",
            "out",
            "--cache-dir",
            "cache",
            *options,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_quick_demo_runs_end_to_end(tmp_path):
    completed = _demo(tmp_path, "--processes", "2")
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    table_one, table_three = results["table_one"], results["table_three"]
    # --quick runs two seeds on one base model; every aggregated row spans both.
    assert results["seeds"] == [0, 1] and [run["seed"] for run in results["runs"]] == [0, 1]
    assert len({run["base_model"] for run in results["runs"]}) == 1
    # The full model, then at three budgets of about 1/3, 2/9 and 1/9: the training-free policies on the base model
    # and fine-tuned ADSC.
    per_budget = ["ADSC, training-free", "FastV", "PyramidDrop", "ADSC + LoRA (reverse)"]
    assert [row["method"] for row in table_one] == ["full model"] + per_budget * 3
    for run in results["runs"]:
        assert [row["method"] for row in run["table_one"]] == ["full model"] + per_budget * 3
        assert all(row["seed"] == run["seed"] and row["num_questions"] == 32 for row in run["table_one"])
    by_budget = [table_one[1 + 4 * i : 5 + 4 * i] for i in range(3)]
    budgets = [rows[0]["budget"] for rows in by_budget]
    assert budgets == sorted(budgets, reverse=True) and abs(budgets[-1] - 144 / 9) < 0.5
    for rows in by_budget:
        # The same budget accounting for every method: the same mean vision tokens per layer, within a token.
        assert max(r["vision_tokens"] for r in rows) - min(r["vision_tokens"] for r in rows) < 1.0, rows
        assert all(r["vision_tokens"] <= r["budget"] for r in rows)
    # FastV prunes once (its K = 2 of 32, scaled); PyramidDrop on its own stages where they reach the budget, on ADSC's
    # layers where they do not (the quarter of the depth before its first stage alone holds 1/12 of the budget).
    adsc, fastv, pdrop = (by_budget[0][i]["pruning_layers"] for i in range(3))
    assert adsc == [1, 3, 6, 9] and fastv == [1] and pdrop == [3, 6, 9]
    assert by_budget[2][2]["pruning_layers"] == adsc
    # The cost model: pruning saves FLOPs and KV cache, more at smaller budgets.
    kv_ratios = [rows[0]["kv_ratio"] for rows in by_budget]
    assert table_one[0]["kv_ratio"] == 1.0 and kv_ratios[0] > kv_ratios[1] > kv_ratios[2] > 0
    assert [row["curriculum"] for row in table_three] == ["direct", "standard", "reverse"]
    # Each cell is the mean and range of the seeds' accuracies, overall and per question category.
    for index, row in enumerate(table_one):
        seeds = [run["table_one"][index] for run in results["runs"]]
        assert set(row["accuracy"]) == {"all", "cell", "counting", "existence", "relation"}
        for category, spread in row["accuracy"].items():
            values = [s["accuracy"] if category == "all" else s["accuracy_by_category"][category] for s in seeds]
            assert spread == {"mean": sum(values) / 2, "low": min(values), "high": max(values)}
    # Each fine-tuned model is a remote-code checkpoint; the new-image answer came from a fresh process.
    tuned = results["runs"][1]["table_one"][4]["model_dir"]
    assert tuned.endswith("seed1/adsc-48-reverse/final") and (Path(tuned) / "modeling_adsc_llava.py").is_file()
    report = (out / "results.md").read_text()
    assert "| ADSC + LoRA (reverse) | 1, 3, 6, 9 |" in report and "| PyramidDrop | 3, 6, 9 |" in report
    assert (
        "| method | pruning layers | avg vision tokens/layer | all | cell | counting | existence | relation |"
        in report
    )
    assert "Which differences exceed the spread" in report and "Where the time went" in report
    phases = results["timing"]["phases"]
    assert phases["LoRA training"]["runs"] == 2 * 5 and phases["base model"]["runs"] == 2
    assert phases["training-free rows"]["runs"] == 2 and "fine-tuning and scoring, 2 process(es): elapsed" in phases
    assert all(phase["cpu_s"] > 0 and phase["wall_s"] > 0 for phase in phases.values())
    assert (out / "accuracy_vs_tokens.png").stat().st_size > 1000
    assert (out / "new_image.png").is_file() and "New image" in completed.stdout
    # A rerun of seed 0 reuses the cached data and base model, fine-tunes again and reproduces seed 0's numbers, in
    # this process where the first run used two worker processes.
    rerun = _demo(tmp_path, "--seeds", "0", "--processes", "1")
    assert rerun.returncode == 0 and "Base model: reusing" in rerun.stdout
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"][:1]


def test_cache_key_follows_the_recipe_and_the_data_generator(monkeypatch):
    from adsc_llava.shapes_demo import recipe, synthetic

    key = recipe.recipe_key(recipe.FULL)
    assert recipe.recipe_key(recipe.FULL) == key
    assert recipe.recipe_key(replace(recipe.FULL, base_steps=recipe.FULL.base_steps + 1)) != key
    # Drawing scenes differently must not reuse data (and a base model) cached from the old drawings.
    monkeypatch.setattr(synthetic, "MIN_SCALE", synthetic.MIN_SCALE - 0.01)
    assert recipe.recipe_key(recipe.FULL) != key
    monkeypatch.undo()
    monkeypatch.setattr(synthetic, "POSITIONS", tuple(reversed(synthetic.POSITIONS)))
    assert recipe.recipe_key(recipe.FULL) != key


def test_fine_tuning_never_reuses_a_model_left_by_an_earlier_run(tmp_path, monkeypatch):
    from adsc_llava.shapes_demo import run as demo

    stale = tmp_path / "adsc-32-reverse" / "final"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # e.g. fine-tuned from the base model of another recipe
    calls = []
    monkeypatch.setattr(demo, "run_training", lambda config: calls.append(config) or Path(config.output_dir) / "final")
    out = demo.fine_tune(tmp_path / "base", tmp_path / "train.json", stale.parent, demo.QUICK, 32.0, "reverse")
    assert len(calls) == 1 and calls[0].budget == 32.0 and calls[0].curriculum == "reverse"
    assert out == stale and not stale.exists()  # trained afresh into an emptied folder


def test_base_per_seed_trains_each_seed_its_own_base_model(tmp_path, monkeypatch):
    from adsc_llava.shapes_demo import run as demo

    trained = []

    def fake_base(cache, recipe, train_json, threads=None):
        trained.append((recipe.seed, cache, train_json))
        return cache / "base" / "final"

    def fake_assemble(inputs, results):
        inputs.output_dir.mkdir(parents=True, exist_ok=True)
        return demo.SeedRun(inputs.seed, inputs.base_dir, [], [])

    monkeypatch.setattr(demo, "make_train_data", lambda folder, recipe, show_progress: folder / "train.json")
    monkeypatch.setattr(demo, "make_test_data", lambda folder, recipe, seed: folder / f"test-seed{seed}.json")
    monkeypatch.setattr(demo, "train_base_model", fake_base)
    monkeypatch.setattr(demo, "seed_jobs", lambda inputs: [])
    monkeypatch.setattr(demo, "assemble", fake_assemble)
    shared = demo.run_experiment(tmp_path / "out", tmp_path / "cache", demo.QUICK, [0, 1, 2])
    assert [seed for seed, _, _ in trained] == [0, 0, 0] and len({run.base_dir for run in shared}) == 1
    trained.clear()
    own = demo.run_experiment(tmp_path / "out", tmp_path / "cache", demo.QUICK, [0, 1, 2], base_per_seed=True)
    # Each seed's own training data, initialisation and order: another recipe, so another cache folder.
    assert [seed for seed, _, _ in trained] == [0, 1, 2]
    assert len({cache for _, cache, _ in trained}) == 3 and len({data for _, _, data in trained}) == 3
    assert [run.base_dir for run in own] == [cache / "base" / "final" for _, cache, _ in trained]
    assert own[0].base_dir == shared[0].base_dir  # seed 0's base model is the one the shared runs use


def test_base_training_uses_the_given_threads_and_restores_the_setting(tmp_path, monkeypatch):
    import torch

    from adsc_llava.shapes_demo import run as demo

    seen = []

    def fake_training(config, callbacks=None):
        seen.append((torch.get_num_threads(), callbacks))
        (tmp_path / "final").mkdir(exist_ok=True)
        return tmp_path / "final"

    monkeypatch.setattr(demo, "run_training", fake_training)
    monkeypatch.setattr(demo, "choose_threads", lambda max_threads: max_threads)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        demo.train_base_model(tmp_path / "cache", demo.QUICK, tmp_path / "train.json", threads=2)
        assert seen[-1] == (2, None) and torch.get_num_threads() == 1  # the LoRA runs that follow stay on one thread
        assert json.loads((tmp_path / "final" / "threads.json").read_text()) == {
            "threads": 2,
            "one_thread_from_step": None,
        }
        demo.train_base_model(tmp_path / "cache2", demo.QUICK, tmp_path / "train.json")  # threads from the load
        threads, callbacks = seen[-1]
        assert threads == demo.MAX_BASE_THREADS and isinstance(callbacks[0], demo.DropToOneThreadWhenBusy)
    finally:
        torch.set_num_threads(before)


def test_thread_choice_follows_other_processes_cpu_use(monkeypatch):
    """Two threads when the other processes leave both cores idle, one as soon as they use half a core or more."""
    from adsc_llava.shapes_demo import threads

    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads.time, "sleep", lambda seconds: None)
    for others, expected in ((0.0, 2), (0.3, 2), (0.6, 1), (1.0, 1), (2.0, 1)):
        monkeypatch.setattr(threads.OtherProcessesMeter, "cores", lambda self, others=others: others)
        assert threads.choose_threads(2) == expected, others


def test_guard_drops_to_one_thread_when_others_compete(monkeypatch):
    import torch

    from adsc_llava.shapes_demo import threads

    guard = threads.DropToOneThreadWhenBusy(every=10)
    state = type("State", (), {"global_step": 10})()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(guard.meter, "cores", lambda: 0.1)
        guard.on_step_end(None, state, None)
        assert torch.get_num_threads() == 2 and guard.switched_at_step is None
        monkeypatch.setattr(guard.meter, "cores", lambda: 0.9)
        state.global_step = 15  # between checks: nothing happens
        guard.on_step_end(None, state, None)
        assert torch.get_num_threads() == 2
        state.global_step = 20
        guard.on_step_end(None, state, None)
        assert torch.get_num_threads() == 1 and guard.switched_at_step == 20
    finally:
        torch.set_num_threads(before)


def test_other_processes_meter_sees_a_busy_process():
    """The meter counts another process's CPU use: at least what that process itself reports it used."""
    import subprocess
    import time

    from adsc_llava.shapes_demo import threads

    if threads.busy_cpu_seconds() is None:
        pytest.skip("no /proc/stat on this system: the meter falls back to the load average")

    def cpu_seconds(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        meter, hog_before, start = threads.OtherProcessesMeter(), cpu_seconds(hog.pid), time.monotonic()
        time.sleep(1.5)
        others, hog_cores = meter.cores(), (cpu_seconds(hog.pid) - hog_before) / (time.monotonic() - start)
    finally:
        hog.kill()
    assert hog_cores > 0.02  # it ran, however busy the machine (at nice 10 beside six sessions: 0.08 of a core)
    assert others >= 0.8 * hog_cores, (others, hog_cores)


def _rows(seed: int, accuracies: dict[str, float]) -> list:
    from adsc_llava.shapes_demo.evaluate import Result

    return [
        Result(
            method=method,
            budget=None if method == "full model" else 48.0,
            curriculum="reverse" if "LoRA" in method else None,
            seed=seed,
            accuracy=accuracy,
            accuracy_by_category={"counting": accuracy / 2},
            accuracy_by_type={"count": accuracy / 2},
            num_questions=100,
            vision_tokens=144.0 if method == "full model" else 47.9,
            flops_ratio=1.0 if method == "full model" else 0.418,
            kv_ratio=1.0 if method == "full model" else 0.399,
            pruning_layers=[] if method == "full model" else [1, 3, 6, 9],
        )
        for method, accuracy in accuracies.items()
    ]


def test_tables_over_seeds_show_each_range_and_which_differences_exceed_it():
    from adsc_llava.shapes_demo import report

    methods = ["full model", "ADSC, training-free", "FastV", "PyramidDrop", "ADSC + LoRA (reverse)"]
    seed0 = _rows(0, dict(zip(methods, [0.90, 0.70, 0.60, 0.50, 0.76], strict=True)))
    seed1 = _rows(1, dict(zip(methods, [0.80, 0.74, 0.72, 0.55, 0.80], strict=True)))
    rows = report.aggregate([seed0, seed1])
    assert [row.seeds for row in rows] == [[0, 1]] * 5
    assert rows[1].accuracy["all"] == report.Spread(mean=(0.70 + 0.74) / 2, low=0.70, high=0.74)
    assert rows[4].accuracy["counting"] == report.Spread(mean=(0.38 + 0.40) / 2, low=0.38, high=0.40)
    # LoRA's worst seed beats training-free ADSC's best (0.76 > 0.74); ADSC's and FastV's ranges overlap (0.70 <
    # 0.72); FastV's worst beats PyramidDrop's best (0.60 > 0.55).
    assert report.ranking(rows[1:], "all") == (
        "ADSC + LoRA (reverse) 78.0 > ADSC, training-free 72.0 ~ FastV 66.0 > PyramidDrop 52.5"
    )
    tables = report.markdown_tables(rows, [rows[4]], num_questions=100)
    assert (
        "| ADSC, training-free | 1, 3, 6, 9 | 47.9 | 72.0 (70.0-74.0) | 36.0 (35.0-37.0) | 84.7% | 41.8% | 39.9% |"
        in tables
    )
    assert (
        "  - counting: ADSC + LoRA (reverse) 39.0 > ADSC, training-free 36.0 ~ FastV 33.0 > PyramidDrop 26.2" in tables
    )
    assert "| reverse | 78.0 (76.0-80.0) | 39.0 (38.0-40.0) | 91.8% |" in tables
    assert str(report.Spread(0.5, 0.5, 0.5)) == "50.0"  # one seed: no range to show
    with pytest.raises(ValueError, match="different methods"):
        report.aggregate([seed0, seed1[::-1]])


def test_phase_clock_counts_cpu_and_wall_seconds_per_phase():
    import time

    from adsc_llava.shapes_demo.timing import PhaseClock, timing_table

    clock = PhaseClock(every=0.05)
    for _ in range(2):
        with clock.phase("spin"):
            end = time.process_time() + 0.2
            while time.process_time() < end:
                pass
    with clock.phase("sleep"):
        time.sleep(0.2)
    timing = clock.stop()
    spin, sleep = timing["phases"]["spin"], timing["phases"]["sleep"]
    assert spin["runs"] == 2 and spin["cpu_s"] >= 0.4 and spin["wall_s"] >= spin["cpu_s"] - 0.02
    assert sleep["runs"] == 1 and sleep["wall_s"] >= 0.2 and sleep["cpu_s"] < 0.1
    assert timing["total_cpu_s"] >= 0.4 and timing["load_max"] is not None and timing["cores"] >= 1
    assert "| spin | 2 |" in timing_table(timing) and "Load average" in timing_table(timing)
