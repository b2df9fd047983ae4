"""The flash-attention-2 code path of ADSC-LLaVA, on a CPU with exact pure-torch kernels, and for real on a GPU.

flash-attn cannot be installed on the CPU test machines. Everything transformers does around the kernels still runs
here: the flash mask (`None` or the 2D padding mask), unpadding to `cu_seqlens`, the packed-sequence detection and
re-padding. Only the two kernel calls, `flash_attn_func` and `flash_attn_varlen_func`, are replaced by the pure-torch
equivalents below (flash-attn >= 2.1 semantics: causal masks aligned bottom-right when the query is shorter than the
keys, grouped-query heads, `softmax_scale`, varlen with `cu_seqlens`). transformers' attention-implementation checks
refuse "flash_attention_2" without the package, so the CPU tests switch a model built with "eager" to it through its
config, which is what every attention module and mask builder reads at forward time.
"""

import functools
import importlib.util
import math
from collections import Counter

import pytest
import torch
import transformers.modeling_flash_attention_utils as flash_utils
from transformers import DynamicCache

from conftest import IMAGE_TOKEN_ID, make_batch, tiny_adsc_model

MAX_ABS_DIFF = 1e-5
REAL_FLASH_ATTENTION = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def check_supported(dropout_p, window_size, softcap, alibi_slopes, return_attn_probs, block_table=None) -> None:
    """The references implement what LLaVA's Llama-style attention uses; anything else must not pass silently."""
    if dropout_p or tuple(window_size) != (-1, -1) or softcap or alibi_slopes is not None or return_attn_probs:
        raise NotImplementedError("dropout, sliding windows, softcap, ALiBi and attention probs are not emulated")
    if block_table is not None:
        raise NotImplementedError("paged attention is not emulated")


def reference_flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> torch.Tensor:
    """`flash_attn.flash_attn_func` in plain torch.

    Args:
        q: `(batch, q_len, heads, head_dim)`.
        k, v: `(batch, k_len, kv_heads, head_dim)`; `heads` must be a multiple of `kv_heads` (GQA).

    Returns:
        `(batch, q_len, heads, head_dim)`. With `causal`, query `i` sees keys `j <= i + k_len - q_len` (bottom-right
        alignment, flash-attn >= 2.1); a query that sees no key gets zeros, as in flash-attn.
    """
    check_supported(dropout_p, window_size, softcap, alibi_slopes, return_attn_probs)
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    k = k.repeat_interleave(heads // kv_heads, dim=2)
    v = v.repeat_interleave(heads // kv_heads, dim=2)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if causal:
        q_len, k_len = q.shape[1], k.shape[1]
        query_index = torch.arange(q_len, device=q.device)[:, None]
        key_index = torch.arange(k_len, device=q.device)[None, :]
        scores = scores.masked_fill(key_index > query_index + (k_len - q_len), float("-inf"))
    weights = torch.nan_to_num(scores.softmax(dim=-1))  # rows without any key: zeros
    return torch.einsum("bhqk,bkhd->bqhd", weights, v.float()).to(q.dtype)


def reference_flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """`flash_attn.flash_attn_varlen_func` in plain torch: sequence `i` is `q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]`.

    Args:
        q: `(total_q, heads, head_dim)`; k, v: `(total_k, kv_heads, head_dim)`.
        cu_seqlens_q, cu_seqlens_k: `(num_sequences + 1,)` int32 cumulative lengths.

    Returns:
        `(total_q, heads, head_dim)`.
    """
    check_supported(dropout_p, window_size, softcap, alibi_slopes, return_attn_probs, block_table)
    out = q.new_zeros(*q.shape[:2], v.shape[-1])
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if len(bounds_q) != len(bounds_k):
        raise ValueError(f"cu_seqlens_q has {len(bounds_q)} entries, cu_seqlens_k {len(bounds_k)}")
    for (q_start, q_end), (k_start, k_end) in zip(
        zip(bounds_q, bounds_q[1:], strict=False), zip(bounds_k, bounds_k[1:], strict=False), strict=True
    ):
        if q_end - q_start > max_seqlen_q or k_end - k_start > max_seqlen_k:
            raise ValueError("a sequence is longer than max_seqlen_q / max_seqlen_k")
        out[q_start:q_end] = reference_flash_attn_func(
            q[None, q_start:q_end],
            k[None, k_start:k_end],
            v[None, k_start:k_end],
            softmax_scale=softmax_scale,
            causal=causal,
        )[0]
    return out


@pytest.fixture
def kernel_calls(monkeypatch) -> Counter:
    """Route transformers' flash-attention-2 kernels to the references above; count calls of each kernel.

    `_lazy_imports` is where transformers imports the kernels (and flash-attn's pad/unpad helpers, here its own
    pure-torch `_pad_input` / `_unpad_input`). Its cached results are monkeypatched too, so they are restored after
    the test and the next load goes through the patched import.
    """
    calls = Counter()

    def counted(name, kernel):
        @functools.wraps(kernel)  # keeps the signature, which transformers inspects for supported kwargs
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return kernel(*args, **kwargs)

        return wrapper

    def lazy_imports(implementation, attention_wrapper=None, allow_all_kernels=False):
        if implementation != "flash_attention_2":
            raise ValueError(f"only flash_attention_2 is emulated, got {implementation}")
        return (
            counted("flash_attn_func", reference_flash_attn_func),
            counted("flash_attn_varlen_func", reference_flash_attn_varlen_func),
            None,  # no paged-attention kernel
            flash_utils._pad_input,
            flash_utils._unpad_input,
        )

    monkeypatch.setattr(flash_utils, "_lazy_imports", lazy_imports)
    for name in (
        "_loaded_implementation",
        "_flash_fn",
        "_flash_varlen_fn",
        "_flash_with_kvcache_fn",
        "_pad_fn",
        "_unpad_fn",
        "_process_flash_kwargs_fn",
        "_process_with_kvcache_kwargs_fn",
    ):
        monkeypatch.setattr(flash_utils, name, None)
    return calls


def eager_and_flash_twins(**config_kwargs):
    """Two models with the same weights: one eager, one switched to flash_attention_2 (vision tower included)."""
    eager = tiny_adsc_model(attn_implementation="eager", **config_kwargs)
    flash = tiny_adsc_model(attn_implementation="eager", **config_kwargs)
    flash.config._attn_implementation = "flash_attention_2"  # set recursively on the text and vision configs
    assert flash.model.language_model.layers[0].self_attn.config._attn_implementation == "flash_attention_2"
    return eager, flash


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def prefill_and_decode_logits(model, batch, next_token_id: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits at the prompt's non-padding positions `(num_tokens, vocab)`, then of a cached decode step.

    Padding positions are left out: flash-attention leaves their outputs at zero, eager attends somewhere.
    The decode step's logits are `(batch, vocab)`.
    """
    cache = DynamicCache(config=model.config.text_config)
    step = torch.full_like(batch["input_ids"][:, :1], next_token_id)
    step_mask = torch.cat([batch["attention_mask"], torch.ones_like(step)], dim=1)
    with torch.no_grad():
        prefill = model(**batch, cache=cache, use_cache=True).logits
        decode = model(input_ids=step, attention_mask=step_mask, cache=cache, use_cache=True).logits
    return prefill[batch["attention_mask"].bool()].float(), decode[:, -1].float()


GENERATE_OPTIONS = dict(max_new_tokens=6, do_sample=False, suppress_tokens=[IMAGE_TOKEN_ID])


# The references themselves


def test_reference_kernels_agree_with_sdpa_and_with_each_other():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, 4, 8, generator=generator)  # 4 query heads
    k, v = torch.randn(2, 2, 7, 2, 8, generator=generator).unbind(1)  # 2 key/value heads (GQA)
    # Same lengths, causal: torch's SDPA with is_causal (top-left == bottom-right here), GQA by repeating heads.
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2), v.repeat_interleave(2, 2).transpose(1, 2),
        is_causal=True, scale=0.3,
    ).transpose(1, 2)  # fmt: skip
    full = reference_flash_attn_func(q, k, v, softmax_scale=0.3, causal=True)
    assert max_abs_diff(full, expected) <= 1e-6
    # Shorter query (a cached chunk): bottom-right alignment means the last rows of the full causal attention.
    chunk = reference_flash_attn_func(q[:, -3:], k, v, softmax_scale=0.3, causal=True)
    assert max_abs_diff(chunk, full[:, -3:]) <= 1e-6
    # Varlen over two packed sequences == each sequence alone.
    lengths_q, lengths_k = [2, 3], [5, 7]
    cu_q = torch.tensor([0, 2, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 12], dtype=torch.int32)
    packed_q = torch.cat([q[0, -2:], q[1, -3:]])
    packed_k, packed_v = torch.cat([k[0, :5], k[1]]), torch.cat([v[0, :5], v[1]])
    packed = reference_flash_attn_varlen_func(packed_q, packed_k, packed_v, cu_q, cu_k, 3, 7, causal=True)
    alone = [
        reference_flash_attn_func(q[i : i + 1, -lq:], k[i : i + 1, :lk], v[i : i + 1, :lk], causal=True)[0]
        for i, (lq, lk) in enumerate(zip(lengths_q, lengths_k, strict=True))
    ]
    assert torch.equal(packed, torch.cat(alone))


# ADSC with the flash-attention-2 path == ADSC with eager


def test_flash_prefill_matches_eager_with_padding_and_a_text_only_row(kernel_calls):
    eager, flash = eager_and_flash_twins(pruning_layers=[1, 2], drop_ratio=0.5)
    batch = make_batch([1, 0, 2], text_lengths=[4, 9, 3], padding_side="left")
    expected, actual = prefill_and_decode_logits(eager, batch), prefill_and_decode_logits(flash, batch)
    for expected_logits, logits in zip(expected, actual, strict=True):
        assert max_abs_diff(logits, expected_logits) <= MAX_ABS_DIFF
    # Padding and rows of different pruned lengths go through the varlen kernel.
    assert kernel_calls["flash_attn_varlen_func"] > 0


def test_flash_generate_with_cache_matches_eager(kernel_calls):
    eager, flash = eager_and_flash_twins(pruning_layers=[1, 3], drop_ratio=0.6)
    batch = make_batch([1, 0, 2], text_lengths=[2, 7, 4], padding_side="left", seed=3)
    expected = eager.generate(**batch, **GENERATE_OPTIONS, use_cache=True)
    generated = flash.generate(**batch, **GENERATE_OPTIONS, use_cache=True)
    assert torch.equal(generated, expected)
    assert kernel_calls["flash_attn_varlen_func"] > 0


def test_flash_batch_of_one_without_padding_never_looks_packed(kernel_calls):
    """Kept tokens have gapped positions: passed to the attention, transformers would read them as packed sequences.

    It then takes the varlen kernel with `cu_seqlens` guessed from the positions (and ignoring any cache). ADSC passes
    its positions only through the rotary embeddings, so a batch of one without padding uses the plain kernel only.
    """
    eager, flash = eager_and_flash_twins(pruning_layers=[1, 2], drop_ratio=0.5)
    batch = make_batch([2], text_lengths=[6])
    assert batch["attention_mask"].all()
    with torch.no_grad():
        expected, logits = eager(**batch).logits, flash(**batch).logits
    assert max_abs_diff(logits, expected) <= MAX_ABS_DIFF
    generated = flash.generate(**batch, **GENERATE_OPTIONS, use_cache=True)
    assert torch.equal(generated, eager.generate(**batch, **GENERATE_OPTIONS, use_cache=True))
    # No padding anywhere: every call, prefill and decode, is the plain kernel; varlen would mean a packed guess.
    assert kernel_calls["flash_attn_func"] > 0
    assert kernel_calls["flash_attn_varlen_func"] == 0


# The real kernels


@pytest.mark.skipif(not REAL_FLASH_ATTENTION, reason="needs a CUDA GPU and the flash-attn package")
def test_real_flash_attention_kernels_on_gpu():
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    device, dtype = torch.device("cuda"), torch.float16
    # 1. The references used on the CPU agree with the real kernels (shorter query, GQA, varlen).
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(2, 5, 4, 16, generator=generator, device=device, dtype=dtype)
    k, v = torch.randn(2, 2, 9, 2, 16, generator=generator, device=device, dtype=dtype).unbind(1)
    for causal in (False, True):
        torch.testing.assert_close(
            flash_attn_func(q, k, v, softmax_scale=0.2, causal=causal),
            reference_flash_attn_func(q, k, v, softmax_scale=0.2, causal=causal),
            atol=2e-3,
            rtol=2e-3,
        )
    cu_q = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 6, 15], dtype=torch.int32, device=device)
    packed = (torch.cat([q[0, :3], q[1]]), torch.cat([k[0, :6], k[1]]), torch.cat([v[0, :6], v[1]]))
    torch.testing.assert_close(
        flash_attn_varlen_func(*packed, cu_q, cu_k, 5, 9, causal=True),
        reference_flash_attn_varlen_func(*packed, cu_q, cu_k, 5, 9, causal=True),
        atol=2e-3,
        rtol=2e-3,
    )

    # 2. ADSC with the real kernels == ADSC eager on the GPU: prefill and one cached decode step.
    eager = tiny_adsc_model(pruning_layers=[1, 2], drop_ratio=0.5, attn_implementation="eager")
    eager = eager.to(device=device, dtype=dtype)
    flash = tiny_adsc_model(pruning_layers=[1, 2], drop_ratio=0.5, attn_implementation="eager")
    flash = flash.to(device=device, dtype=dtype)
    flash.set_attn_implementation("flash_attention_2")  # through transformers' real availability checks
    for images_per_row in ([2], [1, 0, 2]):  # no padding (plain kernel); left padding (varlen kernel)
        batch = {key: value.to(device) for key, value in make_batch(images_per_row, padding_side="left").items()}
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        expected, actual = prefill_and_decode_logits(eager, batch), prefill_and_decode_logits(flash, batch)
        for expected_logits, logits in zip(expected, actual, strict=True):
            torch.testing.assert_close(logits, expected_logits, atol=2e-2, rtol=2e-2)
