"""`python -m conva.jobs.fit --config FILE [--section.key=value ...] [--overwrite]`: fit the value bundles on the driver (see conva.jobs.runner)."""

import sys

from conva.jobs.runner import main

if __name__ == "__main__":
    sys.exit(main("fit"))
