"""What every job shares: arguments, logging to ``<out>/run.log``, joining or starting Ray, clean failures."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from conva.bundle import BundleError
from conva.config import Config, ConfigError, config_dict, load_config
from conva.data import DataError
from conva.models import ModelNotFoundError
from conva.store import OutputNotWritableError, StoreError

__all__ = ["JobError", "EXPECTED_ERRORS", "parse_args", "setup_logging", "attach_run_log", "write_config",
           "connect_ray", "log_config"]

_log = logging.getLogger("conva.jobs")
_REPO = Path(__file__).resolve().parents[1]


class JobError(RuntimeError):
    """A job that cannot run; the message says what to fix."""


# Failures a user can fix: reported as one line, no traceback, exit code 2.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    JobError, ConfigError, ModelNotFoundError, DataError, OutputNotWritableError, BundleError, StoreError,
)


def parse_args(prog: str, argv: list[str] | None) -> tuple[Config, bool]:
    """``--config FILE [--section.key=value ...] [--overwrite]`` → the validated config and the overwrite flag."""
    parser = argparse.ArgumentParser(prog=prog, description=f"ConVA {prog} job",
                                     epilog="Any --section.key=value overrides the config file, e.g. --steer.p0=0.99")
    parser.add_argument("--config", required=True, help="TOML or YAML job config")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace outputs written with a different config (default: refuse, naming the keys)")
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    return cfg, args.overwrite or cfg.output.overwrite


def setup_logging() -> None:
    """INFO to stderr for the job's own loggers; quiet third-party chatter."""
    root = logging.getLogger()
    if not any(getattr(h, "_conva", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._conva = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    for noisy in ("filelock", "urllib3", "ray", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def attach_run_log(out: Path) -> logging.Handler:
    """Append this job's log to ``<out>/run.log`` (the caller removes the handler when the job ends)."""
    handler = logging.FileHandler(out / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def log_config(cfg: Config, job: str, overwrite: bool) -> None:
    """The full config, once, and a loud warning when it lets model code run."""
    _log.info("job %s (overwrite=%s), config:\n%s", job, overwrite, json.dumps(config_dict(cfg), indent=1))
    if cfg.model.trust_remote_code:
        _log.warning("model.trust_remote_code is ON: code shipped with %s will run in every worker",
                     cfg.model.name)


def write_config(cfg: Config, out: Path) -> None:
    """``<out>/config.json``: the config of the latest job run on this folder (replaced atomically)."""
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".config-")
    with os.fdopen(fd, "w") as fh:
        json.dump(config_dict(cfg), fh, indent=1, sort_keys=True)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; it is an ordinary output file
    os.replace(tmp, out / "config.json")


def connect_ray(cfg: Config) -> None:
    """Join the cluster in ``RAY_ADDRESS``, reuse a Ray already started here, or start one on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
        _log.info("joined Ray cluster at %s: %s", os.environ["RAY_ADDRESS"], ray.cluster_resources())
    else:
        _loopback_only()
        # Loopback only, no dashboard; workers import this checkout's packages through PYTHONPATH.
        path = os.pathsep.join(p for p in (str(_REPO), os.environ.get("PYTHONPATH")) if p)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING, runtime_env={"env_vars": {"PYTHONPATH": path}})
        _log.info("started a local Ray on 127.0.0.1: %s", ray.cluster_resources())
    _check_resources(cfg)


def _loopback_only() -> None:
    """Make the embedded Ray bind 127.0.0.1 even if ray was imported before ``jobs`` set its environment."""
    from ray._private import ray_constants

    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import; with it on, its servers listen on all
    # interfaces whatever node address they are given. jobs/__init__ sets the variable before that import
    # in the normal case; this covers a caller that imported ray first.
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        ray_constants.ENABLE_RAY_CLUSTER = False


def _check_resources(cfg: Config) -> None:
    """Refuse a worker shape no node can host (it would wait forever); warn if fewer fit than asked."""
    import ray

    r, nodes = cfg.ray, [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fits = sum(min(int(n.get("CPU", 0) // r.num_cpus_per_worker) if r.num_cpus_per_worker else r.num_workers,
                   int(n.get("GPU", 0) // r.num_gpus_per_worker) if r.num_gpus_per_worker else r.num_workers)
               for n in nodes)
    if fits == 0 and not os.environ.get("RAY_ADDRESS"):
        raise JobError(f"ray: no node can host a worker with {r.num_cpus_per_worker} CPU and "
                       f"{r.num_gpus_per_worker} GPU (nodes: {nodes}); lower ray.num_cpus_per_worker/num_gpus_per_worker")
    if fits < r.num_workers:
        _log.warning("ray: room for %d of %d workers right now; the rest wait for resources", fits, r.num_workers)
