"""`python -m train ...` in a source checkout: an alias of `adsc-llava train ...`."""

import sys

from adsc_llava.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
