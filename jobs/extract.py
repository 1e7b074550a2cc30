"""`python -m jobs.extract --config FILE [--section.key=value ...] [--overwrite]`: record activations (see jobs.runner)."""

import sys

from jobs.runner import main

if __name__ == "__main__":
    sys.exit(main("extract"))
