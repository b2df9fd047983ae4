"""The analytic cost model (`adsc_llava.cost`) and its CLI (`adsc-llava cost`).

Two kinds of checks:

- the paper's Table IV for LLaVA-1.5-7B (FLOPs within 1%, the KV cache compared honestly) from the shipped configs;
- measured against the analytic model: `FlopCounterMode` on tiny random stock LLaVA models (eager attention, CPU)
  counts exactly the analytic FLOPs of every component in a prefill, in each decode step and in `generate`, and
  the `DynamicCache` holds exactly the analytic KV bytes per layer after the prefill and after each decode step.
"""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from adsc_llava import AdscLlavaConfig
from adsc_llava.cost import (
    CONFIGS_DIR,
    PAPER_NEW_TOKENS,
    PAPER_PROMPT_TOKENS,
    PAPER_PRUNING_LAYERS,
    PAPER_TABLE_IV,
    LlavaDims,
    adsc_config,
    config_schedule,
    estimate_cost,
    format_schedule,
    load_config,
    load_reference_config,
)
from adsc_llava.cost_table import main

# The paper's Table IV rows: budget -> tokens per layer (run-length form).
PAPER_SCHEDULES = {
    576: "576x32",
    192: "576x2, 335x6, 194x8, 112x8, 65x8",
    128: "576x2, 252x6, 110x8, 48x8, 21x8",
    64: "576x2, 114x6, 22x8, 4x8, 0x8",
}
# The analytic fp32 KV cache at these settings, as given in the project's facts file (MB = 1e6 bytes).
FACTS_ANALYTIC_KV_MB = {576: 730.9, 192: 327.7, 128: 261.1, 64: 193.9}


def paper_report(config: LlavaConfig, budget: int, **kwargs):
    schedule = config_schedule(adsc_config(config).with_budget(budget, PAPER_PRUNING_LAYERS))
    return estimate_cost(
        config, prompt_tokens=PAPER_PROMPT_TOKENS, new_tokens=PAPER_NEW_TOKENS, schedule=schedule, **kwargs
    )


@pytest.fixture(scope="module")
def llava_7b() -> LlavaConfig:
    return load_reference_config("llava-1.5-7b")


# --------------------------------------------------------------------------------------------------------------
# Shipped configs
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, hidden, layers, heads, intermediate",
    [("llava-1.5-7b", 4096, 32, 32, 11008), ("llava-1.5-13b", 5120, 40, 40, 13824)],
)
def test_reference_configs_load_with_llama_defaults(name, hidden, layers, heads, intermediate):
    with open(CONFIGS_DIR / f"{name}.json", encoding="utf-8") as file:
        raw = json.load(file)
    assert raw["model_type"] == "llava" and raw["text_config"]["model_type"] == "llama"
    if name == "llava-1.5-7b":  # the hub file leaves the Llama defaults out
        assert "hidden_size" not in raw["text_config"] and "num_hidden_layers" not in raw["text_config"]
    for config in (LlavaConfig.from_dict(raw), load_reference_config(name), load_config(name)):
        text, vision = config.text_config, config.vision_config
        assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (hidden, layers, heads)
        assert (text.num_key_value_heads, text.intermediate_size, text.vocab_size) == (heads, intermediate, 32064)
        assert (vision.hidden_size, vision.num_hidden_layers, vision.intermediate_size) == (1024, 24, 4096)
        assert (vision.image_size, vision.patch_size) == (336, 14)
        assert config.image_token_index == 32000 and config.vision_feature_layer == -2
        assert not config.tie_word_embeddings
        assert LlavaDims.from_config(config).vision_tokens_per_image == 576


def test_load_config_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="llava-1.5-7b"):
        load_reference_config("llava-1.5-70b")
    with pytest.raises(ValueError, match="No config"):
        load_config(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="bert"):
        load_config(tmp_path)


# --------------------------------------------------------------------------------------------------------------
# Table IV
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", sorted(PAPER_TABLE_IV, reverse=True))
def test_table_iv_flops_within_one_percent(llava_7b, budget):
    report = paper_report(llava_7b, budget)
    paper_tflops = PAPER_TABLE_IV[budget][0]
    assert format_schedule(report.vision_tokens_per_layer) == PAPER_SCHEDULES[budget]
    assert report.average_vision_tokens <= budget
    assert abs(report.tflops - paper_tflops) / paper_tflops < 0.01
    # Under DeepSpeed's conventions the analytic model lands within 0.006 TFLOPs of every row.
    assert abs(report.tflops - paper_tflops) < 0.006


@pytest.mark.parametrize("budget", sorted(PAPER_TABLE_IV, reverse=True))
def test_table_iv_kv_cache_fp32_in_megabytes(llava_7b, budget):
    report = paper_report(llava_7b, budget, kv_dtype="float32")
    assert round(report.kv_megabytes, 1) == FACTS_ANALYTIC_KV_MB[budget]  # MB = 1e6 B, not MiB
    assert report.kv_mebibytes < report.kv_megabytes
    # The paper measured with PyTorch: its figures sit 3.5-7% above the analytic cache, never below.
    paper_kv = PAPER_TABLE_IV[budget][1]
    assert 0.90 * paper_kv < report.kv_megabytes < paper_kv


def test_table_iv_kv_slope_is_an_fp32_cache(llava_7b):
    """Between budgets the paper's KV figures move by what an fp32 cache moves per average vision token."""
    high, low = paper_report(llava_7b, 192), paper_report(llava_7b, 64)
    tokens = high.average_vision_tokens - low.average_vision_tokens
    analytic_mb_per_token = (high.kv_megabytes - low.kv_megabytes) / tokens
    paper_mb_per_token = (PAPER_TABLE_IV[192][1] - PAPER_TABLE_IV[64][1]) / tokens
    assert analytic_mb_per_token == pytest.approx(2 * 32 * 4096 * 4 / 1e6)
    assert paper_mb_per_token == pytest.approx(analytic_mb_per_token, rel=0.01)
    bf16 = paper_report(llava_7b, 192, kv_dtype=torch.bfloat16)
    assert bf16.kv_cache_bytes * 2 == high.kv_cache_bytes


def test_table_iv_relative_savings(llava_7b):
    stock, pruned = paper_report(llava_7b, 576), paper_report(llava_7b, 192)
    flops_saving = 1 - pruned.total_flops / stock.total_flops
    kv_saving = 1 - pruned.kv_cache_bytes / stock.kv_cache_bytes
    paper_flops_saving = 1 - PAPER_TABLE_IV[192][0] / PAPER_TABLE_IV[576][0]  # 53.7%
    paper_kv_saving = 1 - PAPER_TABLE_IV[192][1] / PAPER_TABLE_IV[576][1]  # 56.7%
    assert flops_saving == pytest.approx(paper_flops_saving, abs=0.005)
    assert kv_saving == pytest.approx(paper_kv_saving, abs=0.02)
    # The vision tower and projector do not depend on the schedule.
    assert pruned.vision_tower_flops == stock.vision_tower_flops and pruned.projector_flops == stock.projector_flops


def test_13b_runs_and_saves(llava_7b):
    config = load_reference_config("llava-1.5-13b")
    stock = estimate_cost(config, prompt_tokens=58, new_tokens=64)
    solved = adsc_config(config).with_budget(192)
    drop_ratio, schedule = solved.adsc_drop_ratio, config_schedule(solved)
    pruned = estimate_cost(config, prompt_tokens=58, new_tokens=64, schedule=schedule)
    assert len(schedule) == 40 and 0 < drop_ratio < 1 and pruned.average_vision_tokens <= 192
    assert stock.tflops > paper_report(llava_7b, 576).tflops  # a bigger LLM, the same CLIP
    assert stock.vision_tower_flops == paper_report(llava_7b, 576).vision_tower_flops
    assert 0.45 < 1 - pruned.total_flops / stock.total_flops < 0.6
    assert stock.kv_cache_bytes_per_layer()[0] == (58 + 576 + 63) * 2 * 5120 * 4


def test_adsc_config_schedule_is_used(llava_7b):
    config = AdscLlavaConfig.from_llava_config(llava_7b, budget=128)
    report = estimate_cost(config, prompt_tokens=58, new_tokens=64)
    assert format_schedule(report.vision_tokens_per_layer) == PAPER_SCHEDULES[128]
    assert report.total_flops == paper_report(llava_7b, 128).total_flops


def test_decode_keys_grow_by_one_token_per_step(llava_7b):
    report = paper_report(llava_7b, 192)
    steps = report.decode_step_flops
    assert len(steps) == PAPER_NEW_TOKENS - 1
    # Each step attends to one more cached position in each of the 32 layers: 4 * heads * head_dim FLOPs more.
    assert {later - earlier for earlier, later in zip(steps, steps[1:], strict=False)} == {32 * 4 * 4096}
    assert report.cache_lengths(0) == report.prefill_tokens_per_layer
    assert report.cache_lengths() == [tokens + 63 for tokens in report.prefill_tokens_per_layer]


def test_bad_inputs_raise_clear_errors(llava_7b):
    with pytest.raises(ValueError, match="32 layers"):
        estimate_cost(llava_7b, prompt_tokens=10, new_tokens=2, schedule=[576] * 31)
    with pytest.raises(ValueError, match=r"\[0, 576\]"):
        estimate_cost(llava_7b, prompt_tokens=10, new_tokens=2, schedule=[577] * 32)
    with pytest.raises(ValueError, match="new_tokens"):
        estimate_cost(llava_7b, prompt_tokens=10, new_tokens=0)
    with pytest.raises(ValueError, match="dtype"):
        estimate_cost(llava_7b, prompt_tokens=10, new_tokens=2, kv_dtype="float13")
    with pytest.raises(ValueError, match="lm_head_positions"):
        estimate_cost(llava_7b, prompt_tokens=10, new_tokens=2, lm_head_positions="first")
    with pytest.raises(ValueError, match="unreachable"):
        adsc_config(llava_7b).with_budget(10)
    with pytest.raises(ValueError, match="decode_steps"):
        estimate_cost(llava_7b, prompt_tokens=10, new_tokens=3).kv_cache_bytes_per_layer(5)


# --------------------------------------------------------------------------------------------------------------
# Measured: FlopCounterMode and DynamicCache on tiny random stock LLaVA models
# --------------------------------------------------------------------------------------------------------------

IMAGE_TOKEN_ID = 100
TINY_SETUPS = {
    # Multi-head attention, CLS dropped, one feature layer, one image, batch 1.
    "mha": dict(
        vision=dict(num_hidden_layers=2),
        text=dict(num_attention_heads=4, num_key_value_heads=4),
        llava=dict(vision_feature_layer=-2, vision_feature_select_strategy="default"),
        num_images=1,
        batch_size=1,
    ),
    # Grouped-query attention with head_dim != hidden / heads, CLS kept, two feature layers, two images, batch 2.
    "gqa_multi_image": dict(
        vision=dict(num_hidden_layers=3),
        text=dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8),
        llava=dict(vision_feature_layer=[-3, -1], vision_feature_select_strategy="full"),
        num_images=2,
        batch_size=2,
    ),
}


def tiny_stock_model(setup: dict) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        projection_dim=16,
        **setup["vision"],
    )
    text = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, vocab_size=128, **setup["text"])
    tokens_per_image = 16 + (setup["llava"]["vision_feature_select_strategy"] == "full")
    config = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=tokens_per_image,
        **setup["llava"],
    )
    config._attn_implementation = "eager"  # FlopCounterMode does not count the CPU sdpa kernel
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    model.generation_config.pad_token_id = 0
    return model


def tiny_inputs(model: LlavaForConditionalGeneration, setup: dict) -> tuple[dict[str, torch.Tensor], int]:
    """A batch of identical-length prompts; returns the inputs and the text tokens per prompt (T)."""
    generator = torch.Generator().manual_seed(0)
    tokens_per_image = LlavaDims.from_config(model.config).vision_tokens_per_image
    words = [1, 5, 6]
    for _ in range(setup["num_images"]):
        words += [IMAGE_TOKEN_ID] * tokens_per_image + [7, 8]
    words += [9, 10, 11]
    input_ids = torch.tensor([words] * setup["batch_size"])
    num_images = setup["num_images"] * setup["batch_size"]
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(num_images, 3, 32, 32, generator=generator),
    }
    return inputs, len(words) - setup["num_images"] * tokens_per_image


def module_flops(counter: FlopCounterMode, model: torch.nn.Module, name: str) -> int:
    return sum(counter.get_flop_counts()[f"{type(model).__name__}.{name}"].values())


def cache_bytes_per_layer(cache) -> list[int]:
    return [layer.keys.nbytes + layer.values.nbytes for layer in cache.layers]


@pytest.mark.parametrize("setup_name", sorted(TINY_SETUPS))
def test_prefill_flops_match_flop_counter_per_component(setup_name):
    setup = TINY_SETUPS[setup_name]
    model = tiny_stock_model(setup)
    inputs, prompt_tokens = tiny_inputs(model, setup)
    report = estimate_cost(
        model.config,
        prompt_tokens=prompt_tokens,
        new_tokens=1,
        num_images=setup["num_images"],
        batch_size=setup["batch_size"],
        lm_head_positions="all",
    )
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs, use_cache=True, logits_to_keep=0)  # logits on every position, as DeepSpeed counted

    assert module_flops(counter, model, "model.vision_tower") == report.vision_tower_flops
    assert module_flops(counter, model, "model.multi_modal_projector") == report.projector_flops
    for layer_idx, expected in enumerate(report.prefill_layer_flops):
        assert module_flops(counter, model, f"model.language_model.layers.{layer_idx}") == expected
    assert module_flops(counter, model, "lm_head") == report.prefill_lm_head_flops
    assert counter.get_total_flops() == report.prefill_flops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("setup_name", sorted(TINY_SETUPS))
def test_decode_steps_flops_and_kv_bytes_match(setup_name, dtype):
    setup, new_tokens = TINY_SETUPS[setup_name], 4
    model = tiny_stock_model(setup).to(dtype)
    inputs, prompt_tokens = tiny_inputs(model, setup)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    report = estimate_cost(
        model.config,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        num_images=setup["num_images"],
        batch_size=setup["batch_size"],
        kv_dtype=dtype,
    )
    with torch.no_grad():
        output = model(**inputs, use_cache=True, logits_to_keep=1)
        cache = output.cache
        assert cache_bytes_per_layer(cache) == report.kv_cache_bytes_per_layer(decode_steps=0)
        attention_mask = inputs["attention_mask"]
        for step in range(1, new_tokens):
            next_tokens = output.logits[:, -1].argmax(-1, keepdim=True)
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_tokens)], dim=1)
            with FlopCounterMode(display=False) as counter:
                output = model(input_ids=next_tokens, attention_mask=attention_mask, cache=cache, use_cache=True)
            for layer_idx, expected in enumerate(report.decode_layer_flops[step - 1]):
                assert module_flops(counter, model, f"model.language_model.layers.{layer_idx}") == expected
            assert counter.get_total_flops() == report.decode_step_flops[step - 1]
            assert cache_bytes_per_layer(cache) == report.kv_cache_bytes_per_layer(decode_steps=step)
    assert cache_bytes_per_layer(cache) == report.kv_cache_bytes_per_layer()  # the peak


@pytest.mark.parametrize("setup_name", sorted(TINY_SETUPS))
def test_generate_flops_and_peak_kv_match(setup_name):
    setup, new_tokens = TINY_SETUPS[setup_name], 5
    model = tiny_stock_model(setup)
    inputs, prompt_tokens = tiny_inputs(model, setup)
    kwargs = dict(
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        num_images=setup["num_images"],
        batch_size=setup["batch_size"],
    )
    report = estimate_cost(model.config, lm_head_positions="last", **kwargs)  # generate keeps the last logits only
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        output = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
        )
    assert output.sequences.shape[1] == inputs["input_ids"].shape[1] + new_tokens
    assert counter.get_total_flops() == report.total_flops
    assert cache_bytes_per_layer(output.cache) == report.kv_cache_bytes_per_layer()
    # The paper's convention (lm_head on every prefill position) differs by exactly the skipped lm_head positions.
    paper_convention = estimate_cost(model.config, lm_head_positions="all", **kwargs)
    dims = LlavaDims.from_config(model.config)
    skipped = setup["batch_size"] * (report.prefill_tokens_per_layer[-1] - 1)
    assert paper_convention.total_flops - report.total_flops == skipped * 2 * dims.hidden_size * dims.vocab_size


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def test_cli_prints_table_iv_and_writes_plot(tmp_path, capsys):
    plot = tmp_path / "table_iv.png"
    assert main(["--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in printed.splitlines() if line.startswith("| ")}
    assert set(rows) >= {"576 (stock)", "192", "128", "64"}
    for budget, schedule in PAPER_SCHEDULES.items():
        row = rows["576 (stock)" if budget == 576 else str(budget)]
        assert schedule in row
        assert f"| {PAPER_TABLE_IV[budget][0]:.2f} |" in row and f"| {PAPER_TABLE_IV[budget][1]:.1f} |" in row
    assert "paper -53.7%" in printed and "paper -56.7%" in printed
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_other_configs_and_errors(tmp_path, capsys, monkeypatch):
    assert main(["--config", "llava-1.5-13b", "--budgets", "192", "--kv-dtype", "bf16"]) == 0
    printed = capsys.readouterr().out
    assert "40 layers" in printed and "paper TFLOPs" not in printed  # the paper's figures are for the 7B only

    setup = TINY_SETUPS["mha"]
    tiny_stock_model(setup).config.save_pretrained(tmp_path / "tiny")
    assert main(["--config", str(tmp_path / "tiny"), "--budgets", "8", "--prompt-tokens", "6"]) == 0
    assert "| 8 |" in capsys.readouterr().out

    with pytest.raises(SystemExit) as error:
        main(["--budgets", "10"])  # below what pruning first at layer 2 of 32 can reach
    assert error.value.code == 2 and "unreachable" in capsys.readouterr().err

    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(SystemExit, match="matplotlib"):
        main(["--plot", str(tmp_path / "no.png")])
