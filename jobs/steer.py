"""`python -m conva.jobs.steer --config FILE [--section.key=value ...] [--overwrite]`: steered generation (see conva.jobs.runner)."""

import sys

from conva.jobs.runner import main

if __name__ == "__main__":
    sys.exit(main("steer"))
