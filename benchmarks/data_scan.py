"""Time of `adsc-llava train`'s data scan per 10,000 records, in one process and spread over loader processes.

```bash
python -m adsc_llava.benchmarks.data_scan                  # 10,000 records, 1,000 JPEGs of assorted sizes
python -m adsc_llava.benchmarks.data_scan --records 50000 --workers 1 4 8
python -m adsc_llava.benchmarks.data_scan --records 3000 --image-sizes 1000   # images of many sizes, as in LLaVA-665K
```

The records mimic LLaVA-665K's: 80% with an image (1,000 JPEG files of 60 different sizes, so the placeholder count
is looked up for many sizes), 1 to 4 question-answer turns of 4 to 60 words, through a LLaVA-1.5 processor (CLIP
336 px, 14 px patches) with a word-level tokenizer (no download). Each setting scans the same records `--repeats`
times, interleaved with the others, and the median is reported with its ratio to one process. On several training
processes each one checks only its share (`scan_once`), so the wall time divides again by their number; a rerun or
`--resume` into the same output folder reads the cached outcome instead.
"""

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from adsc_llava.testing import DEMO_WORDS, build_processor, build_word_tokenizer
from adsc_llava.train.dataset import LlavaInstructDataset

IMAGE_SIZES = [(width + 10 * step, height + 10 * step) for width, height in ((640, 480), (480, 640), (500, 375),
               (336, 336), (1024, 768), (800, 600)) for step in range(10)]  # fmt: skip


def many_image_sizes(count: int) -> list[tuple[int, int]]:
    """`count` (width, height) pairs, 300 to 799 x 200 to 219 pixels, most of them distinct."""
    return [(300 + index % 500, 200 + index // 500 * 7 + index % 13) for index in range(count)]


def write_records(
    folder: Path, num_records: int, num_images: int = 1000, seed: int = 0, image_sizes: list | None = None
) -> list[dict]:
    """`num_images` JPEG files under `folder/images` (of sizes drawn from `image_sizes`, default `IMAGE_SIZES`) and
    `num_records` LLaVA records using them."""
    rng = random.Random(seed)
    image_sizes = image_sizes or IMAGE_SIZES
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for index in range(num_images):
        Image.new("RGB", rng.choice(image_sizes), (rng.randrange(256), 0, 0)).save(folder / "images" / f"{index}.jpg")
    records = []
    for index in range(num_records):
        turns = []
        for _ in range(rng.randint(1, 4)):
            question = " ".join(rng.choices(DEMO_WORDS, k=rng.randint(4, 20)))
            answer = " ".join(rng.choices(DEMO_WORDS, k=rng.randint(4, 60)))
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
        record = {"id": str(index), "conversations": turns}
        if rng.random() < 0.8:
            record["image"] = f"images/{rng.randrange(num_images)}.jpg"
            turns[0]["value"] = "<image>\n" + turns[0]["value"]
        records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="Loader processes to compare with 0.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--image-sizes", type=int, default=None, help="Draw the images from this many sizes (default: 60 sizes)."
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    processor = build_processor(build_word_tokenizer(DEMO_WORDS), image_size=336, patch_size=14)
    with tempfile.TemporaryDirectory() as folder:
        image_sizes = many_image_sizes(args.image_sizes) if args.image_sizes else IMAGE_SIZES
        records = write_records(Path(folder), args.records, image_sizes=image_sizes)
        times: dict[int, list[float]] = {workers: [] for workers in [0, *args.workers]}
        for _ in range(args.repeats):
            for workers in times:
                dataset = LlavaInstructDataset(records, processor, folder, truncate_long_samples=True)
                start = time.perf_counter()
                dataset.scan(num_workers=workers, show_progress=False)
                times[workers].append(time.perf_counter() - start)
    serial = statistics.median(times[0])
    print(f"data scan of {args.records:,} records ({len(set(image_sizes))} image sizes), median of {args.repeats}:")
    for workers, measured in times.items():
        median = statistics.median(measured)
        per_10k = median / args.records * 10_000
        where = f"{workers} loader processes" if workers else "in-process    "
        print(f"  {where}: {per_10k:6.1f} s per 10K records ({serial / median:4.2f}x in-process)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
