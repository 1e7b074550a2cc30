"""What every job shares: arguments, the output location, the run log in the store, joining or starting Ray, signals.

Failures a user can fix are :data:`EXPECTED_ERRORS`: reported as one line, exit code 2. SIGINT and
SIGTERM stop a job cleanly (:func:`interrupts`): one line saying what was committed and how to resume,
exit code 130 or 143.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import logging
import os
import shlex
import signal
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import conva
from conva.batch.config import Config, ConfigError, config_dict, load_config
from conva.batch.lease import LeaseError, renew_held
from conva.batch.storage import S3_HINT, Location, is_uri, location, s3_setup_problem
from conva.batch.store import StoreError
from conva.bundle import BundleError
from conva.data import DataError
from conva.jobs import COMMANDS
from conva.models import ModelNotFoundError

__all__ = [
    "JobError",
    "EXPECTED_ERRORS",
    "parse_args",
    "output_location",
    "setup_logging",
    "run_log",
    "write_config",
    "connect_ray",
    "RAY_PROBE",
    "log_config",
    "under_job_submission",
    "log_context",
    "Interrupted",
    "interrupts",
    "interrupted",
    "job_parser",
    "split_overrides",
    "CONFIG_HELP",
    "COMMANDS",
]

_log = logging.getLogger("conva.jobs")
# The folder holding the conva package: the checkout's root, or site-packages when installed. On
# PYTHONPATH it makes the embedded Ray's workers import the same conva (and conva.jobs/conva.workers).
_REPO = Path(conva.__file__).resolve().parents[1]
# Ray's job supervisor sets this in the environment of every driver started by `ray job submit`.
_SUBMITTED_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(context)s%(message)s"
# What a log line is about, e.g. the model of a study's pipeline thread: "[SmolLM2-135M-Instruct] ".
log_context: contextvars.ContextVar[str] = contextvars.ContextVar("conva_log_context", default="")


class JobError(RuntimeError):
    """A job that cannot run; the message says what to fix."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the driver.

    A KeyboardInterrupt, so that no ``except Exception`` swallows it and Ray's blocking calls give up
    when it is raised inside them (they then raise a plain KeyboardInterrupt: :func:`interrupted` says
    which signal it was).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """130 for SIGINT, 143 for SIGTERM: the shell's 128 + the signal's number."""
        return 128 + self.signum


def interrupted(err: KeyboardInterrupt) -> Interrupted:
    """The :class:`Interrupted` behind ``err`` (a KeyboardInterrupt Ray raised in its place names no signal)."""
    return err if isinstance(err, Interrupted) else Interrupted(_interrupts["seen"] or signal.SIGINT)


def report_interrupt(command: str, err: KeyboardInterrupt, committed: str | None, argv: list[str]) -> int:
    """Print a command's one line on an interrupt (what is committed, how to resume); return its exit code.

    ``committed``: what the stores hold (None when the interrupt came before the job was planned).
    """
    done = f"committed: {committed} (kept); " if committed is not None else ""
    print(
        f"conva {command}: interrupted by {interrupted(err)}; {done}rerun the same command to resume: "
        f"conva {command} {shlex.join(argv)}",
        file=sys.stderr,
    )
    return interrupted(err).exit_code


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_interrupts = {"active": False, "seen": 0}


def _on_signal(signum: int, _frame: object) -> None:
    if _interrupts["seen"]:  # a second signal while the first one's cleanup runs: leave at once
        print(f"conva: {signal.Signals(signum).name} again: exiting without cleaning up", file=sys.stderr)
        os._exit(128 + signum)
    _interrupts["seen"] = signum
    raise Interrupted(signum)


@contextmanager
def interrupts() -> Iterator[None]:
    """While the block runs (in the main thread), SIGINT and SIGTERM raise :class:`Interrupted`.

    The job unwinds through its ``finally`` blocks: the workers are stopped, the output's lease is
    released and the run log is flushed, and every committed shard stays committed. A second signal
    during that cleanup exits at once. (Ray's ``ray.init`` installs its own SIGTERM handler; :func:`connect_ray`
    puts this one back.)
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread may handle signals
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS}
    _interrupts.update(active=True, seen=0)
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        _interrupts["active"] = False
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _reinstall_interrupts() -> None:
    if _interrupts["active"] and threading.current_thread() is threading.main_thread():
        for sig in _STOP_SIGNALS:
            signal.signal(sig, _on_signal)


# Failures a user can fix: reported as one line, no traceback, exit code 2.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    JobError,
    ConfigError,
    ModelNotFoundError,
    DataError,
    BundleError,
    StoreError,
    LeaseError,
)


def under_job_submission() -> bool:
    """Whether this driver was started by ``ray job submit`` (its working folder is a temporary copy)."""
    return bool(os.environ.get(_SUBMITTED_ENV))


def output_location(cfg: Config) -> tuple[Config, Location]:
    """``output.dir`` as an absolute path or URI, and the config carrying it; refuses what workers could not see.

    Under ``ray job submit`` a relative path would land in the head's temporary copy of the working folder,
    which no other node sees and which is deleted with the job: refused, naming the key.
    """
    raw = cfg.output.dir
    if not raw.strip():
        raise ConfigError(
            "output.dir: empty: it would write into the current folder; name the output folder, e.g. "
            "--output.dir=runs/mine (or an s3:// URI)"
        )
    if not is_uri(raw) and not os.path.isabs(os.path.expanduser(raw)) and under_job_submission():
        raise ConfigError(
            f"output.dir: {raw!r} is relative; under `ray job submit` the driver runs in a temporary "
            "copy of the working folder on the head node, which the workers do not see and which is "
            "deleted with the job. Give an absolute path on storage every node mounts, or an s3:// URI"
        )
    problem = s3_setup_problem(raw) if raw.startswith("s3://") else None
    if problem is not None:
        raise ConfigError(f"output.dir: {problem}")
    try:
        out = location(raw)
    except ValueError as err:
        raise ConfigError(f"output.dir: {err}{S3_HINT if raw.startswith('s3://') else ''}") from err
    return cfg.model_copy(update={"output": cfg.output.model_copy(update={"dir": out.uri})}), out


CONFIG_HELP = (
    "Config keys: any --section.key=value overrides the config file, e.g. --steer.p0=0.99 or "
    "'--data.values=[\"power\"]' (values are TOML). `conva config --explain [SECTION]` gives every key's "
    "type, default and meaning. The keys:"
)


def job_parser(prog: str, description: str, *, study: bool = False) -> argparse.ArgumentParser:
    """The argument parser of a job command (``conva run`` …): its flags, and every config key in its help."""
    from conva.batch.config import Config
    from conva.batch.configdoc import key_index
    from conva.batch.study import StudyConfig

    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"{textwrap.fill(CONFIG_HELP, 100)}\n{key_index(*((Config, StudyConfig) if study else (Config,)))}\n",
        usage=f"{prog} --config FILE [--section.key=value ...] [options]",
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="the job's TOML or YAML config")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace outputs written with a different config, once the new run completes "
        "(default: refuse, naming the keys)",
    )
    parser.add_argument(
        "--break-lease",
        action="store_true",
        help="take over an output whose lease is stale (its driver died on another host)",
    )
    return parser


def split_overrides(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[argparse.Namespace, list[str]]:
    """The parser's flags and the ``--section.key=value`` overrides; anything else is a usage error."""
    args, rest = parser.parse_known_args(argv)
    for arg in rest:
        if not arg.startswith("--") or "=" not in arg or "." not in arg.split("=", 1)[0]:
            parser.error(f"unrecognised argument {arg!r}: config keys are given as --section.key=value")
    return args, rest


def parse_args(
    prog: str, argv: list[str] | None, description: str = "", parser: argparse.ArgumentParser | None = None
) -> tuple[Config, argparse.Namespace]:
    """``--config FILE [--section.key=value ...] [--overwrite] [--break-lease]`` → the config and the flags.

    ``parser``: a :func:`job_parser` with further flags. ``output.dir`` comes back absolute (see
    :func:`output_location`).
    """
    parser = parser or job_parser(prog, description or f"ConVA {prog} job")
    args, overrides = split_overrides(parser, argv)
    cfg, _ = output_location(load_config(args.config, overrides))
    args.overwrite = args.overwrite or cfg.output.overwrite
    return cfg, args


class _Context(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.context = log_context.get()
        return True


class _AboveBars(logging.StreamHandler):
    """A terminal's log handler: each line is printed above the progress bars, which are then redrawn."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging must never take a job down
            self.handleError(record)


def setup_logging() -> None:
    """INFO to stderr for the job's own loggers; quiet third-party chatter. On a terminal, lines print above bars."""
    root = logging.getLogger()
    if not any(getattr(h, "_conva", False) for h in root.handlers):
        handler: logging.Handler = (_AboveBars if sys.stderr.isatty() else logging.StreamHandler)(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler.addFilter(_Context())
        setattr(handler, "_conva", True)  # marks the job's own handler, so a second call adds none
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    for noisy in ("filelock", "urllib3", "ray", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _StoreLogHandler(logging.Handler):
    """Appends to ``<out>/run.log`` on any storage: lines go to a local file, copied to the store every few seconds.

    Object stores cannot append, so the whole log is rewritten each time (it is small); on a filesystem
    this is the same atomic replace. The previous runs' lines are kept at the top.
    """

    def __init__(self, out: Location, every_s: float = 5.0) -> None:
        super().__init__()
        self.target = out.child("run.log")
        fd, self.local = tempfile.mkstemp(prefix="conva-run-", suffix=".log")
        os.close(fd)
        try:
            previous = self.target.read_bytes()
        except (FileNotFoundError, OSError):
            previous = b""
        with open(self.local, "wb") as fh:
            fh.write(previous)
        self.setFormatter(logging.Formatter(_FORMAT))
        self.addFilter(_Context())
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._file_lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._sync_loop, args=(every_s,), name="conva-run-log", daemon=True
        )
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            with self._file_lock, open(self.local, "a", encoding="utf-8") as fh:
                fh.write(line)
            self._dirty.set()
        except Exception:  # logging must never take a job down
            self.handleError(record)

    def _sync_loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.sync()

    def sync(self) -> None:
        if not self._dirty.is_set():
            return
        self._dirty.clear()
        with self._file_lock, open(self.local, "rb") as fh:
            data = fh.read()
        try:
            self.target.write_bytes(data)
        except OSError as err:  # never fail a job over its log; try again at the next beat
            self._dirty.set()
            print(f"conva: cannot write {self.target}: {err}", file=sys.stderr)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sync()
        os.unlink(self.local)
        super().close()


@contextmanager
def run_log(out: Location) -> Iterator[None]:
    """Copy this job's log lines into ``<out>/run.log`` (after those of earlier runs) while the block runs."""
    handler = _StoreLogHandler(out)
    ours = logging.getLogger("conva")
    level = ours.level
    if ours.getEffectiveLevel() > logging.INFO:
        ours.setLevel(
            logging.INFO
        )  # the run log holds the job's INFO lines, whatever the caller's root level
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        ours.setLevel(level)


def log_config(cfg: Config, job: str, overwrite: bool) -> None:
    """The full config, once, and a loud warning when it lets model code run."""
    _log.info("job %s (overwrite=%s), config:\n%s", job, overwrite, json.dumps(config_dict(cfg), indent=1))
    if cfg.model.trust_remote_code:
        _log.warning(
            "model.trust_remote_code is ON: code shipped with %s will run in every worker", cfg.model.name
        )


def write_config(cfg: Config, out: Location) -> None:
    """``<out>/config.json``: the config of the published outputs (replaced atomically).

    Its canonical hash is every generation row's ``config_sha256`` (:mod:`conva.batch.provenance`).
    """
    out.child("config.json").write_text(json.dumps(config_dict(cfg), indent=1, sort_keys=True))


class _RayProbe:
    """The output lease's view of Ray (:class:`conva.batch.lease.ClusterProbe`): which cluster and job this
    driver is, and which jobs a cluster at some address reports finished."""

    def identity(self) -> dict:
        import ray

        if not ray.is_initialized():
            return {}
        ctx = ray.get_runtime_context()
        node: Any = (
            ray._private.worker.global_worker.node
        )  # Ray's own handle: no public API names the cluster id
        cluster_id = node.cluster_id.hex()
        return {"gcs_address": ctx.gcs_address, "cluster_id": cluster_id, "job_id": ctx.get_job_id()}

    def jobs(self, address: str, cluster_id: str | None) -> dict[str, bool] | None:
        from ray._raylet import GcsClient  # type: ignore[attr-defined]  # compiled, no stubs; stable since Ray 2.8

        client = GcsClient(address=address)
        if cluster_id and client.cluster_id.hex() != cluster_id:
            return None
        return {k.hex(): bool(v.is_dead) for k, v in client.get_all_job_info(timeout=5).items()}


RAY_PROBE = _RayProbe()


def connect_ray() -> None:
    """Join the cluster in ``RAY_ADDRESS``, reuse a Ray already started here, or start one on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        _check_ray_address(os.environ["RAY_ADDRESS"])
        ray.init(logging_level=logging.WARNING)
        _reinstall_interrupts()
        renew_held()  # the lease now names this cluster and job
        _log.info("joined Ray cluster at %s: %s", os.environ["RAY_ADDRESS"], ray.cluster_resources())
        return
    _loopback_only()
    # Loopback only, no dashboard. Workers import this checkout's packages through PYTHONPATH, set in the
    # environment the local raylet starts with (its workers inherit it), not as a runtime_env: a job with a
    # runtime_env starts every worker through Ray's setup_worker wrapper, a second interpreter that imports Ray
    # (measured here: 0.45 CPU-s and 0.4 s more per actor), and cannot use the workers Ray starts ahead.
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO), old) if p)
    try:
        ray.init(
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level=logging.WARNING,
        )
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    _reinstall_interrupts()
    renew_held()
    _log.info("started a local Ray on 127.0.0.1: %s", ray.cluster_resources())


_RAY_ADDRESS_TIMEOUT_S = 5.0


def _check_ray_address(address: str, timeout_s: float = _RAY_ADDRESS_TIMEOUT_S) -> None:
    """Refuse at once a ``RAY_ADDRESS`` at which nothing answers (``ray.init`` would retry for minutes)."""
    import socket
    from urllib.parse import urlparse

    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        return
    answer: list[OSError | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            answer.append(None)
        except OSError as err:
            answer.append(err)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if answer and answer[0] is None:
        return
    why = f"{type(answer[0]).__name__}: {answer[0]}" if answer else f"no answer within {timeout_s:g} s"
    raise JobError(
        f"RAY_ADDRESS={address}: no Ray cluster answers at {host}:{port} ({why}). Start one there "
        "(`ray start --head --node-ip-address=127.0.0.1 --port=6379` on a laptop), or unset RAY_ADDRESS to run "
        "on an embedded local Ray"
    )


def _loopback_only() -> None:
    """Make the embedded Ray bind 127.0.0.1 only (Ray otherwise binds this machine's public address too)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray._private import ray_constants

    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import; with it on, its servers listen on all
    # interfaces whatever node address they are given, so set the constant too in case ray was imported first.
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        ray_constants.ENABLE_RAY_CLUSTER = False
