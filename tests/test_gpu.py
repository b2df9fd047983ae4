"""What only a CUDA GPU shows: sdpa's fused kernels (flash, memory-efficient) and bf16. Skipped without CUDA.

On the CPU, sdpa always runs its math kernel; here the same ADSC forward must pick the fused kernels and agree with
fp32 eager, and an unpadded prompt must run with *only* the flash backend allowed (so no stage passes a mask to
sdpa that would rule flash out), and no decode step synchronizes.
"""

import warnings

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import IMAGE_TOKEN_ID, make_batch, stock_twin, tiny_adsc_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PRUNED = dict(pruning_layers=[1, 2], drop_ratio=0.5)
GENERATE = dict(max_new_tokens=12, do_sample=False, suppress_tokens=[IMAGE_TOKEN_ID])


def on_gpu(batch: dict, dtype: torch.dtype) -> dict:
    batch = {key: value.cuda() for key, value in batch.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


@pytest.mark.parametrize("images_per_row", [[1], [1, 0, 2]], ids=["unpadded", "left-padded-mixed"])
def test_bf16_sdpa_pruned_prefill_matches_fp32_eager(images_per_row):
    reference = tiny_adsc_model(**PRUNED, attn_implementation="eager").cuda()
    model = tiny_adsc_model(**PRUNED, attn_implementation="sdpa").cuda().to(torch.bfloat16)
    batch = make_batch(images_per_row, padding_side="left")
    with torch.no_grad():
        expected = reference(**on_gpu(batch, torch.float32)).logits
        actual = model(**on_gpu(batch, torch.bfloat16)).logits.float()
    text = on_gpu(batch, torch.float32)["input_ids"] != IMAGE_TOKEN_ID
    torch.testing.assert_close(actual[text], expected[text], atol=3e-2, rtol=3e-2)


def test_unpadded_prompt_runs_on_the_flash_backend_alone():
    model = tiny_adsc_model(**PRUNED, attn_implementation="sdpa").cuda().to(torch.bfloat16)
    batch = on_gpu(make_batch([2]), torch.bfloat16)
    with torch.no_grad():
        allowed_all = model(**batch).logits
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises "No available kernel" if a mask reached sdpa
            flash_only = model(**batch).logits
            generated = model.generate(**batch, **GENERATE)
    torch.testing.assert_close(flash_only, allowed_all, atol=0, rtol=0)
    assert generated.shape[1] == batch["input_ids"].shape[1] + GENERATE["max_new_tokens"]


def test_cached_generate_equals_uncached_on_gpu_fp32():
    # fp32 with TF32 off: the cached and uncached paths must then pick the same tokens, as on the CPU.
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        model = tiny_adsc_model(**PRUNED, attn_implementation="sdpa").cuda()
        batch = on_gpu(make_batch([1, 0, 2], padding_side="left"), torch.float32)
        cached = model.generate(**batch, **GENERATE, use_cache=True)
        uncached = model.generate(**batch, **GENERATE, use_cache=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert torch.equal(cached, uncached)


def test_without_pruning_bf16_equals_stock_llava_on_gpu():
    model = tiny_adsc_model(attn_implementation="sdpa")
    stock = stock_twin(model).cuda().to(torch.bfloat16)
    model = model.cuda().to(torch.bfloat16)
    batch = on_gpu(make_batch([1, 1], text_lengths=[3, 8], padding_side="left"), torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, stock(**batch).logits, atol=0, rtol=0)
    assert torch.equal(model.generate(**batch, **GENERATE), stock.generate(**batch, **GENERATE))


def test_device_map_split_between_gpu_and_cpu_equals_one_device():
    """Layers 0-1 on cuda:0, layers 2-3, the norm and the lm_head on the CPU: every per-token tensor must follow."""
    from accelerate import dispatch_model

    model = tiny_adsc_model(**PRUNED, attn_implementation="sdpa")
    batch = make_batch([1, 0, 2], padding_side="left")
    with torch.no_grad():
        expected_logits = model(**batch).logits
    expected_tokens = model.generate(**batch, **GENERATE)
    device_map = {
        "model.vision_tower": 0,
        "model.multi_modal_projector": 0,
        "model.language_model.embed_tokens": 0,
        "model.language_model.rotary_emb": 0,
        "model.language_model.layers.0": 0,
        "model.language_model.layers.1": 0,
        "model.language_model.layers.2": "cpu",
        "model.language_model.layers.3": "cpu",
        "model.language_model.norm": "cpu",
        "lm_head": "cpu",
    }
    split = dispatch_model(model, device_map=device_map)
    on_first_device = {key: value.cuda() for key, value in batch.items()}
    with torch.no_grad():
        logits = split(**on_first_device).logits
    torch.testing.assert_close(logits.cpu(), expected_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(split.generate(**on_first_device, **GENERATE).cpu(), expected_tokens)


def test_offloaded_cache_generation_equals_the_default_cache():
    model = tiny_adsc_model(**PRUNED, attn_implementation="sdpa").cuda()
    batch = on_gpu(make_batch([1, 0, 2], padding_side="left"), torch.float32)
    offloaded = model.generate(**batch, **GENERATE, cache_implementation="offloaded")
    assert torch.equal(offloaded, model.generate(**batch, **GENERATE))


def syncing_calls(run) -> int:
    """Synchronizing CUDA calls `run()` makes (torch's sync debug mode warns at each: copies to the host, blocking
    host-to-device copies, stream synchronizations)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(warning.message) for warning in caught)


@pytest.mark.parametrize("images_per_row", [[1], [1, 0, 2]], ids=["batch-1", "padded-batch-3"])
def test_a_decode_step_never_syncs_and_a_prefill_at_most_once_per_pruning_layer(images_per_row):
    """What the CPU count (tests/test_syncs.py) predicts, on the device itself: blocking copies included."""
    model = tiny_adsc_model(**PRUNED, attn_implementation="sdpa").cuda()
    stock = stock_twin(model).cuda()
    batch = on_gpu(make_batch(images_per_row, padding_side="left"), torch.float32)
    with torch.no_grad():
        features = {"image": model.model.get_image_features(pixel_values=batch.pop("pixel_values"), return_dict=True)}
    mask = None if bool(batch["attention_mask"].all()) else batch["attention_mask"]  # as generate passes it
    counts = {}
    for name, candidate in (("stock", stock), ("adsc", model)):
        outputs = {}

        def prefill(candidate=candidate, outputs=outputs):
            outputs["prefill"] = candidate(
                input_ids=batch["input_ids"], attention_mask=mask, mm_encoder_outputs=features
            )

        def decode(candidate=candidate, outputs=outputs):
            step = outputs["prefill"].logits[:, -1:].argmax(dim=-1)
            step_mask = None if mask is None else torch.cat([mask, torch.ones_like(step)], dim=1)
            candidate(input_ids=step, attention_mask=step_mask, cache=outputs["prefill"].cache, use_cache=True)

        with torch.no_grad():
            counts[name] = (syncing_calls(prefill), syncing_calls(decode))
    assert counts["adsc"][0] <= counts["stock"][0] + len(PRUNED["pruning_layers"]), counts
    assert counts["adsc"][1] == 0, counts
