"""Independent, naive pieces of Qwen-VL for the tests: 3-D positions, M-RoPE tables and DeepStack at full length.

Written from the papers' and processors' description in plain Python, one token at a time, without the models'
`get_rope_index` or rotary modules, so that the ADSC forward is compared with something it does not share code with.
"""

import torch


def reference_positions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    placeholder_ids: tuple[int, int],
    grids: list[tuple[int, int, int]],
    merge: int,
    time_steps: list[int],
) -> torch.Tensor:
    """`(3, batch, seq)` temporal / height / width positions of every token (0 at padding).

    Text tokens count up by one on all three axes. A run of placeholders takes the next grid `(t, h, w)` in patches
    (`grids`, in order of appearance over the rows) and the next entry of `time_steps` (how far frame `i + 1` is from
    frame `i` on the temporal axis: 1 for an image); its token at frame `f`, row `y`, column `x` of the merged grid
    sits at `(start + f * step, start + y, start + x)`, and the text after it continues at `start + max(h, w) / merge`.
    """
    positions = torch.zeros(3, *input_ids.shape, dtype=torch.long)
    grid_iter, step_iter = iter(grids), iter(time_steps)
    for row in range(input_ids.shape[0]):
        columns = [c for c in range(input_ids.shape[1]) if attention_mask[row, c]]
        tokens = [int(input_ids[row, c]) for c in columns]
        index, next_position = 0, 0
        while index < len(tokens):
            if tokens[index] not in placeholder_ids:
                positions[:, row, columns[index]] = next_position
                next_position += 1
                index += 1
                continue
            frames, height, width = next(grid_iter)
            step = next(step_iter)
            height, width = height // merge, width // merge
            start = next_position
            for frame in range(frames):
                for y in range(height):
                    for x in range(width):
                        positions[:, row, columns[index]] = torch.tensor([start + frame * step, start + y, start + x])
                        index += 1
            next_position = start + max(height, width)
    return positions


def reference_rotary(
    positions: torch.Tensor, head_dim: int, theta: float, sections: list[int], interleaved: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(cos, sin)` `(batch, seq, head_dim)` of M-RoPE: frequency `i` rotates by the position on axis `axis(i)`.

    Qwen2.5-VL (`interleaved=False`): the first `sections[0]` frequencies follow time, the next `sections[1]` height,
    the rest width. Qwen3-VL (interleaved): frequency `i` follows height if `i % 3 == 1 and i < 3 * sections[1]`,
    width if `i % 3 == 2 and i < 3 * sections[2]`, time otherwise.
    """
    half = head_dim // 2
    if interleaved:
        axes = [
            1 if i % 3 == 1 and i < 3 * sections[1] else 2 if i % 3 == 2 and i < 3 * sections[2] else 0
            for i in range(half)
        ]
    else:
        axes = [0] * sections[0] + [1] * sections[1] + [2] * sections[2]
    inverse_frequency = [1.0 / theta ** (2 * i / head_dim) for i in range(half)]
    angles = torch.stack(
        [positions[axis].double() * frequency for axis, frequency in zip(axes, inverse_frequency, strict=True)], -1
    )
    angles = torch.cat([angles, angles], -1).float()
    return angles.cos(), angles.sin()


def full_length_deepstack(placeholder_masks: list[torch.Tensor], features: list[list[torch.Tensor]]):
    """`after_layer` for `reference_forward`: after layer `l`, every placeholder of every kind gets its row of the
    kind's layer-`l` features (`features[kind][l]`, rows in the placeholders' row-major order), as stock Qwen3-VL."""

    def after_layer(layer_idx: int, hidden: torch.Tensor) -> torch.Tensor:
        if layer_idx >= len(features[0]):
            return hidden
        added = torch.zeros_like(hidden)
        for mask, kind in zip(placeholder_masks, features, strict=True):
            added = added.masked_scatter(mask[..., None], kind[layer_idx].to(hidden.dtype))
        return hidden + added

    return after_layer
