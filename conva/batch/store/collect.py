"""What reopening a stage collects: attempts no commit needs, and published-looking files no commit lists.

A stage's folder is listed once when it is opened (``listing``: object name → bytes). Attempt folders
(``_attempts/g<gen>/<shard>-<attempt>/``) that hold no committed, unpublished object belong to failed,
raced or zombie attempts; files outside ``_``/``.`` names that the current generation does not list are
strays (an interrupted generation switch, an overwrite, a hand-copied file).
"""

from __future__ import annotations

import logging

from conva.batch.storage import Location
from conva.batch.store.log import ATTEMPTS_DIR

__all__ = ["delete_dead_attempts", "strays"]

_log = logging.getLogger(__name__)


def delete_dead_attempts(location: Location, listing: dict[str, int], live: set[str]) -> None:
    """Delete the attempt folders under ``location`` not in ``live``, in batches (a tree delete locally)."""
    dead: dict[str, list[str]] = {}
    for name in listing:
        if name.startswith(ATTEMPTS_DIR + "/"):
            folder = "/".join(name.split("/")[:3])
            if folder not in live:
                dead.setdefault(folder, []).append(name)
    if dead:
        _log.info(
            "%s: deleting the objects of %d uncommitted attempts (%s%s)",
            location,
            len(dead),
            ", ".join(sorted(dead)[:3]),
            ", …" if len(dead) > 3 else "",
        )
    if location.is_local:
        for folder in sorted(dead):
            location.child(folder).delete_tree()
    else:
        location.delete_many([n for names in dead.values() for n in names])


def strays(listing: dict[str, int], named: set[str]) -> list[str]:
    """Published-looking files (no ``_`` or ``.`` prefix) that are not among the ``named`` objects."""
    return sorted(n for n in listing if not n.startswith(("_", ".")) and n not in named)
