"""`adsc-llava train`: LoRA fine-tuning of an ADSC-LLaVA checkpoint with a budget curriculum."""

from transformers import HfArgumentParser

from adsc_llava.cli import prog
from adsc_llava.train.args import AdscTrainConfig
from adsc_llava.train.trainer import run_training

EXAMPLES = """examples:
  adsc-llava train --model llava-1.5-7b-hf/ --data llava_v1_5_mix665k.json --image-folder data/ \\
      --budget 192 --curriculum reverse --output-dir out/
  adsc-llava train ... --resume                  # continue from the last complete checkpoint
  adsc-llava train ... --eval-data heldout.json --report-to tensorboard wandb --run-name adsc-192
  accelerate launch -m adsc_llava train --deepspeed zero3 ...   # several GPUs (zero2, zero3: the shipped configs)

Every transformers TrainingArguments option is taken too (--ddp-timeout, --max-grad-norm, --optim, ...)."""


def main(argv: list[str] | None = None) -> int:
    parser = HfArgumentParser(
        AdscTrainConfig, prog=prog("train"), description=__doc__.split(": ", 1)[1], epilog=EXAMPLES
    )
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    run_training(config)  # a launched process leaves the process group in there
    return 0
