"""Thin entrypoints wiring a config to Ray workers: ``python -m jobs.extract|fit|steer|run|study --config FILE``.

Each runs unchanged locally (an embedded Ray bound to 127.0.0.1) and on a cluster
(``ray job submit --working-dir . -- python -m jobs.run --config FILE``, where ``RAY_ADDRESS`` is set).
"""
