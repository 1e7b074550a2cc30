"""`python -m conva.jobs.extract --config FILE [--section.key=value ...] [--overwrite]`: record activations (see conva.jobs.runner)."""

import sys

from conva.jobs.runner import main

if __name__ == "__main__":
    sys.exit(main("extract"))
