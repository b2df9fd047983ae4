"""One greedy generation as `generate` runs it, timed, and the peak memory it takes.

Peak memory above the weights: on CUDA `torch.cuda.max_memory_allocated` minus what was allocated before (the caching
allocator's own count, workspaces included). On CPU there is no allocator counter, and the process RSS is no honest
measure (glibc keeps freed pages, so later models would reuse the memory of earlier ones): `LiveTensorBytes`, a
`TorchDispatchMode`, tracks every tensor storage the run creates and when it is freed, and reports the peak of their
sum. It misses scratch memory kernels allocate internally (e.g. the CPU attention kernel's per-thread buffers), which
is small next to the activations and the cache.
"""

import gc
import time
import weakref
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlavaForConditionalGeneration
from transformers.cache_utils import Cache

from adsc_llava.benchmarks.syncs import SyncCounter


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so that wall-clock times cover them (a no-op on CPU)."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


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


def without_unneeded_mask(inputs: dict) -> dict:
    """The inputs as `generate` passes them to the model: an all-ones attention mask (no padding) is dropped.

    `generate` reads the mask once, before the first forward; its forwards then build no padding mask at all.
    """
    attention_mask = inputs.get("attention_mask")
    if attention_mask is not None and bool(attention_mask.all()):
        return {**inputs, "attention_mask": None}
    return inputs


def decode_step(model, tokens: torch.LongTensor, attention_mask: torch.Tensor | None, cache: Cache):
    """One cached decode step of `(batch, 1)` tokens: the model output and the attention mask it was given."""
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones_like(tokens)], dim=1)
    output = model(input_ids=tokens, attention_mask=attention_mask, cache=cache, use_cache=True, logits_to_keep=1)
    return output, attention_mask


def greedy_generate(
    model: LlavaForConditionalGeneration,
    inputs: dict,
    new_tokens: int,
    device: torch.device,
) -> GenerationTiming:
    """What `generate(max_new_tokens=new_tokens)` runs, greedy and timed: a prefill, then `new_tokens - 1` steps."""
    image_token_id = model.config.image_token_id
    inputs = without_unneeded_mask(inputs)
    attention_mask = inputs["attention_mask"]
    synchronize(device)
    start = time.perf_counter()
    output = model(**inputs, use_cache=True, logits_to_keep=1)
    tokens = next_tokens(output.logits, image_token_id)
    synchronize(device)
    prefill_end = time.perf_counter()
    cache = output.cache
    for _ in range(new_tokens - 1):
        output, attention_mask = decode_step(model, tokens, attention_mask, cache)
        tokens = next_tokens(output.logits, image_token_id)
    synchronize(device)
    decode_seconds = time.perf_counter() - prefill_end
    return GenerationTiming(
        prefill_seconds=prefill_end - start,
        decode_seconds_per_token=decode_seconds / max(new_tokens - 1, 1),
        cache=cache,
    )


def step_syncs(model, inputs: dict) -> tuple[int, int]:
    """Host-device syncs of a prefill and of the decode step after it, as `greedy_generate` runs them.

    Counted under `no_grad`, also when called inside `inference_mode`, where `SyncCounter` would see no operator.
    """
    inputs = without_unneeded_mask(inputs)
    with torch.inference_mode(False), torch.no_grad():
        with SyncCounter() as prefill:
            output = model(**inputs, use_cache=True, logits_to_keep=1)
        tokens = next_tokens(output.logits, model.config.image_token_id)
        with SyncCounter() as decode:
            decode_step(model, tokens, inputs["attention_mask"], output.cache)
    return prefill.count, decode.count


def cache_bytes_per_layer(cache: Cache) -> list[int]:
    """Bytes of keys plus values the cache holds in each layer."""
    return [layer.keys.nbytes + layer.values.nbytes for layer in cache.layers]


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

    CUDA: the caching allocator's peak. CPU: `LiveTensorBytes` (the module docstring says why).
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
