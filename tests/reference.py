"""An independent, naive ADSC forward for the tests: full-length sequences, dropped tokens masked as keys."""

import math

import torch

from conftest import IMAGE_TOKEN_ID, TOKENS_PER_IMAGE


def reference_alive_masks(
    input_ids: torch.Tensor,
    pruning_layers: list[int],
    drop_ratio: float,
    num_layers: int,
    unit_lengths: list[int] | None = None,
    placeholder_ids: tuple[int, ...] = (IMAGE_TOKEN_ID,),
):
    """`alive[l]`: `(batch, seq)` tokens that layer `l` sees, built one visual unit at a time in plain Python.

    Units are the consecutive placeholder tokens of one image (or video), `unit_lengths` of them in row-major order
    (default: `TOKENS_PER_IMAGE` each); every kind of placeholder in `placeholder_ids` is split the same way.
    """
    alive = torch.ones(num_layers, *input_ids.shape, dtype=torch.bool)
    lengths = iter(unit_lengths) if unit_lengths is not None else None
    for row in range(input_ids.shape[0]):
        positions = [i for i, token in enumerate(input_ids[row].tolist()) if token in placeholder_ids]
        start = 0
        while start < len(positions):
            n_unit = next(lengths) if lengths is not None else TOKENS_PER_IMAGE
            unit = positions[start : start + n_unit]
            survivors = unit
            for layer in range(num_layers):
                if layer in pruning_layers:
                    n = len(survivors)
                    k = math.floor((1 - drop_ratio) * n)
                    survivors = [survivors[(2 * i + 1) * n // (2 * k)] for i in range(k)]
                alive[layer, row, sorted(set(unit) - set(survivors))] = False
            start += n_unit
    return alive


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def reference_forward(
    model,
    batch,
    alive: torch.Tensor,
    inputs_embeds: torch.Tensor | None = None,
    keep_policy: str | None = None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    after_layer=None,
) -> dict:
    """Full-length forward with manual attention; tokens dropped at a layer are masked out as keys from there on.

    `rotary`: `(cos, sin)` `(batch, seq, head_dim)` for other positions than `0 .. seq - 1` (Qwen-VL's M-RoPE, see
    `reference_qwen`); `after_layer(layer_idx, hidden)` changes a layer's output (Qwen3-VL's DeepStack). Attention
    with per-head q/k norms (Qwen3) applies them as the model does.

    With a score-based `keep_policy` ("fastv", "pyramiddrop"), `alive` starts all True and this forward decides,
    at each of the model's pruning layers, which tokens survive (`reference_top_scored`): by the attention weights
    layer `l - 1` computed (FastV), or those layer `l` computes before anything is dropped there (PyramidDrop).

    Returns the normed output, every layer's output `(batch, seq, hidden)` (dropped tokens computed on, as if kept,
    but never attended to), every layer's attention weights `(batch, heads, seq, seq)` and the alive masks.
    """
    llava = model.model
    text = llava.language_model
    config = model.config.text_config
    input_ids, padding = batch["input_ids"], batch["attention_mask"].bool()
    if inputs_embeds is None:
        embeds = text.embed_tokens(input_ids)
        features = torch.cat(list(llava.get_image_features(batch["pixel_values"]).pooler_output))
        embeds = embeds.masked_scatter((input_ids == IMAGE_TOKEN_ID)[..., None], features)
    else:
        embeds = inputs_embeds
    batch_size, seq_len, _ = embeds.shape
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if rotary is None:
        positions = torch.arange(seq_len)
        inv_freq = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = positions[:, None].float() * inv_freq[None]
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    else:
        cos, sin = (table[:, None] for table in rotary)  # (batch, 1, seq, head_dim): one table per row
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()

    def attend(layer, hidden, alive_here):
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        q = attn.q_proj(x).view(batch_size, seq_len, heads, head_dim)
        k = attn.k_proj(x).view(batch_size, seq_len, kv_heads, head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3: RMS norms over each head's vector
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = attn.v_proj(x).view(batch_size, seq_len, kv_heads, head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        allowed = causal[None] & (alive_here & padding)[:, None, :]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        weights = torch.nan_to_num(scores.softmax(-1))  # fully masked rows (padding queries) give zeros
        out = (weights @ v).transpose(1, 2).reshape(batch_size, seq_len, -1)
        return weights, attn.o_proj(out)

    hidden = embeds
    layer_outputs, layer_weights = [], []
    for layer_idx, layer in enumerate(text.layers):
        if keep_policy is not None and layer_idx in model.config.adsc_pruning_layers:
            if keep_policy == "fastv":
                weights = layer_weights[-1]
            else:
                weights, _ = attend(layer, hidden, alive[layer_idx - 1])
            keep = reference_top_scored(weights, alive[layer_idx - 1], batch, model.config.adsc_drop_ratio)
            alive[layer_idx:] &= keep
        weights, attention_output = attend(layer, hidden, alive[layer_idx])
        hidden = hidden + attention_output
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        if after_layer is not None:
            hidden = after_layer(layer_idx, hidden)
        layer_outputs.append(hidden)
        layer_weights.append(weights)
    return {"normed": text.norm(hidden), "layer_outputs": layer_outputs, "attentions": layer_weights, "alive": alive}


def reference_top_scored(weights: torch.Tensor, alive: torch.Tensor, batch: dict, drop_ratio: float) -> torch.Tensor:
    """`(batch, seq)` False for the vision tokens a score-based policy drops, one image at a time in plain Python.

    A token's score is the attention its row's last token gives it, averaged over heads; each image keeps its
    `floor((1 - r) * n)` best alive tokens, the earlier one first on ties.
    """
    input_ids, padding = batch["input_ids"], batch["attention_mask"].bool()
    keep = torch.ones_like(alive)
    for row in range(input_ids.shape[0]):
        last = max(i for i in range(input_ids.shape[1]) if padding[row, i])
        scores = weights[row, :, last, :].mean(dim=0).tolist()
        placeholders = [i for i, token in enumerate(input_ids[row].tolist()) if token == IMAGE_TOKEN_ID]
        for start in range(0, len(placeholders), TOKENS_PER_IMAGE):
            unit = [i for i in placeholders[start : start + TOKENS_PER_IMAGE] if alive[row, i]]
            num_keep = math.floor((1 - drop_ratio) * len(unit))
            kept = sorted(unit, key=lambda i: (-scores[i], i))[:num_keep]
            keep[row, sorted(set(unit) - set(kept))] = False
    return keep


def reference_text_hidden_states(model, batch, alive: torch.Tensor) -> torch.Tensor:
    """The normed output of `reference_forward`."""
    return reference_forward(model, batch, alive)["normed"]
