"""The time ADSC's own bookkeeping takes inside a forward, read from the modeling file's `torch.profiler` ranges.

The modeling file wraps its work in named ranges (`PROFILER_RANGES`): finding each image's tokens, each pruning
layer's compaction (with that stage's rotary embeddings), each stage's causal mask, and the final scatter of every
token's output to its input position. One profiled prefill and one profiled decode step show how long each range
took. Stock LLaVA builds one causal mask per forward too, so only the masks beyond the first count as ADSC's extra
work. On CUDA the ranges measure host time (kernel launches and the few synchronising calls); the kernels they launch
are small gathers next to the layers'.
"""

import time
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile

from adsc_llava.benchmarks.generation import next_tokens, synchronize, without_unneeded_mask
from adsc_llava.modeling_adsc_llava import PROFILER_RANGES

FORWARD_KINDS = ("prefill", "decode")


@dataclass
class PruningStepTimes:
    """Seconds per forward, for each forward kind ("prefill", "decode"): the whole profiled forward and each range."""

    forward_seconds: dict[str, float] = field(default_factory=dict)
    range_seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> range name -> seconds
    extra_seconds: dict[str, float] = field(default_factory=dict)  # kind -> seconds stock LLaVA does not spend

    def share(self, kind: str, extra_only: bool = False) -> float | None:
        """Share of the profiled forward spent in ADSC's ranges (all of them, or only the work stock does not do)."""
        total = self.forward_seconds.get(kind, 0.0)
        if total <= 0:
            return None
        spent = self.extra_seconds[kind] if extra_only else sum(self.range_seconds[kind].values())
        return spent / total


def profiled_forward(model, forward_kwargs: dict, device: torch.device) -> tuple[object, float, dict, dict]:
    """One forward under `torch.profiler`: its output, its wall seconds, and per ADSC range the seconds and calls."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        synchronize(device)
        start = time.perf_counter()
        output = model(**forward_kwargs, use_cache=True, logits_to_keep=1)
        synchronize(device)
        seconds = time.perf_counter() - start
    ranges = [event for event in profiler.key_averages() if event.key in PROFILER_RANGES.values()]
    return output, seconds, {e.key: e.cpu_time_total / 1e6 for e in ranges}, {e.key: e.count for e in ranges}


def measure_pruning_step(model, inputs: dict, device: torch.device, repeats: int) -> PruningStepTimes:
    """Profile `repeats` prefills and decode steps of `model` and average ADSC's ranges per forward."""
    times = PruningStepTimes()
    mask_range = PROFILER_RANGES["stage_mask"]
    for kind in FORWARD_KINDS:
        times.forward_seconds[kind] = 0.0
        times.range_seconds[kind] = {name: 0.0 for name in PROFILER_RANGES.values()}
        times.extra_seconds[kind] = 0.0
    inputs = without_unneeded_mask(inputs)
    for _ in range(repeats):
        prefill, decode_kwargs = None, None
        for kind in FORWARD_KINDS:
            forward_kwargs = inputs if kind == "prefill" else decode_kwargs
            output, seconds, range_seconds, calls = profiled_forward(model, forward_kwargs, device)
            times.forward_seconds[kind] += seconds / repeats
            for name, spent in range_seconds.items():
                times.range_seconds[kind][name] += spent / repeats
                # Stock LLaVA builds one causal mask per forward as well.
                stock_share = 1 / calls[name] if name == mask_range else 0.0
                times.extra_seconds[kind] += spent * (1 - stock_share) / repeats
            if kind == "prefill":
                prefill = output
                tokens = next_tokens(prefill.logits, model.config.image_token_id)
                attention_mask = inputs["attention_mask"]
                if attention_mask is not None:
                    attention_mask = torch.cat([attention_mask, torch.ones_like(tokens)], dim=1)
                decode_kwargs = {"input_ids": tokens, "attention_mask": attention_mask, "cache": prefill.cache}
    return times
