"""Measured speed of stock LLaVA vs ADSC-LLaVA at several budgets: same weights, same inputs, one run.

Usage:

```bash
python -m train.benchmark                                   # CPU: a random LLaVA whose LLM dominates (see below)
python -m train.benchmark --threads 2 --plot benchmark.png  # also draw measured vs ideal ratios
python -m train.benchmark --device cuda                     # GPU: LLaVA-1.5-7B-shaped, bf16, sdpa, batch 1 and 8
python -m train.benchmark --config tiny --repeats 1         # seconds: a smoke run
```

For every batch size the script builds ONE set of random weights, shared (the same tensors) by a stock
`transformers.LlavaForConditionalGeneration` and an `AdscLlavaForConditionalGeneration` whose schedule is switched
between the budgets (`default_pruning_layers`, `r` from `solve_drop_ratio`, as in `train.cost.schedule_for_budget`).
Each run is the loop `generate` runs, greedy: one prefill (`logits_to_keep=1`) and `G - 1` decode steps with a
`DynamicCache`. After `--warmup` untimed rounds, `--repeats` rounds time every model in turn (interleaved, so a change
of machine load hits all of them alike) and the medians are reported, each as a ratio to stock next to its ideal:

- prefill time vs the analytic prefill FLOPs ratio (`train.cost.estimate_cost`, `lm_head_positions="last"`);
- decode time per token vs the decode FLOPs ratio, and vs the bytes a decode step moves: the LLM's weights, read
  once, plus three times the KV cache (`DynamicCache` appends with `torch.cat`, which reads the old cache and writes
  the new one, and attention reads it). At batch 1 a decode step is bound by memory traffic, not FLOPs, so that is
  its realistic ideal;
- peak memory above the weights, measured in an extra untimed run. On CUDA: `torch.cuda.max_memory_allocated`
  minus what was allocated before (the caching allocator's own count, workspaces included). On CPU there is no
  allocator counter, and the process RSS is no honest measure (glibc keeps freed pages, so later models would reuse
  the memory of earlier ones): a `TorchDispatchMode` tracks every tensor storage the run creates and when it is freed,
  and the peak of their sum is reported. It misses scratch memory kernels allocate internally (e.g. the CPU
  attention kernel's per-thread buffers), which is small next to the activations and the cache;
- the KV cache bytes actually held by the cache at the end (keys + values of every layer), which must equal the
  analytic figure exactly (the table says so, per row).

By default the image features are fed precomputed (`mm_encoder_outputs`), so the vision tower and projector are not
timed: they do the same work in both models (ADSC starts inside the LLM) and would only add the same constant to
every row. `--vision-tower` runs them on random pixels instead (the FLOPs ideal then includes them).

The pruning step itself (ADSC's bookkeeping: `image_token_offsets`, `vision_keep_pattern`, `prune_vision_tokens`,
`scatter_to_input_positions`, the per-stage `stage_causal_mask` and rotary embeddings) is timed by wrapping those
functions in an extra prefill and an extra decode step (synchronising the device around each call) and reported as a
share of that forward. "Extra over stock" leaves out the first mask and rotary embeddings of each forward, which stock
LLaVA computes too.

Defaults: on CPU a random LLaVA with 576 vision tokens per image, a Llama LLM of hidden 1024, 16 layers (so the
paper's `[2, 8, 16, 24]` of 32 scale to `[1, 4, 8, 12]` and budgets 192 / 128 / 64 give the paper's schedules), 16
heads, intermediate 2752, vocab 32064, fp32, sdpa, T = 58, G = 32, batch 1. With `--device cuda`: the shipped
LLaVA-1.5-7B config in bf16 with random weights, sdpa, G = 64, batch 1 and 8.

On a CPU that other processes use, multi-threaded timings are unreliable: every parallel operator waits for its
slowest thread, and a descheduled thread turns microseconds into milliseconds. The output reports the load average
and warns when it was high at the start; `--threads 1` stays meaningful on a busy machine.
"""

import argparse
import gc
import os
import platform
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm.auto import tqdm
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling

from adsc_llava import AdscLlavaConfig, AdscLlavaForConditionalGeneration
from adsc_llava.configuration_adsc_llava import default_pruning_layers, validate_schedule
from train.cost import CostReport, LlavaDims, estimate_cost, format_schedule, load_config, schedule_for_budget

# Vision tokens per image of the presets: CLIP ViT-L/14 at 336 px, the CLS token dropped.
PRESET_IMAGE_SIZE, PRESET_PATCH_SIZE = 336, 14
PRESETS = ("cpu", "tiny")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Functions of the modeling module that make up ADSC's pruning step, looked up in the module the model comes from.
PRUNING_STEP_FUNCTIONS = (
    "image_token_offsets",
    "vision_keep_pattern",
    "prune_vision_tokens",
    "scatter_to_input_positions",
)
# Per-forward calls that stock LLaVA makes too (once, for layer 0): not counted as ADSC's extra work.
STOCK_ALSO_CALLS_ONCE = ("stage_causal_mask", "rotary_emb")
# Text tokens placed before the image(s), like "<s> USER:" in LLaVA's prompt; the rest of the prompt follows them.
PROMPT_PREFIX_TOKENS = 5
FIRST_WORD_ID = 3  # after <unk>, <s>, </s>


# ---------------------------------------------------------------------------------------------------------------
# Models and inputs
# ---------------------------------------------------------------------------------------------------------------


def preset_config(name: str) -> LlavaConfig:
    """The random-weight configs of the CPU benchmark (`"cpu"`) and of its smoke test (`"tiny"`).

    Both have 576 vision tokens per image. Their CLIP tower is minimal: by default it never runs (the image features
    are fed precomputed) and with `--vision-tower` it stays cheap next to the LLM.
    """
    if name == "cpu":
        text = dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=16, num_attention_heads=16)
        text.update(num_key_value_heads=16, vocab_size=32064)
    elif name == "tiny":
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=10, num_attention_heads=4)
        text.update(num_key_value_heads=4, vocab_size=512)
    else:
        raise ValueError(f"Unknown preset {name!r}: expected one of {', '.join(PRESETS)}.")
    vocab_size = text["vocab_size"]
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        image_size=PRESET_IMAGE_SIZE,
        patch_size=PRESET_PATCH_SIZE,
    )
    text_config = LlamaConfig(
        **text, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=vocab_size - 1
    )
    return LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=vocab_size - 64,  # 32000 for the 32064 vocabulary, as in LLaVA-1.5
        image_seq_length=(PRESET_IMAGE_SIZE // PRESET_PATCH_SIZE) ** 2,
        tie_word_embeddings=False,
    )


def benchmark_config(name_or_path: str) -> LlavaConfig:
    """A preset (`"cpu"`, `"tiny"`), a shipped reference config (`"llava-1.5-7b"`, ...) or a config path."""
    config = preset_config(name_or_path) if name_or_path in PRESETS else load_config(name_or_path)
    if isinstance(config, AdscLlavaConfig):  # the benchmark sets the schedules itself, from the stock config
        config_dict = config.to_dict()
        for key in ("adsc_pruning_layers", "adsc_drop_ratio", "model_type", "architectures", "auto_map"):
            config_dict.pop(key, None)
        config = LlavaConfig(**config_dict)
    return config


def share_parameters(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Make every parameter of `target` the very tensor of `source` with the same name (freeing target's own).

    Raises:
        ValueError: if the two models do not have the same parameter names and shapes.
    """
    source_parameters = dict(source.named_parameters(remove_duplicate=False))
    target_shapes = {name: param.shape for name, param in target.named_parameters(remove_duplicate=False)}
    if {name: param.shape for name, param in source_parameters.items()} != target_shapes:
        raise ValueError("The stock and ADSC models do not have the same parameters; they cannot share weights.")
    for name, param in source_parameters.items():
        module_name, _, param_name = name.rpartition(".")
        setattr(target.get_submodule(module_name), param_name, param)


def build_models(
    config: LlavaConfig, device: torch.device, dtype: torch.dtype, attn_implementation: str, seed: int
) -> tuple[LlavaForConditionalGeneration, AdscLlavaForConditionalGeneration]:
    """A stock LLaVA with random weights and an ADSC-LLaVA (empty schedule) sharing the very same weight tensors."""
    torch.manual_seed(seed)
    with torch.device(device):
        stock = LlavaForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation=attn_implementation
        )
        adsc = AdscLlavaForConditionalGeneration._from_config(
            AdscLlavaConfig.from_llava_config(config), dtype=dtype, attn_implementation=attn_implementation
        )
    share_parameters(stock, adsc)
    gc.collect()
    return stock.eval(), adsc.eval()


def make_inputs(
    config: LlavaConfig,
    *,
    prompt_tokens: int,
    num_images: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    vision_tower: bool,
    seed: int,
) -> dict:
    """Identical prompts of `prompt_tokens` random words with `num_images` images after the first few words.

    Returns the forward's keyword arguments: `input_ids` and `attention_mask` `(batch, T + images x tokens)`, and
    either `pixel_values` `(batch x images, 3, H, W)` (`vision_tower`) or `mm_encoder_outputs` holding the projected
    features, one `(tokens_per_image, hidden)` tensor per image.
    """
    dims = LlavaDims.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    high = min(config.text_config.vocab_size, config.image_token_id)
    words = torch.randint(FIRST_WORD_ID, high, (prompt_tokens,), generator=generator)
    image_tokens = torch.full((num_images * dims.vision_tokens_per_image,), config.image_token_id)
    split = min(PROMPT_PREFIX_TOKENS, prompt_tokens)
    row = torch.cat([words[:split], image_tokens, words[split:]])
    input_ids = row.repeat(batch_size, 1).to(device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if num_images == 0:
        return inputs
    if vision_tower:
        pixels = torch.randn(batch_size * num_images, 3, dims.image_size, dims.image_size, generator=generator)
        inputs["pixel_values"] = pixels.to(device, dtype)
    else:
        # Projected features of the scale of the token embeddings (`initializer_range`).
        features = torch.randn(num_images, dims.vision_tokens_per_image, dims.hidden_size, generator=generator)
        features = (features * config.text_config.initializer_range).to(device, dtype)
        pooled = [features[image] for _ in range(batch_size) for image in range(num_images)]
        inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=pooled)}
    return inputs


@contextmanager
def adsc_schedule(model: AdscLlavaForConditionalGeneration, pruning_layers: list[int], drop_ratio: float) -> Iterator:
    """Run `model` with another schedule for a while (the layer loop reads it from the config at every forward)."""
    config = model.config
    validate_schedule(config.text_config.num_hidden_layers, pruning_layers, drop_ratio)
    saved = (list(config.adsc_pruning_layers), config.adsc_drop_ratio)
    config.adsc_pruning_layers, config.adsc_drop_ratio = list(pruning_layers), float(drop_ratio)
    try:
        yield model
    finally:
        config.adsc_pruning_layers, config.adsc_drop_ratio = saved


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that wall-clock times cover them (a no-op on CPU)."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


# ---------------------------------------------------------------------------------------------------------------
# One generation
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class GenerationTiming:
    """Wall-clock seconds of one greedy generation and the cache it filled."""

    prefill_seconds: float
    decode_seconds_per_token: float
    cache: Cache


def next_tokens(logits: torch.Tensor, image_token_id: int) -> torch.LongTensor:
    """Greedy `(batch, 1)` next tokens from `(batch, 1, vocab)` logits, never the image placeholder.

    Random weights may well pick `<image>`; an image token without image features is an error in ADSC-LLaVA.
    """
    logits = logits[:, -1].clone()
    logits[:, image_token_id] = float("-inf")
    return logits.argmax(dim=-1, keepdim=True)


def greedy_generate(
    model: LlavaForConditionalGeneration,
    inputs: dict,
    new_tokens: int,
    device: torch.device,
    on_forward: Callable[[str], None] | None = None,
) -> GenerationTiming:
    """What `generate(max_new_tokens=new_tokens)` runs, greedy, timed: one prefill and `new_tokens - 1` decode steps.

    `on_forward("prefill" | "decode")` is called before each forward (the pruning-step timer marks forwards with it).
    """
    image_token_id = model.config.image_token_id
    attention_mask = inputs["attention_mask"]
    synchronize(device)
    start = time.perf_counter()
    if on_forward is not None:
        on_forward("prefill")
    output = model(**inputs, use_cache=True, logits_to_keep=1)
    tokens = next_tokens(output.logits, image_token_id)
    synchronize(device)
    prefill_end = time.perf_counter()
    cache = output.cache
    for _ in range(new_tokens - 1):
        attention_mask = torch.cat([attention_mask, torch.ones_like(tokens)], dim=1)
        if on_forward is not None:
            on_forward("decode")
        output = model(input_ids=tokens, attention_mask=attention_mask, cache=cache, use_cache=True, logits_to_keep=1)
        tokens = next_tokens(output.logits, image_token_id)
    synchronize(device)
    decode_seconds = time.perf_counter() - prefill_end
    return GenerationTiming(
        prefill_seconds=prefill_end - start,
        decode_seconds_per_token=decode_seconds / max(new_tokens - 1, 1),
        cache=cache,
    )


def cache_bytes_per_layer(cache: Cache) -> list[int]:
    """Bytes of keys plus values the cache holds in each layer."""
    return [layer.keys.nbytes + layer.values.nbytes for layer in cache.layers]


# ---------------------------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------------------------


class LiveTensorBytes(TorchDispatchMode):
    """Peak of the bytes of the tensor storages created inside this mode and alive at the same time.

    Every tensor an operator returns is looked at: a new storage (from an operator that does not alias its inputs)
    is counted from then until the last tracked tensor using it is freed. Views and in-place results of tracked
    storages keep them alive; those of storages created before the mode (weights, inputs) are not counted.
    """

    def __init__(self):
        super().__init__()
        self.current_bytes = 0
        self.peak_bytes = 0
        self._storage_bytes: dict[int, int] = {}  # storage address -> bytes
        self._storage_users: dict[int, int] = {}  # storage address -> tracked tensors alive
        self._tracked_tensors: set[int] = set()  # ids of the tensor objects tracked (alive)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        outputs = func(*args, **(kwargs or {}))
        aliases_inputs = any(result.alias_info is not None for result in func._schema.returns)
        for output in pytree.tree_leaves(outputs):
            if isinstance(output, torch.Tensor):
                self._track(output, aliases_inputs)
        return outputs

    def _track(self, tensor: torch.Tensor, aliases_inputs: bool) -> None:
        storage = tensor.untyped_storage()
        address, num_bytes = storage.data_ptr(), storage.nbytes()
        if id(tensor) in self._tracked_tensors or num_bytes == 0:
            return
        if address not in self._storage_bytes:
            if aliases_inputs:  # a view or in-place result of memory that existed before the mode
                return
            self._storage_bytes[address] = num_bytes
            self._storage_users[address] = 0
            self.current_bytes += num_bytes
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        self._storage_users[address] += 1
        self._tracked_tensors.add(id(tensor))
        weakref.finalize(tensor, self._release, id(tensor), address)

    def _release(self, tensor_id: int, address: int) -> None:
        self._tracked_tensors.discard(tensor_id)
        self._storage_users[address] -= 1
        if self._storage_users[address] == 0:
            self.current_bytes -= self._storage_bytes.pop(address)
            del self._storage_users[address]


def peak_memory_bytes(model, inputs: dict, new_tokens: int, device: torch.device) -> tuple[int, list[int]]:
    """Peak memory of one generation above what was allocated before it, and the KV bytes held per layer at its end.

    CUDA: the caching allocator's peak. CPU: `LiveTensorBytes` (see the module docstring for why).
    """
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        timing = greedy_generate(model, inputs, new_tokens, device)
        peak = torch.cuda.max_memory_allocated(device) - before
        return peak, cache_bytes_per_layer(timing.cache)
    with LiveTensorBytes() as tracker:
        timing = greedy_generate(model, inputs, new_tokens, device)
        kv_bytes = cache_bytes_per_layer(timing.cache)
        del timing
    return tracker.peak_bytes, kv_bytes


# ---------------------------------------------------------------------------------------------------------------
# The pruning step's own time
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PruningStepTimes:
    """Seconds spent in ADSC's pruning-step functions, per forward kind ("prefill", "decode")."""

    device: torch.device
    forward_kind: str = "prefill"
    calls_in_forward: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> function -> seconds
    extra_seconds: dict[str, float] = field(default_factory=dict)  # kind -> seconds stock LLaVA does not spend
    forwards: dict[str, int] = field(default_factory=dict)

    def begin_forward(self, kind: str) -> None:
        self.forward_kind = kind
        self.calls_in_forward = {}
        self.forwards[kind] = self.forwards.get(kind, 0) + 1

    def timed(self, name: str, function: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            synchronize(self.device)
            start = time.perf_counter()
            result = function(*args, **kwargs)
            synchronize(self.device)
            elapsed = time.perf_counter() - start
            per_function = self.seconds.setdefault(self.forward_kind, {})
            per_function[name] = per_function.get(name, 0.0) + elapsed
            call_index = self.calls_in_forward.get(name, 0)
            self.calls_in_forward[name] = call_index + 1
            if not (name in STOCK_ALSO_CALLS_ONCE and call_index == 0):
                self.extra_seconds[self.forward_kind] = self.extra_seconds.get(self.forward_kind, 0.0) + elapsed
            return result

        return wrapper

    def total_seconds(self, kind: str) -> float:
        return sum(self.seconds.get(kind, {}).values())


@contextmanager
def time_pruning_step(model: AdscLlavaForConditionalGeneration, device: torch.device) -> Iterator[PruningStepTimes]:
    """Wrap ADSC's pruning-step functions with timers while inside; everything is restored on exit."""
    adsc_model = model.model
    modeling = sys.modules[type(adsc_model).__module__]
    rotary = adsc_model.language_model.rotary_emb
    times = PruningStepTimes(device=device)
    originals = {name: getattr(modeling, name) for name in PRUNING_STEP_FUNCTIONS}
    try:
        for name, function in originals.items():
            setattr(modeling, name, times.timed(name, function))
        # Instance attributes shadow the method / the module's forward until deleted.
        adsc_model.stage_causal_mask = times.timed("stage_causal_mask", adsc_model.stage_causal_mask)
        rotary.forward = times.timed("rotary_emb", rotary.forward)
        yield times
    finally:
        for name, function in originals.items():
            setattr(modeling, name, function)
        adsc_model.__dict__.pop("stage_causal_mask", None)
        rotary.__dict__.pop("forward", None)


def measure_pruning_step(
    model: AdscLlavaForConditionalGeneration, inputs: dict, device: torch.device, repeats: int
) -> tuple[PruningStepTimes, float, float]:
    """Time the pruning step inside `repeats` instrumented generations of 2 tokens (a prefill and a decode step).

    Returns the times and the instrumented prefill and decode-step seconds they are a share of.
    """
    prefill_seconds = decode_seconds = 0.0
    with time_pruning_step(model, device) as times:
        for _ in range(repeats):
            timing = greedy_generate(model, inputs, 2, device, on_forward=times.begin_forward)
            prefill_seconds += timing.prefill_seconds
            decode_seconds += timing.decode_seconds_per_token
    return times, prefill_seconds, decode_seconds


# ---------------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One model of the comparison: stock LLaVA (`budget=None`) or ADSC at a budget."""

    label: str
    budget: float | None
    drop_ratio: float
    pruning_layers: list[int]
    schedule: list[int]


@dataclass
class BenchmarkRow:
    """Measured and analytic figures of one variant at one batch size."""

    variant: Variant
    batch_size: int
    report: CostReport
    prefill_seconds: float
    decode_seconds_per_token: float
    peak_memory_bytes: int
    kv_bytes_per_layer: list[int]
    decode_weight_bytes: int
    pruning_step: PruningStepTimes | None = None
    instrumented_prefill_seconds: float = 0.0
    instrumented_decode_seconds: float = 0.0

    @property
    def kv_bytes(self) -> int:
        return sum(self.kv_bytes_per_layer)

    @property
    def kv_matches_analytic(self) -> bool:
        return self.kv_bytes_per_layer == self.report.kv_cache_bytes_per_layer()

    def pruning_share(self, kind: str, extra_only: bool = False) -> float | None:
        """Share of the instrumented prefill / decode step spent in the pruning step (None for stock)."""
        if self.pruning_step is None:
            return None
        spent = self.pruning_step.extra_seconds.get(kind, 0.0) if extra_only else self.pruning_step.total_seconds(kind)
        total = self.instrumented_prefill_seconds if kind == "prefill" else self.instrumented_decode_seconds
        return spent / total if total > 0 else None


@dataclass
class BenchmarkSettings:
    config_name: str
    device: torch.device
    dtype: torch.dtype
    attn_implementation: str
    prompt_tokens: int
    new_tokens: int
    num_images: int
    batch_sizes: list[int]
    budgets: list[float]
    pruning_layers: list[int]
    repeats: int
    warmup: int
    vision_tower: bool
    seed: int


def benchmark_variants(config: LlavaConfig, budgets: list[float], pruning_layers: list[int]) -> list[Variant]:
    """Stock LLaVA first, then ADSC at each budget (`r` solved by `schedule_for_budget`)."""
    dims = LlavaDims.from_config(config)
    variants = [Variant("stock", None, 0.0, [], [dims.vision_tokens_per_image] * dims.num_layers)]
    for budget in budgets:
        drop_ratio, schedule = schedule_for_budget(config, budget, pruning_layers)
        variants.append(Variant(f"ADSC {budget:g}", budget, drop_ratio, list(pruning_layers), schedule))
    return variants


@contextmanager
def variant_model(variant: Variant, stock, adsc) -> Iterator:
    """The model that runs `variant`: the stock model, or the ADSC model with the variant's schedule."""
    if variant.budget is None:
        yield stock
    else:
        with adsc_schedule(adsc, variant.pruning_layers, variant.drop_ratio) as model:
            yield model


def run_benchmark(settings: BenchmarkSettings, progress: bool = True) -> list[BenchmarkRow]:
    """Run every variant at every batch size; see the module docstring for what is measured and how."""
    config = benchmark_config(settings.config_name)
    variants = benchmark_variants(config, settings.budgets, settings.pruning_layers)
    stock, adsc = build_models(config, settings.device, settings.dtype, settings.attn_implementation, settings.seed)
    rounds = settings.warmup + settings.repeats
    steps_per_batch = rounds * len(variants) + 2 * len(variants) - 1  # timed rounds, memory runs, pruning timers
    rows = []
    with (
        torch.inference_mode(),
        tqdm(total=steps_per_batch * len(settings.batch_sizes), desc="benchmark", disable=not progress) as bar,
    ):
        for batch_size in settings.batch_sizes:
            inputs = make_inputs(
                config,
                prompt_tokens=settings.prompt_tokens,
                num_images=settings.num_images,
                batch_size=batch_size,
                device=settings.device,
                dtype=settings.dtype,
                vision_tower=settings.vision_tower,
                seed=settings.seed,
            )
            timings: dict[str, list[GenerationTiming]] = {variant.label: [] for variant in variants}
            for round_index in range(rounds):
                for variant in variants:
                    phase = (
                        "warm-up" if round_index < settings.warmup else f"round {round_index - settings.warmup + 1}"
                    )
                    bar.set_postfix_str(f"batch {batch_size}, {phase}, {variant.label}")
                    with variant_model(variant, stock, adsc) as model:
                        timing = greedy_generate(model, inputs, settings.new_tokens, settings.device)
                    timing.cache = None  # free it before the next run
                    if round_index >= settings.warmup:
                        timings[variant.label].append(timing)
                    bar.update()
            for variant in variants:
                bar.set_postfix_str(f"batch {batch_size}, peak memory, {variant.label}")
                with variant_model(variant, stock, adsc) as model:
                    peak, kv_bytes = peak_memory_bytes(model, inputs, settings.new_tokens, settings.device)
                bar.update()
                row = BenchmarkRow(
                    variant=variant,
                    batch_size=batch_size,
                    report=estimate_cost(
                        config,
                        prompt_tokens=settings.prompt_tokens,
                        new_tokens=settings.new_tokens,
                        schedule=variant.schedule,
                        num_images=settings.num_images,
                        batch_size=batch_size,
                        kv_dtype=settings.dtype,
                        lm_head_positions="last",  # the prefill keeps the last logits, as generate does
                    ),
                    prefill_seconds=statistics.median(t.prefill_seconds for t in timings[variant.label]),
                    decode_seconds_per_token=statistics.median(
                        t.decode_seconds_per_token for t in timings[variant.label]
                    ),
                    peak_memory_bytes=peak,
                    kv_bytes_per_layer=kv_bytes,
                    decode_weight_bytes=decode_weight_bytes(stock),
                )
                if variant.budget is not None:
                    bar.set_postfix_str(f"batch {batch_size}, pruning step, {variant.label}")
                    with variant_model(variant, stock, adsc) as model:
                        times, prefill_seconds, decode_seconds = measure_pruning_step(
                            model, inputs, settings.device, settings.repeats
                        )
                    row.pruning_step = times
                    row.instrumented_prefill_seconds = prefill_seconds
                    row.instrumented_decode_seconds = decode_seconds
                    bar.update()
                rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights a decode step reads: every decoder layer, the final norm and the lm_head.

    The token embedding (one row read) and the vision tower (idle while decoding) are left out.
    """
    language_model = model.model.language_model
    modules = [language_model.layers, language_model.norm, model.lm_head]
    return sum(param.nbytes for module in modules for param in module.parameters())


def decode_moved_bytes(report: CostReport, weight_bytes: int) -> float:
    """Mean bytes one decode step moves: the weights once, and the KV cache three times.

    Step `s` appends one position to every layer with `torch.cat` (`DynamicCache`), which reads the `s`-step cache
    and writes the `s + 1`-step one; attention then reads the `s + 1`-step cache.
    """
    if report.num_decode_steps == 0:
        return float(weight_bytes)
    kv_traffic = [
        (2 * sum(report.cache_lengths(step + 1)) + sum(report.cache_lengths(step))) * report.kv_bytes_per_position
        for step in range(report.num_decode_steps)
    ]
    return weight_bytes + sum(kv_traffic) / len(kv_traffic)


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.3f}" if baseline else "-"


def prefill_ideal_flops(row: BenchmarkRow, vision_tower: bool) -> int:
    """The prefill FLOPs of what was timed: the LLM, plus the vision tower and projector when they ran."""
    return row.report.prefill_flops if vision_tower else row.report.llm_prefill_flops


def mean_decode_flops(report: CostReport) -> float:
    return report.decode_flops / report.num_decode_steps if report.num_decode_steps else 0.0


def format_percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.2f}%"


def format_table(rows: list[BenchmarkRow], weight_bytes: int, vision_tower: bool) -> str:
    """The Markdown table: one row per (batch size, model), ratios to the stock row of the same batch size."""
    header = [
        "batch",
        "model",
        "r",
        "vision tokens per layer",
        "prefill ms",
        "x stock",
        "ideal (FLOPs)",
        "decode ms/token",
        "x stock",
        "ideal (FLOPs)",
        "ideal (bytes moved)",
        "peak MB",
        "x stock",
        "KV MB held",
        "x stock",
        "KV = analytic",
        "pruning step, % of prefill",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    stock_rows = {row.batch_size: row for row in rows if row.variant.budget is None}
    for row in rows:
        stock = stock_rows[row.batch_size]
        cells = [
            str(row.batch_size),
            row.variant.label,
            f"{row.variant.drop_ratio:.4g}",
            format_schedule(row.variant.schedule),
            f"{1e3 * row.prefill_seconds:.1f}",
            ratio(row.prefill_seconds, stock.prefill_seconds),
            ratio(prefill_ideal_flops(row, vision_tower), prefill_ideal_flops(stock, vision_tower)),
            f"{1e3 * row.decode_seconds_per_token:.2f}",
            ratio(row.decode_seconds_per_token, stock.decode_seconds_per_token),
            ratio(mean_decode_flops(row.report), mean_decode_flops(stock.report)),
            ratio(decode_moved_bytes(row.report, weight_bytes), decode_moved_bytes(stock.report, weight_bytes)),
            f"{row.peak_memory_bytes / 1e6:.1f}",
            ratio(row.peak_memory_bytes, stock.peak_memory_bytes),
            f"{row.kv_bytes / 1e6:.2f}",
            ratio(row.kv_bytes, stock.kv_bytes),
            "yes" if row.kv_matches_analytic else "NO",
            format_percent(row.pruning_share("prefill")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_pruning_table(rows: list[BenchmarkRow]) -> str:
    """Where the pruning step's time goes: per function, in the instrumented prefill and decode step."""
    names = [*PRUNING_STEP_FUNCTIONS, *STOCK_ALSO_CALLS_ONCE]
    header = ["batch", "model", "kind", "forward ms", *[f"{name} ms" for name in names], "all %", "extra over stock %"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        times = row.pruning_step
        if times is None:
            continue
        for kind, total in (
            ("prefill", row.instrumented_prefill_seconds),
            ("decode", row.instrumented_decode_seconds),
        ):
            forwards = max(times.forwards.get(kind, 0), 1)
            per_function = times.seconds.get(kind, {})
            cells = [
                str(row.batch_size),
                row.variant.label,
                kind,
                f"{1e3 * total / forwards:.2f}",
                *[f"{1e3 * per_function.get(name, 0.0) / forwards:.3f}" for name in names],
                format_percent(row.pruning_share(kind)),
                format_percent(row.pruning_share(kind, extra_only=True)),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_average() -> float | None:
    """The 1-minute load average (processes running or waiting for a CPU), where the system reports one."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def describe_machine(device: torch.device, load_at_start: float | None) -> str:
    """One line on what ran the benchmark: device, threads, load, library versions."""
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        where = f"CPU {cpu_model_name()} x{os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"
    load = (
        ""
        if load_at_start is None
        else f", 1-min load average {load_at_start:.2f} at start, {load_average():.2f} at end"
    )
    return (
        f"{where}{load} | {platform.system()} {platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )


def busy_machine_warning(device: torch.device, load_at_start: float | None) -> str | None:
    """A warning when other processes used the CPU at the start of a multi-threaded CPU run, else None.

    With more than one torch thread, every parallel operator waits for its slowest thread; on a CPU that other
    processes also use, a thread is often descheduled, and small operators then take milliseconds instead of
    microseconds. Such timings say little about the models.
    """
    if device.type != "cpu" or torch.get_num_threads() == 1 or load_at_start is None or load_at_start < 0.5:
        return None
    return (
        f"WARNING: the load average was {load_at_start:.2f} when the run started ({os.cpu_count()} logical cores): "
        f"other processes competed for the CPU, which distorts timings with {torch.get_num_threads()} threads. "
        "Rerun on an idle machine, or with --threads 1."
    )


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo where there is one, else what `platform` says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def write_plot(rows: list[BenchmarkRow], path: Path, weight_bytes: int, vision_tower: bool) -> None:
    """A PNG per batch size: measured ratios to stock (prefill, decode, peak memory, KV) next to their ideals."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit(
            f"--plot needs matplotlib, which is not installed ({error}): `pip install matplotlib`."
        ) from error
    batch_sizes = sorted({row.batch_size for row in rows})
    figure, axes = plt.subplots(1, len(batch_sizes), figsize=(7 * len(batch_sizes), 4), squeeze=False)
    for axis, batch_size in zip(axes[0], batch_sizes, strict=True):
        batch_rows = [row for row in rows if row.batch_size == batch_size]
        stock = next(row for row in batch_rows if row.variant.budget is None)
        pruned = [row for row in batch_rows if row.variant.budget is not None]
        budgets = [row.variant.budget for row in pruned]
        series = {
            "prefill time": [row.prefill_seconds / stock.prefill_seconds for row in pruned],
            "prefill FLOPs (ideal)": [
                prefill_ideal_flops(row, vision_tower) / prefill_ideal_flops(stock, vision_tower) for row in pruned
            ],
            "decode time": [row.decode_seconds_per_token / stock.decode_seconds_per_token for row in pruned],
            "decode bytes moved (ideal)": [
                decode_moved_bytes(row.report, weight_bytes) / decode_moved_bytes(stock.report, weight_bytes)
                for row in pruned
            ],
            "peak memory": [row.peak_memory_bytes / stock.peak_memory_bytes for row in pruned],
            "KV cache": [row.kv_bytes / stock.kv_bytes for row in pruned],
        }
        for name, values in series.items():
            axis.plot(budgets, values, "--x" if "ideal" in name else "-o", label=name)
        axis.set(
            xlabel="budget (average vision tokens per layer)",
            ylabel="ratio to stock LLaVA",
            title=f"batch {batch_size}",
            ylim=(0, 1.1),
        )
        axis.invert_xaxis()
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.benchmark",
        description="Measured prefill / decode time and memory of stock LLaVA vs ADSC-LLaVA at several budgets.",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N.")
    parser.add_argument(
        "--config",
        default=None,
        help=f"A preset ({', '.join(PRESETS)}), a shipped config (llava-1.5-7b, llava-1.5-13b), a config.json or a "
        "checkpoint folder (random weights are used in every case). Default: cpu on CPU, llava-1.5-7b on CUDA.",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="Default: float32 on CPU, else bf16.")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="Attention implementation.")
    parser.add_argument("--budgets", type=float, nargs="+", default=[192, 128, 64], help="ADSC budgets to compare.")
    parser.add_argument(
        "--pruning-layers",
        type=int,
        nargs="+",
        default=None,
        help="Default: the paper's [2, 8, 16, 24] of 32 scaled to the depth (default_pruning_layers).",
    )
    parser.add_argument("--prompt-tokens", type=int, default=58, help="Text tokens per prompt (T).")
    parser.add_argument("--new-tokens", type=int, default=None, help="Generated tokens (G). Default: 32 CPU, 64 GPU.")
    parser.add_argument("--num-images", type=int, default=1, help="Images per prompt.")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=None, help="Default: 1 on CPU, 1 and 8 on a GPU."
    )
    parser.add_argument("--repeats", type=int, default=3, help="Timed rounds; medians are reported.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed rounds first.")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU).")
    parser.add_argument(
        "--vision-tower",
        action="store_true",
        help="Run the vision tower and projector on random pixels instead of feeding precomputed image features.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=None, help="Write a PNG of the ratios here (needs matplotlib).")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    return parser


def settings_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BenchmarkSettings:
    """Fill the device-dependent defaults and check the arguments; bad values end with a usage error."""
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {error}")
    on_gpu = device.type != "cpu"
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but torch sees no CUDA device.")
    for name in ("prompt_tokens", "num_images"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}.")
    for name, minimum in (("repeats", 1), ("warmup", 0)):
        if getattr(args, name) < minimum:
            parser.error(f"--{name} must be >= {minimum}, got {getattr(args, name)}.")
    new_tokens = args.new_tokens if args.new_tokens is not None else (64 if on_gpu else 32)
    if new_tokens < 2:
        parser.error(f"--new-tokens must be >= 2 (one prefill and at least one decode step), got {new_tokens}.")
    batch_sizes = args.batch_sizes or ([1, 8] if on_gpu else [1])
    if min(batch_sizes) < 1:
        parser.error(f"--batch-sizes must be >= 1, got {batch_sizes}.")
    if not args.budgets:
        parser.error("--budgets needs at least one budget.")
    config_name = args.config or ("llava-1.5-7b" if on_gpu else "cpu")
    try:
        config = benchmark_config(config_name)
        num_layers = LlavaDims.from_config(config).num_layers
        pruning_layers = args.pruning_layers or default_pruning_layers(num_layers)
        validate_schedule(num_layers, pruning_layers, 0.0)
        benchmark_variants(config, args.budgets, pruning_layers)  # unreachable budgets fail here, before any work
    except ValueError as error:
        parser.error(str(error))
    return BenchmarkSettings(
        config_name=config_name,
        device=device,
        dtype=DTYPES[args.dtype or ("bfloat16" if on_gpu else "float32")],
        attn_implementation=args.attn,
        prompt_tokens=args.prompt_tokens,
        new_tokens=new_tokens,
        num_images=args.num_images,
        batch_sizes=batch_sizes,
        budgets=args.budgets,
        pruning_layers=pruning_layers,
        repeats=args.repeats,
        warmup=args.warmup,
        vision_tower=args.vision_tower,
        seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}.")
        torch.set_num_threads(args.threads)
    settings = settings_from_args(args, parser)
    load_at_start = load_average()
    started = time.perf_counter()
    rows = run_benchmark(settings, progress=not args.no_progress)
    elapsed = time.perf_counter() - started

    dims = LlavaDims.from_config(benchmark_config(settings.config_name))
    weight_bytes = rows[0].decode_weight_bytes
    vision_tower = "timed" if settings.vision_tower else "not run (features fed)"
    print(f"machine: {describe_machine(settings.device, load_at_start)}")
    print(
        f"model: {settings.config_name} with random weights, {dims.num_layers} layers, hidden {dims.hidden_size}, "
        f"{dims.num_attention_heads} heads ({dims.num_key_value_heads} KV), intermediate {dims.intermediate_size}, "
        f"vocab {dims.vocab_size}, {dims.vision_tokens_per_image} vision tokens per image | {settings.dtype}, "
        f"{settings.attn_implementation} attention, device {settings.device}"
    )
    print(
        f"run: T = {settings.prompt_tokens} text tokens, {settings.num_images} image(s), "
        f"G = {settings.new_tokens} new tokens (1 prefill + {settings.new_tokens - 1} decode steps, greedy), "
        f"pruning layers {settings.pruning_layers}, vision tower {vision_tower}, "
        f"median of {settings.repeats} round(s) after {settings.warmup} warm-up round(s); wall time {elapsed:.0f} s\n"
    )
    warning = busy_machine_warning(settings.device, load_at_start)
    if warning is not None:
        print(f"{warning}\n")
    print(format_table(rows, weight_bytes, settings.vision_tower))
    print(
        "\nx stock: this row / the stock row of the same batch size. Ideals: analytic FLOPs (train.cost, lm_head on "
        "the last prefill position as generate does) and, for decode, bytes moved per step (decoder + lm_head weights "
        f"{weight_bytes / 1e6:.0f} MB, plus 3x the KV cache: read and written by DynamicCache's torch.cat, read by "
        "attention). Peak MB: above the weights, "
        + (
            "torch.cuda.max_memory_allocated."
            if settings.device.type == "cuda"
            else "tensor storages alive at once (a TorchDispatchMode count; see train/benchmark.py)."
        )
        + " KV MB held: keys + values in the cache after the last decode step."
    )
    print("\nPruning step (ADSC bookkeeping), per forward, timed with the device synchronised around each call:\n")
    print(format_pruning_table(rows))
    if args.plot is not None:
        write_plot(rows, args.plot, weight_bytes, settings.vision_tower)
        print(f"\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
