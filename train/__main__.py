"""`python -m train --model ... --data ... --budget 192 --output-dir out/`: ADSC fine-tuning (see README.md)."""

import sys

from transformers import HfArgumentParser

from train.args import AdscTrainConfig
from train.trainer import run_training


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser(AdscTrainConfig)
    (config,) = parser.parse_args_into_dataclasses(args=argv if argv is not None else sys.argv[1:])
    run_training(config)


if __name__ == "__main__":
    main()
