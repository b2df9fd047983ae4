"""`python -m train.demo --quick`: the whole experiment, end to end, in its 2-minute smoke version."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_demo_runs_end_to_end(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "train.demo", "--quick", "--output-dir", "out", "--cache-dir", "cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    table_one, table_three = results["table_one"], results["table_three"]
    # The full model, then training-free and fine-tuned ADSC at three budgets of about 1/3, 2/9 and 1/9.
    methods = ["full model"] + ["ADSC, training-free", "ADSC + LoRA (reverse)"] * 3
    assert [row["method"] for row in table_one] == methods
    budgets = [row["budget"] for row in table_one[1::2]]
    assert budgets == sorted(budgets, reverse=True) and abs(budgets[-1] - 144 / 9) < 0.5
    # The cost model: pruning saves FLOPs and KV cache, more at smaller budgets.
    kv_ratios = [row["kv_ratio"] for row in table_one]
    assert kv_ratios[0] == 1.0 and kv_ratios[1] > kv_ratios[3] > kv_ratios[5] > 0
    assert sorted(row["curriculum"] for row in table_three) == ["direct", "reverse", "standard"]
    # Each fine-tuned model is a remote-code checkpoint; the new-image answer came from a fresh process.
    assert (Path(table_one[2]["model_dir"]) / "modeling_adsc_llava.py").is_file()
    assert "| ADSC + LoRA (reverse) |" in (out / "results.md").read_text()
    assert (out / "accuracy_vs_tokens.png").stat().st_size > 1000
    assert (out / "new_image.png").is_file() and "New image" in completed.stdout
    # A rerun reuses the cached data and base model, fine-tunes again and reproduces the numbers.
    rerun = subprocess.run(
        [sys.executable, "-m", "train.demo", "--quick", "--output-dir", "out", "--cache-dir", "cache"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0 and "Base model: reusing" in rerun.stdout
    assert json.loads((out / "results.json").read_text()) == results


def test_cache_key_follows_the_recipe_and_the_data_generator(monkeypatch):
    from train import demo, synthetic

    key = demo.recipe_key(demo.FULL)
    assert demo.recipe_key(demo.FULL) == key
    assert demo.recipe_key(replace(demo.FULL, base_steps=demo.FULL.base_steps + 1)) != key
    # Drawing scenes differently must not reuse data (and a base model) cached from the old drawings.
    monkeypatch.setattr(synthetic, "MIN_SCALE", synthetic.MIN_SCALE - 0.01)
    assert demo.recipe_key(demo.FULL) != key
    monkeypatch.undo()
    monkeypatch.setattr(synthetic, "POSITIONS", tuple(reversed(synthetic.POSITIONS)))
    assert demo.recipe_key(demo.FULL) != key


def test_fine_tuning_never_reuses_a_model_left_by_an_earlier_run(tmp_path, monkeypatch):
    from train import demo

    stale = tmp_path / "adsc-32-reverse" / "final"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")  # e.g. fine-tuned from the base model of another recipe
    calls = []
    monkeypatch.setattr(demo, "run_training", lambda config: calls.append(config) or Path(config.output_dir) / "final")
    out = demo.fine_tune(tmp_path / "base", tmp_path / "train.json", stale.parent, demo.QUICK, 32.0, "reverse")
    assert len(calls) == 1 and calls[0].budget == 32.0 and calls[0].curriculum == "reverse"
    assert out == stale and not stale.exists()  # trained afresh into an emptied folder


def test_base_training_uses_base_threads_and_restores_the_setting(tmp_path, monkeypatch):
    import torch

    from train import demo

    seen = []
    monkeypatch.setattr(demo, "run_training", lambda config: seen.append(torch.get_num_threads()) or tmp_path)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 8)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        demo.train_base_model(tmp_path / "cache", replace(demo.QUICK, base_threads=2), tmp_path / "train.json")
        assert seen == [2] and torch.get_num_threads() == 1  # the LoRA runs that follow stay on one thread
    finally:
        torch.set_num_threads(before)
