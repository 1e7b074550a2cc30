"""`python -m conva.jobs.run --config FILE [--section.key=value ...] [--overwrite]`: extract, fit and steer in one job (see conva.jobs.runner)."""

import sys

from conva.jobs.runner import main

if __name__ == "__main__":
    sys.exit(main("run"))
