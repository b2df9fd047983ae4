"""Config-only ADSC-LLaVA checkpoints for `vllm_adsc.bench` (vLLM builds random weights: `--load-format dummy`).

Runs in the project's environment (transformers 5.24, `adsc_llava`), which writes the config, the configuration
file, an offline word-level processor, and one image; the vLLM environment reads them:

    .venv/bin/python vllm_adsc/make_checkpoints.py OUT_DIR

Writes OUT_DIR/image.png and one folder per shape:
    tiny/         the plugin tests' shape: a 4-layer LLM of width 64, 36 vision tokens per image, pruning at layers
                  1 and 3 with r = 0.5 (36 -> 18 -> 9 tokens);
    llava-7b-layout/  LLaVA-1.5-7B's layout at a tiny width: 32 layers, 576 vision tokens, pruning at [2, 8, 16, 24]
                  at budget 192 (16 KV cache groups in vLLM, as for the real 7B), an LLM of width 64: per-step host
                  work shows, compute does not;
    cpu-proxy/    a CPU proxy where compute matters: an LLM of width 1024, 16 layers, 16 heads, vocabulary 32064,
                  576 vision tokens, pruning at the paper's layers scaled to 16 ([1, 4, 8, 12]) at budget 192.
"""

import shutil
import sys
from pathlib import Path

from PIL import Image

from adsc_llava import AdscLlavaConfig, shipped_file
from adsc_llava.testing import build_tiny_processor, tiny_llava_config_for

# name: (image size, patch size, LLM and schedule settings)
SHAPES = {
    "tiny": (48, 8, dict(text_heads=2), dict(pruning_layers=[1, 3], drop_ratio=0.5)),
    "llava-7b-layout": (48, 2, dict(text_heads=2, text_layers=32), dict(budget=192)),
    "cpu-proxy": (
        336,
        14,
        dict(text_hidden=1024, text_layers=16, text_heads=16, text_intermediate=2752),
        dict(budget=192),
    ),
}
PROXY_VOCABULARY = 32064  # LLaVA-1.5's: the LM head's cost per decoded token is the real model's share


def save_checkpoint(folder: Path, name: str) -> None:
    image_size, patch_size, llm, schedule = SHAPES[name]
    processor = build_tiny_processor(image_size=image_size, patch_size=patch_size)
    llava_config = tiny_llava_config_for(processor, image_size=image_size, patch_size=patch_size, **llm)
    if name == "cpu-proxy":
        llava_config.text_config.vocab_size = PROXY_VOCABULARY
    config = AdscLlavaConfig.from_llava_config(llava_config, **schedule)
    config.architectures = ["AdscLlavaForConditionalGeneration"]
    config.save_pretrained(folder)
    shutil.copy(shipped_file("configuration_adsc_llava.py"), folder)
    processor.save_pretrained(folder)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in SHAPES:
        save_checkpoint(out / name, name)
    Image.new("RGB", (64, 48), (200, 40, 40)).save(out / "image.png")
    print(f"wrote {', '.join(SHAPES)} and image.png to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
