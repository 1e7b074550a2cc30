"""How a worker's failure is reported to the driver: a typed error that says whether a retry can help.

A worker wraps whatever its shard raised in :class:`ShardError` with a ``kind``; the driver decides on
the kind, never on message text:

* ``oom``: the accelerator ran out of memory (``torch.OutOfMemoryError``): retried with batches half
  as large.
* ``transient``: I/O and network trouble that a later try may not meet (``OSError`` (pyarrow's I/O
  errors included), ``TimeoutError``, an LLM endpoint that kept answering 5xx): retried after a backoff.
* ``hardware``: the accelerator or its interconnect failed (a CUDA error such as an illegal memory
  access or an uncorrectable ECC error, an NCCL error, torch's ``AcceleratorError``): the worker is
  replaced (its device is suspect) and the shard retried on another, counted like a worker death
  (``ray.max_task_retries``). Torch raises most of these as plain ``RuntimeError`` s, so these alone
  are recognised by their message (:data:`HARDWARE_MARKERS`).
* ``fatal``: anything else (a bad bundle, a row-contract breach, a bug): fails the job at once, naming
  the shard. Retrying a deterministic failure only burns GPU time.

The bounds are ``ray.transient_retries`` per shard; worker deaths and timeouts are counted apart
(``ray.max_task_retries``).
"""

from __future__ import annotations

import urllib.error

__all__ = ["ShardError", "classify", "HARDWARE_MARKERS"]

KINDS = ("oom", "transient", "hardware", "fatal")
# What torch's and NCCL's messages say when the device itself failed (matched case-sensitively).
HARDWARE_MARKERS = (
    "CUDA error",
    "uncorrectable ECC error",
    "ECC error",
    "NCCL error",
    "NCCL communicator",
    "device-side assert",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "cudaErrorLaunchFailure",
)
_HARDWARE_TYPES = ("AcceleratorError", "DistBackendError", "DistNetworkError")


class ShardError(RuntimeError):
    """A shard attempt failed on a worker; ``kind`` is one of ``oom``, ``transient``, ``fatal``."""

    def __init__(self, kind: str, message: str, where: str = "") -> None:
        super().__init__(f"{message} (on {where})" if where else message)
        self.kind, self.message, self.where = kind, message, where

    def __reduce__(self):
        return (ShardError, (self.kind, self.message, self.where))


def classify(err: BaseException) -> str:
    """The kind of a worker-side exception (see the module docstring)."""
    if type(err).__name__ == "OutOfMemoryError" and type(err).__module__.startswith("torch"):
        return "oom"
    if type(err).__name__ in _HARDWARE_TYPES or (
        isinstance(err, RuntimeError) and any(m in str(err) for m in HARDWARE_MARKERS)
    ):
        return "hardware"
    if isinstance(err, urllib.error.HTTPError):
        return "transient" if err.code >= 500 or err.code == 429 else "fatal"
    if isinstance(err, (OSError, TimeoutError)):
        return "transient"
    if getattr(err, "transient", False):  # e.g. conva.batch.llm_client.LLMError after its own retries ran out
        return "transient"
    return "fatal"
