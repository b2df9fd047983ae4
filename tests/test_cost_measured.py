"""ADSC-LLaVA measured against the analytic cost model (`adsc_llava.cost`), and a smoke run of `adsc-llava bench`.

`FlopCounterMode` (eager attention on CPU: it does not count the CPU sdpa kernel) counts exactly the analytic FLOPs of
every component of tiny and small random ADSC models, under several schedules, in a prefill, in each decode step
with a `DynamicCache` and in a whole `generate`; the cache holds exactly the analytic KV bytes per layer. Batch 1
without padding: the analytic model assumes rows of identical length.

Which lm_head convention applies: ADSC computes logits at every input position (a dropped vision token carries the
hidden state it had when dropped), so a prefill with `logits_to_keep=0` runs the lm_head on all `T + images x tokens`
input positions, while the paper's (DeepSpeed's) `lm_head_positions="all"` counts the `T + images x n_last`
positions that reach the last layer; the difference is exactly the dropped positions. `generate` passes
`logits_to_keep=1`, which is `lm_head_positions="last"` exactly, and a decode step feeds one token, so both
conventions agree there.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlamaConfig

from adsc_llava import AdscLlavaConfig, AdscLlavaForConditionalGeneration
from adsc_llava.benchmarks import speed as benchmark
from adsc_llava.configuration_adsc_llava import default_pruning_layers
from adsc_llava.cost import LlavaDims, estimate_cost, lm_head_flops

from conftest import IMAGE_TOKEN_ID, PAD_TOKEN_ID, TOKENS_PER_IMAGE, make_batch, stock_twin, tiny_adsc_model

# A word that is neither special nor the image placeholder, fed in the decode steps (FLOPs do not depend on it).
DECODE_TOKEN_ID = 7

SMALL_IMAGE_TOKEN_ID = 120
SMALL_NUM_LAYERS = 6
SMALL_BUDGET = 12.0  # of 37 vision tokens per image

CASES = {
    # The tiny conftest model: 4 layers, grouped-query attention, 16 vision tokens per image.
    "tiny_layers_1_3_r0.5": dict(model="tiny", pruning_layers=[1, 3], drop_ratio=0.5, num_images=1),
    "tiny_layers_1_2_3_r0.3_bf16": dict(
        model="tiny", pruning_layers=[1, 2, 3], drop_ratio=0.3, num_images=1, dtype=torch.bfloat16
    ),
    "tiny_all_vision_dropped": dict(model="tiny", pruning_layers=[1], drop_ratio=0.99, num_images=1),
    "tiny_empty_schedule": dict(model="tiny", pruning_layers=[], drop_ratio=0.0, num_images=1),
    # A small model: 6 layers, multi-head attention, CLS kept and two feature layers (37 odd-spaced vision tokens),
    # the schedule solved for a budget.
    "small_budget": dict(model="small", budget=SMALL_BUDGET, num_images=1),
    "small_two_images": dict(model="small", pruning_layers=[2, 4], drop_ratio=0.4, num_images=2),
}


def small_adsc_model(pruning_layers: list[int], drop_ratio: float) -> AdscLlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=48,
        patch_size=8,
        projection_dim=16,
    )
    text = LlamaConfig(
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=SMALL_NUM_LAYERS,
        num_attention_heads=6,
        num_key_value_heads=6,
        vocab_size=128,
        max_position_embeddings=512,
        pad_token_id=PAD_TOKEN_ID,
    )
    config = AdscLlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=SMALL_IMAGE_TOKEN_ID,
        image_seq_length=37,
        vision_feature_layer=[-2, -1],
        vision_feature_select_strategy="full",
        adsc_pruning_layers=pruning_layers,
        adsc_drop_ratio=drop_ratio,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return AdscLlavaForConditionalGeneration(config).eval()


def small_inputs(model: AdscLlavaForConditionalGeneration, num_images: int) -> dict[str, torch.Tensor]:
    tokens_per_image = LlavaDims.from_config(model.config).vision_tokens_per_image
    row = [1, 5, 6]
    for _ in range(num_images):
        row += [SMALL_IMAGE_TOKEN_ID] * tokens_per_image + [8]
    input_ids = torch.tensor([row + [9, 10, 11, 12]])
    image_size = model.config.vision_config.image_size
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(num_images, 3, image_size, image_size, generator=generator),
    }


def build_case(name: str) -> tuple[AdscLlavaForConditionalGeneration, dict[str, torch.Tensor], int]:
    """The case's model (eager attention) and batch-1 unpadded inputs, and T (text tokens of the prompt)."""
    case = CASES[name]
    if case["model"] == "tiny":
        model = tiny_adsc_model(
            pruning_layers=case["pruning_layers"], drop_ratio=case["drop_ratio"], attn_implementation="eager"
        )
        inputs = make_batch([case["num_images"]], text_lengths=[5])
    else:
        pruning_layers, drop_ratio = case.get("pruning_layers"), case.get("drop_ratio")
        if "budget" in case:
            pruning_layers = default_pruning_layers(SMALL_NUM_LAYERS)
            reference = small_adsc_model([], 0.0).config
            drop_ratio = reference.with_budget(case["budget"], pruning_layers).adsc_drop_ratio
        model = small_adsc_model(pruning_layers, drop_ratio)
        inputs = small_inputs(model, case["num_images"])
    dtype = case.get("dtype", torch.float32)
    model = model.to(dtype)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    tokens_per_image = LlavaDims.from_config(model.config).vision_tokens_per_image
    return model, inputs, inputs["input_ids"].shape[1] - case["num_images"] * tokens_per_image


def case_report(model, prompt_tokens: int, name: str, new_tokens: int, lm_head_positions: str):
    # schedule=None: the analytic schedule comes from the model's own config (adsc_pruning_layers / adsc_drop_ratio).
    return estimate_cost(
        model.config,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        num_images=CASES[name]["num_images"],
        kv_dtype=CASES[name].get("dtype", torch.float32),
        lm_head_positions=lm_head_positions,
    )


def module_flops(counter: FlopCounterMode, model: torch.nn.Module, name: str) -> int:
    return sum(counter.get_flop_counts()[f"{type(model).__name__}.{name}"].values())


def cache_bytes_per_layer(cache) -> list[int]:
    return [layer.keys.nbytes + layer.values.nbytes for layer in cache.layers]


def test_cases_cover_the_schedules_asked_for():
    schedules = {name: case_report(*build_case(name)[::2], name, 1, "all").vision_tokens_per_layer for name in CASES}
    assert schedules["tiny_layers_1_3_r0.5"] == [16, 8, 8, 4]
    assert schedules["tiny_all_vision_dropped"] == [16, 0, 0, 0]
    assert schedules["tiny_empty_schedule"] == [16] * 4
    assert sum(schedules["small_budget"]) / SMALL_NUM_LAYERS <= SMALL_BUDGET < 37


@pytest.mark.parametrize("name", sorted(CASES))
def test_prefill_flops_and_kv_bytes_match(name):
    model, inputs, prompt_tokens = build_case(name)
    dims = LlavaDims.from_config(model.config)
    report = case_report(model, prompt_tokens, name, new_tokens=1, lm_head_positions="all")
    input_positions = inputs["input_ids"].shape[1]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        output = model(**inputs, use_cache=True, logits_to_keep=0)

    assert module_flops(counter, model, "model.vision_tower") == report.vision_tower_flops
    assert module_flops(counter, model, "model.multi_modal_projector") == report.projector_flops
    for layer_idx, expected in enumerate(report.prefill_layer_flops):
        assert module_flops(counter, model, f"model.language_model.layers.{layer_idx}") == expected
    # Logits at every input position: the lm_head also runs on the vision positions dropped before the last layer.
    dropped_positions = input_positions - report.prefill_tokens_per_layer[-1]
    assert output.logits.shape[1] == input_positions
    assert module_flops(counter, model, "lm_head") == lm_head_flops(dims, input_positions)
    assert counter.get_total_flops() == report.prefill_flops + lm_head_flops(dims, dropped_positions)
    assert cache_bytes_per_layer(output.cache) == report.kv_cache_bytes_per_layer(decode_steps=0)

    # What generate runs: logits at the last position only, the analytic "last" convention exactly.
    last = case_report(model, prompt_tokens, name, new_tokens=1, lm_head_positions="last")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs, use_cache=True, logits_to_keep=1)
    assert counter.get_total_flops() == last.prefill_flops


@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_steps_flops_and_kv_bytes_match(name):
    model, inputs, prompt_tokens = build_case(name)
    new_tokens = 4
    report = case_report(model, prompt_tokens, name, new_tokens=new_tokens, lm_head_positions="last")
    with torch.no_grad():
        cache = model(**inputs, use_cache=True, logits_to_keep=1).cache
        attention_mask = inputs["attention_mask"]
        for step in range(1, new_tokens):
            token = torch.full((1, 1), DECODE_TOKEN_ID)
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=1)
            with FlopCounterMode(display=False) as counter:
                model(input_ids=token, attention_mask=attention_mask, cache=cache, use_cache=True)
            for layer_idx, expected in enumerate(report.decode_layer_flops[step - 1]):
                assert module_flops(counter, model, f"model.language_model.layers.{layer_idx}") == expected
            assert counter.get_total_flops() == report.decode_step_flops[step - 1]
            assert cache_bytes_per_layer(cache) == report.kv_cache_bytes_per_layer(decode_steps=step)
    # Every layer's cache grew by exactly the fed tokens, from a prefill length that follows the schedule.
    assert [layer.keys.shape[-2] for layer in cache.layers] == report.cache_lengths()


@pytest.mark.parametrize("name", sorted(CASES))
def test_generate_flops_and_peak_kv_bytes_match(name):
    model, inputs, prompt_tokens = build_case(name)
    new_tokens = 5
    report = case_report(model, prompt_tokens, name, new_tokens=new_tokens, lm_head_positions="last")
    generate_kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        # A random model may pick the image placeholder, which ADSC rejects without image features.
        suppress_tokens=[model.config.image_token_id],
        return_dict_in_generate=True,
    )
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        output = model.generate(**inputs, **generate_kwargs)
    assert output.sequences.shape[1] == inputs["input_ids"].shape[1] + new_tokens
    assert counter.get_total_flops() == report.total_flops
    assert cache_bytes_per_layer(output.cache) == report.kv_cache_bytes_per_layer()

    if not model.config.adsc_pruning_layers:  # stock-equivalent: the same count and tokens as stock LLaVA
        stock = stock_twin(model)
        stock.generation_config.eos_token_id = None
        with torch.no_grad(), FlopCounterMode(display=False) as stock_counter:
            stock_output = stock.generate(**inputs, **generate_kwargs)
        assert stock_counter.get_total_flops() == counter.get_total_flops()
        assert torch.equal(stock_output.sequences, output.sequences)


def test_tiny_constants_match_the_cases():
    # The tiny cases rely on the conftest model's 16 vision tokens and image token id.
    model, inputs, _ = build_case("tiny_layers_1_3_r0.5")
    assert LlavaDims.from_config(model.config).vision_tokens_per_image == TOKENS_PER_IMAGE
    assert int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum()) == TOKENS_PER_IMAGE


# --------------------------------------------------------------------------------------------------------------
# adsc-llava bench: a smoke run on the tiny preset (not a timing test)
# --------------------------------------------------------------------------------------------------------------


def table_rows(printed: str, first_header: str) -> list[dict[str, str]]:
    """The rows of the Markdown table whose header starts with `first_header`, as dicts keyed by column names."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def test_benchmark_smoke_run(capsys, tmp_path):
    argv = ["--config", "tiny", "--repeats", "1", "--warmup", "0", "--new-tokens", "3", "--no-progress"]
    # One thread: the tiny model gains nothing from two, and on a busy machine two threads wait for each other.
    threads = torch.get_num_threads()
    try:
        assert benchmark.main([*argv, "--threads", "1", "--plot", str(tmp_path / "ratios.png")]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out

    rows = table_rows(printed, "batch")
    assert [row["model"] for row in rows] == ["stock", "ADSC 192", "ADSC 128", "ADSC 64"]
    assert all(row["batch"] == "1" and row["KV = analytic"] == "yes" for row in rows)
    stock, pruned = rows[0], rows[1:]
    assert stock["vision tokens per layer"] == "576x10" and stock["x stock"] == "1.000"
    # Stock LLaVA reads its feature count; counted outside the bench's inference_mode, where the counter sees nothing.
    assert (stock["syncs: prefill"], stock["syncs: decode step"]) == ("2", "0")
    kv_megabytes = [float(row["KV MB held"]) for row in rows]
    assert all(kv < kv_megabytes[0] for kv in kv_megabytes[1:])
    assert kv_megabytes[1:] == sorted(kv_megabytes[1:], reverse=True)  # smaller budget, smaller cache
    for row in pruned:
        assert float(row["peak MB"]) < float(stock["peak MB"])
        assert float(row["peak MB"]) >= float(row["KV MB held"])  # the cache is alive at the end
        assert row["pruning step, % of prefill"].endswith("%")
        assert (row["syncs: prefill"], row["syncs: decode step"]) == ("1", "0")  # the one read of the unit plan
    # Times of the modeling file's profiler ranges, for the prefill and a decode step of each budget.
    pruning_rows = table_rows(printed, "batch | model | kind")
    assert [(row["model"], row["kind"]) for row in pruning_rows] == [
        (f"ADSC {budget}", kind) for budget in (192, 128, 64) for kind in ("prefill", "decode")
    ]
    for row in pruning_rows:
        pruned_here = row["kind"] == "prefill"  # a decode step has no vision tokens to drop
        assert (float(row["adsc::prune_vision_tokens ms"]) > 0) == pruned_here
        assert float(row["adsc::unit_plan ms"]) > 0  # every forward plans its stages on the host, decode steps too
        assert float(row["adsc::stage_causal_mask ms"]) > 0  # every stage builds its mask, decode steps too
        assert 0 < float(row["all %"].rstrip("%")) < 100
    assert (tmp_path / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_benchmark_times_the_baselines_on_their_own_layers(capsys):
    argv = ["--config", "tiny", "--repeats", "1", "--warmup", "0", "--new-tokens", "3", "--no-progress"]
    threads = torch.get_num_threads()
    try:
        assert benchmark.main([*argv, "--threads", "1", "--budgets", "192", "64", "--baselines", "fastv",
                               "pyramiddrop"]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    rows = {row["model"]: row for row in table_rows(printed, "batch")}
    # PyramidDrop's layers [2, 5, 8] of 10 cannot go below 115.2 tokens per layer: 64 is listed, not timed.
    assert list(rows) == ["stock", "ADSC 192", "ADSC 64", "FastV 192", "FastV 64", "PyramidDrop 192"]
    assert "PyramidDrop: pruning layers [2, 5, 8]; budgets [64.0] left out: these layers reach [115.2, 576)" in printed
    assert rows["FastV 192"]["vision tokens per layer"] == "576x1, 149x9"
    assert all(row["KV = analytic"] == "yes" for row in rows.values())
    # The same budget gives the same KV cache whatever the policy and its layers.
    assert rows["FastV 192"]["KV MB held"] == rows["ADSC 192"]["KV MB held"]
    assert rows["FastV 64"]["KV MB held"] == rows["ADSC 64"]["KV MB held"]


def test_benchmark_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as error:
        benchmark.main(["--config", "tiny", "--budgets", "10"])  # below what pruning first at layer 1 of 10 reaches
    assert error.value.code == 2 and "unreachable" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:
        benchmark.main(["--config", "tiny", "--new-tokens", "1"])
    assert error.value.code == 2 and "--new-tokens" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as error:
            benchmark.main(["--device", "cuda"])
        assert "CUDA" in capsys.readouterr().err


def test_profile_measure_passes_its_settings_to_the_benchmark():
    from adsc_llava.cost_table import benchmark_argv, build_parser

    args = build_parser().parse_args(["--budgets", "192", "64", "--new-tokens", "8", "--measure", "cpu"])
    argv = benchmark_argv(args)
    parsed = benchmark.build_parser().parse_args(argv)
    assert (parsed.device, parsed.budgets, parsed.new_tokens, parsed.prompt_tokens) == ("cpu", [192, 64], 8, 58)
    assert parsed.config is None and parsed.pruning_layers is None  # the CPU preset's own depth and layers
    cuda = benchmark_argv(build_parser().parse_args(["--measure", "cuda", "--pruning-layers", "2", "8"]))
    parsed = benchmark.build_parser().parse_args(cuda)
    assert parsed.config == "llava-1.5-7b" and parsed.pruning_layers == [2, 8]
