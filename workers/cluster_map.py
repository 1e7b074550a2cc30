"""A pure function mapped over items as Ray tasks on the cluster, results in order.

The driver's share of a pass over a large input: the range index of a JSON Lines prompts file
(:mod:`conva.batch.line_index`) runs one task per 256 MiB range, on whatever nodes have a CPU free, so the
driver neither reads the bytes nor spends the CPU. A task that fails (a node that cannot read the file)
raises its own error, which names the node, not Ray's wrapper.

Example (with Ray started)::

    cluster_map(lambda bound: index_range(uri, *bound, 32), [(0, 2**28), (2**28, size)])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

__all__ = ["cluster_map"]

T = TypeVar("T")
R = TypeVar("R")


def cluster_map(fn: Callable[[T], R], items: Iterable[T], num_cpus: float = 1) -> list[R]:
    """``[fn(item) for item in items]``, each call a Ray task of ``num_cpus`` CPUs (Ray must be connected)."""
    import ray

    task: Any = ray.remote(num_cpus=num_cpus)(_on_node)
    refs = [task.remote(fn, item) for item in items]
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise


def _on_node(fn: Callable[[T], R], item: T) -> R:
    try:
        return fn(item)
    except OSError as err:
        import ray

        raise type(err)(f"on node {ray.util.get_node_ip_address()}: {err}") from err
