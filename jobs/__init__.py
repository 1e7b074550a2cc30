"""Thin entrypoints wiring a config to Ray workers: the ``conva`` command (:mod:`conva.jobs.cli`), ``python -m conva.jobs.run`` ….

Each runs unchanged locally (an embedded Ray bound to 127.0.0.1) and on a cluster
(``ray job submit --working-dir . -- python -m conva.jobs.run --config FILE``, where ``RAY_ADDRESS`` is set).
"""

# Every command of the ``conva`` CLI, with its one line of help (``conva --help``, each command's own help).
COMMANDS = {
    "run": "extract → fit → steer in one job on one pool of model workers (resumes; --overwrite replaces)",
    "extract": "record the model's activations of the value pairs (and the gate's texts)",
    "fit": "fit each value's probes, band, CAA vector and gate from the activations",
    "steer": "generate data.prompts, steered with the fitted bundles",
    "study": "a study: models × values × methods × P0, judged and summarised, with an HTML report",
    "validate": "the run's pre-flight without running: config, model, inputs, output, pending shards, bad rows",
    "report": "rebuild a study's HTML report from its Parquet files",
    "config": "explain the config: every key with its type, default and meaning (--explain [SECTION]); "
    "its JSON schema for editors (--schema [--study])",
}
