"""`python -m adsc_llava ...` is the `adsc-llava` command."""

import sys

from adsc_llava.cli import main

if __name__ == "__main__":
    sys.exit(main())
