"""`python -m jobs.fit --config FILE [--section.key=value ...] [--overwrite]`: fit the value bundles on the driver (see jobs.runner)."""

import sys

from jobs.runner import main

if __name__ == "__main__":
    sys.exit(main("fit"))
