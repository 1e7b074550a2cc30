"""The ``conva`` command: ``conva extract|fit|steer|run|validate|study --config FILE [--section.key=value ...]``
and ``conva report <results folder>``.

``validate`` is the dry run: it checks the config, that the model exists, that the inputs read and the
output folder is writable (and, with ``--job steer``, the bundles) without loading a model or starting
Ray, and exits non-zero with one line naming the bad key.

Example:
    $ conva validate --config examples/demo.toml --model.name=./nope
    conva validate: error: model.name: model './nope' is neither a local folder nor a Hugging Face repo id
"""

from __future__ import annotations

import argparse
import sys

from jobs.common import EXPECTED_ERRORS, output_location, parse_args, setup_logging
from jobs.preflight import plan_job
from jobs.runner import JOBS, main as run_main

__all__ = ["main", "validate"]


def validate(argv: list[str] | None = None) -> int:
    """Check a config for ``--job`` (default ``run``) without loading a model; 0 if it would start."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--job", choices=sorted(JOBS), default="run")
    args, rest = parser.parse_known_args(argv)
    setup_logging()
    try:
        cfg, flags = parse_args("conva validate", rest)
        cfg, out = output_location(cfg)
        job = plan_job(cfg, out, JOBS[args.job], flags.overwrite)
    except (*EXPECTED_ERRORS, NotImplementedError, ValueError) as err:
        print(f"conva validate: error: {err}", file=sys.stderr)
        return 2
    counts = {name: spec.input.rows if hasattr(spec.input, "rows") else spec.input.table.num_rows
              for spec in job.specs if spec.writes and spec.input is not None
              for name in [{"extract": "texts to extract", "steer": "prompts to steer"}.get(spec.name, spec.name)]}
    print(f"conva validate: ok ({args.job}: model {cfg.model.name}, output {out}, "
          + ", ".join(f"{n} {k}" for k, n in counts.items()) + ")")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``conva`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    commands = [*JOBS, "validate", "study", "report"]
    if not argv or argv[0] not in commands:
        print(f"usage: conva {{{'|'.join(commands)}}} --config FILE [--section.key=value ...] [--overwrite]",
              file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    if argv[0] == "validate":
        return validate(argv[1:])
    if argv[0] == "study":
        from jobs.study import main as study_main

        return study_main(argv[1:])
    if argv[0] == "report":
        from conva.report import main as report_main

        return report_main(argv[1:])
    return run_main(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
