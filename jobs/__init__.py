"""Thin entrypoints wiring a config to Ray workers: ``python -m jobs.extract|fit|steer|run --config FILE``.

Each runs unchanged locally (an embedded Ray bound to 127.0.0.1) and on a cluster
(``ray job submit --working-dir . -- python -m jobs.run --config FILE``, where ``RAY_ADDRESS`` is set).
"""

import os

# Read by Ray at import time, so set before anything imports ray. Only for the embedded local Ray:
# on this machine Ray otherwise binds a non-loopback address even when told 127.0.0.1, and writes a
# token file to the home folder. A driver joining a cluster must keep its reachable address.
if not os.environ.get("RAY_ADDRESS"):
    for _key, _value in (("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"), ("RAY_AUTH_MODE", "disabled"),
                         ("RAY_USAGE_STATS_ENABLED", "0")):
        os.environ.setdefault(_key, _value)
