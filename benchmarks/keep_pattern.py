"""Which tokens should a Qwen-VL image or video keep? 1-D uniform positions against 2-D and per-frame keeping.

    python -m adsc_llava.benchmarks.keep_pattern          # about a minute on one CPU thread

ADSC keeps `floor((1 - r) * n)` of a unit's `n` alive tokens at uniformly spaced positions of its run (row-major
over the merged patch grid; a video's frames one after the other). Two alternatives use the grid:

- **2-D**: the same count as a lattice: `kr ~ sqrt(k * rows / columns)` uniformly spaced rows, each keeping its
  share of `k` at uniformly spaced columns; the next pruning layer applies the rule to the kept rows again.
- **per frame** (videos): the video's count split evenly over its temporal patches, each keeping its share at uniform
  positions of its own grid (Qwen3-VL's units are per frame anyway).

The proxy: random fields with natural images' `1/f` amplitude spectrum on the token grid (one per frame for
videos, correlated over time), reconstructed from the kept tokens by their nearest kept neighbour; the score is the
mean squared error (fields of unit variance), lower is better, after each of 4 pruning layers for drop ratios 0.30 to
0.90. A real model learns to move information into the kept tokens (ADSC's premise), so this measures only how
evenly the kept positions cover the grid, which is what the rules differ in.
"""

import argparse
import math

import torch

from adsc_llava.configuration_adsc_llava import num_kept_tokens, uniform_keep_positions

# Merged-token grids (rows, columns): Qwen2.5-VL's 1280 x 720 and 1920 x 1080 photos, Qwen3-VL's 1280 x 720, a
# portrait, a square and a small image.
GRIDS = {"q2.5 1280x720": (26, 46), "q2.5 1920x1080": (38, 68), "q3 1280x720": (22, 40), "portrait": (46, 26)}
GRIDS.update({"square": (32, 32), "small": (12, 18)})
VIDEO = (8, 13, 23)  # 16 frames of 640 x 360 in Qwen2.5-VL: 8 temporal patches of 13 x 23
DROP_RATIOS = [ratio / 100 for ratio in range(30, 92, 4)]
STAGES = 4


def one_d(num_tokens: int, drop_ratio: float, stages: int) -> list[list[int]]:
    """ADSC's rule on the run: the kept token indices after each pruning layer."""
    alive, kept = list(range(num_tokens)), []
    for _ in range(stages):
        alive = [alive[i] for i in uniform_keep_positions(len(alive), num_kept_tokens(len(alive), drop_ratio))]
        kept.append(alive)
    return kept


def lattice_step(rows: list[list[int]], keep: int) -> list[list[int]]:
    """Keep `keep` tokens of `rows` (each a list of token indices) as a lattice of rows and columns."""
    total = sum(map(len, rows))
    if keep >= total or keep == 0:
        return rows if keep else []
    kept_rows = max(1, min(len(rows), keep, round(math.sqrt(keep * len(rows) ** 2 / total))))
    while True:
        chosen = [rows[i] for i in uniform_keep_positions(len(rows), kept_rows)]
        if keep <= kept_rows * min(map(len, chosen)) or kept_rows == min(len(rows), keep):
            break
        kept_rows += 1
    result = []
    for index, row in enumerate(chosen):
        share = min((index + 1) * keep // kept_rows - index * keep // kept_rows, len(row))
        result.append([row[i] for i in uniform_keep_positions(len(row), share)])
    return [row for row in result if row]


def two_d(height: int, width: int, drop_ratio: float, stages: int) -> list[list[int]]:
    rows, kept = [[y * width + x for x in range(width)] for y in range(height)], []
    for _ in range(stages):
        rows = lattice_step(rows, num_kept_tokens(sum(map(len, rows)), drop_ratio))
        kept.append(sorted(token for row in rows for token in row))
    return kept


def per_frame(frames: int, frame_tokens: int, drop_ratio: float, stages: int) -> list[list[int]]:
    """The video's count, `floor((1 - r) * n)` of all its alive tokens, split evenly over the frames, each frame
    keeping its share at uniform positions of its own tokens (same counts as 1-D: only the positions differ)."""
    alive, kept = [[f * frame_tokens + t for t in range(frame_tokens)] for f in range(frames)], []
    for _ in range(stages):
        keep = num_kept_tokens(sum(map(len, alive)), drop_ratio)
        shares = [(f + 1) * keep // frames - f * keep // frames for f in range(frames)]
        alive = [
            [row[i] for i in uniform_keep_positions(len(row), min(share, len(row)))]
            for row, share in zip(alive, shares, strict=True)
        ]
        kept.append(sorted(token for row in alive for token in row))
    return kept


def natural_field(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A random field of unit variance whose amplitude falls as `1 / f`, like natural images'."""
    frequencies = torch.meshgrid(*(torch.fft.fftfreq(size) for size in shape), indexing="ij")
    radius = torch.sqrt(sum(f**2 for f in frequencies))
    radius.view(-1)[0] = 1.0
    spectrum = torch.complex(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
    spectrum = spectrum / radius
    spectrum.view(-1)[0] = 0
    field = torch.fft.ifftn(spectrum).real
    return (field - field.mean()) / field.std()


def reconstruction_error(shape: tuple[int, ...], kept: list[int], fields: list[torch.Tensor]) -> float:
    """Mean squared error of every field rebuilt from its kept tokens, each token taking its nearest kept one."""
    coordinates = torch.stack(torch.meshgrid(*(torch.arange(size) for size in shape), indexing="ij"), -1)
    coordinates = coordinates.reshape(-1, len(shape)).float()
    kept_index = torch.tensor(kept, dtype=torch.long)
    nearest = kept_index[torch.cdist(coordinates, coordinates[kept_index]).argmin(1)]
    return sum(float(((field.flatten() - field.flatten()[nearest]) ** 2).mean()) for field in fields) / len(fields)


def compare(shape, rules: dict, fields: list[torch.Tensor]) -> dict[str, list[float]]:
    """Each rule's error divided by 1-D's, over every drop ratio and stage with at least 4 kept tokens."""
    ratios = {name: [] for name in rules}
    for drop_ratio in DROP_RATIOS:
        kept = {name: rule(drop_ratio) for name, rule in rules.items()}
        for stage in range(STAGES):
            if len(kept["1-D"][stage]) < 4:
                continue
            base = reconstruction_error(shape, kept["1-D"][stage], fields)
            for name in rules:
                assert len(kept[name][stage]) == len(kept["1-D"][stage])  # the same counts: only positions differ
                ratios[name].append(reconstruction_error(shape, kept[name][stage], fields) / base)
    return ratios


def summary(ratios: list[float]) -> str:
    mean = sum(ratios) / len(ratios)
    worse, better = (sum(r > 1.1 for r in ratios) / len(ratios), sum(r < 1 / 1.1 for r in ratios) / len(ratios))
    return f"{mean:.3f} | {min(ratios):.2f} - {max(ratios):.2f} | {better:.0%} | {worse:.0%}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adsc_llava.benchmarks.keep_pattern", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--fields", type=int, default=6, help="random fields per grid")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    header = "| input | rule | error / 1-D's, mean | range | >10% better | >10% worse |\n|---|---|---|---|---|---|"
    print(header)
    for name, (height, width) in GRIDS.items():
        fields = [natural_field((height, width), generator) for _ in range(args.fields)]
        rules = {
            "1-D": lambda r, n=height * width: one_d(n, r, STAGES),
            "2-D": lambda r, h=height, w=width: two_d(h, w, r, STAGES),
        }
        print(f"| {name} ({height} x {width}) | 2-D | {summary(compare((height, width), rules, fields)['2-D'])} |")
    frames, height, width = VIDEO
    fields = [natural_field(VIDEO, generator) for _ in range(args.fields)]
    rules = {
        "1-D": lambda r: one_d(frames * height * width, r, STAGES),
        "per frame": lambda r: per_frame(frames, height * width, r, STAGES),
    }
    video_ratios = compare(VIDEO, rules, fields)["per frame"]
    print(f"| video ({frames} x {height} x {width}) | per frame | {summary(video_ratios)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
