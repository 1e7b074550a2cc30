"""A stage as pre-flight and readers see it, without opening it: how far it got, and whether a config matches.

Reads the log (:func:`conva.batch.store.log.replay`) and writes nothing: :func:`stage_status` for
``conva validate`` and resumes, :func:`stage_mismatch` to refuse a changed config before anything is written.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from conva.batch.storage import Location
from conva.batch.store.keys import normalize
from conva.batch.store.log import LEGACY_MANIFEST, LOG_DIR, Generation, mismatch, replay
from conva.batch.store.records import check_name


@dataclass(frozen=True)
class StageStatus:
    """What a stage holds, read without writing anything: for ``validate`` and reports.

    ``committed``/``n_shards``/``mismatch`` describe the published generation; ``resumable`` counts the
    committed shards of an unfinished generation (an interrupted ``--overwrite``) whose config is the one
    asked about: a rerun with ``--overwrite`` resumes it.
    """

    exists: bool
    committed: int = 0
    n_shards: int = 0
    mismatch: tuple[str, ...] = ()
    pending_generation: bool = False
    resumable: int = 0


def stage_status(
    out: Location,
    stage: str,
    config: dict | None = None,
    schema_version: int = 0,
    *,
    ignore_keys: Iterable[str] = (),
) -> StageStatus:
    """The stage's published generation: committed shards, and the keys in which ``config`` differs from it."""
    folder = out.child(check_name(stage, "stage name"))
    if folder.child(LEGACY_MANIFEST).exists() and not folder.child(LOG_DIR).exists():
        return StageStatus(True, mismatch=("schema_version",))
    state = replay(folder)
    cur = state.gens.get(state.current) if state.current is not None else None
    if cur is None:
        return StageStatus(False)
    keys: tuple[str, ...] = ()
    resumable = 0
    if config is not None:
        probe = Generation(
            0, normalize(config), "", schema_version, tuple(sorted({*ignore_keys, *cur.ignore_keys})), 0
        )
        keys = tuple(mismatch(cur, probe))
        unfinished = [g for n, g in state.gens.items() if n != state.current and not mismatch(g, probe)]
        resumable = max((len(g.shards) for g in unfinished), default=0)
    pending = any(g != state.current for g in state.gens)
    return StageStatus(True, len(cur.shards), cur.n_shards, keys, pending, resumable)


def stage_mismatch(
    out: Location, stage: str, config: dict, schema_version: int, *, ignore_keys: Iterable[str] = ()
) -> list[str]:
    """The keys that would make :meth:`Stage.open` refuse ``<out>/<stage>`` (empty if none); writes nothing."""
    return list(stage_status(out, stage, config, schema_version, ignore_keys=ignore_keys).mismatch)
