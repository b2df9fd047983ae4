"""`adsc-llava train`: LoRA fine-tuning of an ADSC-LLaVA checkpoint with a budget curriculum."""

import torch
from transformers import HfArgumentParser

from adsc_llava.cli import prog
from adsc_llava.train.args import AdscTrainConfig
from adsc_llava.train.trainer import run_training

EXAMPLES = """examples:
  adsc-llava train --model llava-1.5-7b-hf/ --data llava_v1_5_mix665k.json --image-folder data/ \\
      --budget 192 --curriculum reverse --output-dir out/
  adsc-llava train ... --resume                  # continue from the last complete checkpoint
  accelerate launch -m adsc_llava train --deepspeed train/zero3.json ...   # several GPUs"""


def main(argv: list[str] | None = None) -> int:
    parser = HfArgumentParser(
        AdscTrainConfig, prog=prog("train"), description=__doc__.split(": ", 1)[1], epilog=EXAMPLES
    )
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    run_training(config)
    if torch.distributed.is_initialized():  # a launched rank: leave the process group before the process ends
        torch.distributed.destroy_process_group()
    return 0
