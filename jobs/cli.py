"""The ``conva`` command: ``conva <command> --config FILE [--section.key=value ...]``; ``conva --help`` lists them.

``validate`` runs the run's own pre-flight (:func:`conva.jobs.preflight.plan_job`) without writing anything,
loading a model or starting Ray: the config, the model's existence, the inputs (a prompts file is
screened row by row), the output (writable, not held by another driver, and its committed config), and
then says what a run would do: shards committed and pending per stage, the bad rows by reason, the
neutral rows, and what ``--overwrite`` would replace. It exits non-zero exactly when ``run`` would
refuse before its workers start (the checks on every node need the cluster: ``run`` does them).

Example:
    $ conva validate --config examples/demo.toml --model.name=./nope
    conva validate: error: model.name: model './nope' is neither a local folder, a built-in name nor a
    Hugging Face repo id; the built-in names are smollm2 (SmolLM2-135M-Instruct), …
"""

from __future__ import annotations

import argparse
import json
import sys

from conva.jobs import COMMANDS

__all__ = ["main", "validate", "config"]

_USAGE = "usage: conva <command> [--config FILE] [--section.key=value ...] [options]"


def _help() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        _USAGE,
        "",
        "ConVA (Controlled Value Vector Activation, ACL 2025): value steering of LLMs as a Ray batch job.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += [
        "",
        "`conva <command> --help` for a command's options; `conva config --explain` for every config key.",
    ]
    return "\n".join(lines)


def validate(argv: list[str] | None = None) -> int:
    """Check a config for ``--job`` (default ``run``) as the run would, writing nothing; 0 if it would start."""
    from conva.batch.lease import LeaseError, OutputLease
    from conva.jobs.common import (
        EXPECTED_ERRORS,
        RAY_PROBE,
        job_parser,
        output_location,
        parse_args,
        setup_logging,
    )
    from conva.jobs.preflight import plan_job
    from conva.jobs.runner import JOBS

    # What validate reports as one line (exit 2): what a run would refuse, and a lease it could not take.
    failures: tuple[type[BaseException], ...] = (
        *EXPECTED_ERRORS,
        LeaseError,
        NotImplementedError,
        ValueError,
    )

    parser = job_parser(
        "conva validate",
        COMMANDS["validate"] + "; exits non-zero exactly when `conva run` would "
        "refuse before its workers start.",
    )
    parser.add_argument("--job", choices=sorted(JOBS), default="run", help="the job to check (default: run)")
    setup_logging()
    try:
        cfg, flags = parse_args("conva validate", argv, parser=parser)
        cfg, out = output_location(cfg)
        job = plan_job(cfg, out, JOBS[flags.job], flags.overwrite)
        lease = OutputLease(
            out,
            f"conva {flags.job}",
            ttl_s=cfg.output.lease_ttl_s,
            break_stale=flags.break_lease,
            probe=RAY_PROBE,
        )
        lease.check()
    except failures as err:
        print(f"conva validate: error: {err}", file=sys.stderr)
        return 2
    lines, pending = _report(job, flags.overwrite)
    print("\n".join(lines))
    what = (
        f"{pending} shard{'s' if pending != 1 else ''} to run"
        if pending
        else "nothing to run: every shard is committed"
    )
    print(
        f"conva validate: ok: `conva {flags.job}` would start ({what}; model {cfg.model.name}, output {out})"
    )
    return 0


def _report(job, overwrite: bool) -> tuple[list[str], int]:
    """What a run of ``job`` would do, in lines for ``validate``, and how many shards it would run."""
    from conva.batch.inputs import InputPlan, files_line, layout_lines
    from conva.jobs.preflight import stage_plans

    plans = stage_plans(job, overwrite)
    width = max((len(p.spec.folder) for p in plans), default=0)
    lines, warnings = [], []
    for p in plans:
        rows = _input_rows(p.spec)
        lines.append(
            f"  {p.spec.folder:<{width}}  {p.spec.n_shards} shard{'s' if p.spec.n_shards != 1 else ''}: "
            f"{p.committed} committed, {p.pending} to run" + (f" ({rows})" if rows else "")
        )
        if p.replaces:
            warnings.append(
                f"warning: --overwrite replaces {job.out.child(p.spec.folder)} ({p.published} committed "
                f"shard{'s' if p.published != 1 else ''} written with another config; differing keys: "
                f"{', '.join(p.replaces)}) once the new run has committed all its shards; until then the "
                "old output stays readable"
            )
    planned = sum(s.input.rows for s in job.specs if s.name == "steer" and isinstance(s.input, InputPlan))
    for key, tally in job.rows.items():
        valued = tally.rows - tally.bad - tally.neutral
        rest = planned - tally.rows if key == "data.prompts" else 0
        lines.append(
            f"  {key}: {tally.rows} rows read: {valued} with a value, {tally.neutral} neutral (no value: generated "
            f"unsteered, keeping its method), {tally.bad} bad (each becomes an error row"
            + (f"; data.max_error_fraction = {job.cfg.data.max_error_fraction:g}" if tally.bad else "")
            + ")"
            + (f"; the other {rest} rows are screened by the workers" if rest > 0 else "")
            + (":" if tally.bad else "")
        )
        lines += tally.lines("      ")
        if tally.rows:
            lines.append("      (prompts over the token limit are found by the workers, with the tokenizer)")
        if tally.rows and not valued:
            warnings.append(f"warning: {key}: no row names a value: nothing would be steered")
        spec = job.spec("steer")
        if key == "data.prompts" and spec is not None and isinstance(spec.input, InputPlan):
            lines.append(f"      {files_line(spec.input)}")
            lines += [f"      {line}" for line in layout_lines(spec.input)]
    return [*lines, *warnings], sum(p.pending for p in plans)


def _input_rows(spec) -> str:
    from conva.jobs.registry import stage_decl

    unit = stage_decl(spec.name).input_noun
    if unit is None or spec.input is None:
        return ""
    rows = spec.input.rows if hasattr(spec.input, "rows") else spec.input.table.num_rows
    return f"{rows} {unit}"


def config(argv: list[str] | None = None) -> int:
    """``conva config --explain [SECTION]``: every key of the config (or of one section), documented;
    ``conva config --schema [--study]``: the JSON schema of a job (or study) config, for editors."""
    from conva.batch.config import Config, config_schema
    from conva.batch.configdoc import UnknownSectionError, explain
    from conva.batch.study import StudyConfig, study_schema

    parser = argparse.ArgumentParser(
        prog="conva config",
        description=COMMANDS["config"] + ". A job config has the "
        "sections model … ray; a study config adds study, judge, utility and fluency.",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--explain",
        nargs="?",
        const="",
        metavar="SECTION",
        help="print every key (of SECTION only, if given) with its type, default and meaning",
    )
    what.add_argument(
        "--schema",
        action="store_true",
        help="print the JSON schema of a job config (with --study: of a study config), for editors",
    )
    parser.add_argument("--study", action="store_true", help="with --schema: the study config's schema")
    args = parser.parse_args(argv)
    if args.schema:
        print(json.dumps(study_schema() if args.study else config_schema(), indent=2))
        return 0
    if args.study:
        parser.error("--study goes with --schema")
    try:
        print(explain((Config, StudyConfig), args.explain or None), end="")
    except UnknownSectionError as err:
        print(f"conva config: error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``conva`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_help(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(
            f"{_USAGE}\nconva: error: unknown command {command!r}; the commands are {', '.join(COMMANDS)} "
            "(`conva --help` says what each does)",
            file=sys.stderr,
        )
        return 2
    if command == "validate":
        return validate(rest)
    if command == "config":
        return config(rest)
    if command == "study":
        from conva.jobs.study import main as study_main

        return study_main(rest)
    if command == "report":
        from conva.batch.report import main as report_main

        return report_main(rest)
    from conva.jobs.runner import main as run_main

    return run_main(command, rest)


if __name__ == "__main__":
    sys.exit(main())
