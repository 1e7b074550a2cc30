"""`python -m jobs.steer --config FILE [--section.key=value ...] [--overwrite]`: steered generation (see jobs.runner)."""

import sys

from jobs.runner import main

if __name__ == "__main__":
    sys.exit(main("steer"))
