"""A small client for OpenAI-compatible chat endpoints: retries with backoff, a concurrency limit, a disk cache.

Only the standard library is used (``urllib``), so judges work wherever the project does. The API key is
read from the environment variable ``api_key_env`` names, **at request time only**: it is never an
attribute, never in the cache (whose key hashes the endpoint, model, messages and sampling settings —
not the key) and never in an error message.

Example:
    >>> client = ChatClient("http://127.0.0.1:8000/v1", "judge-model", cache_dir="/tmp/cache")  # doctest: +SKIP
    >>> client.complete_many([[{"role": "user", "content": "Say yes."}]], max_tokens=2)         # doctest: +SKIP
    ['Yes']
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

from conva.files import atomic_write

__all__ = ["ChatClient", "LLMError", "request_key", "judge_chat"]

_log = logging.getLogger(__name__)
Messages = list[dict[str, str]]
_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class LLMError(RuntimeError):
    """An endpoint that kept failing past its retries (``transient``: a later try may work), or refused a request."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def request_key(base_url: str, model: str, messages: Messages, max_tokens: int, temperature: float) -> str:
    """sha256 of the request as sent (without any credential): the cache's key."""
    body = {
        "base_url": base_url.rstrip("/"),
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class ChatClient:
    """POSTs ``/chat/completions``; ``requests_sent`` and ``cache_hits`` count what each call cost."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str = "",
        max_concurrency: int = 4,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        timeout_s: float = 60.0,
        temperature: float = 0.0,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        if max_concurrency < 1 or max_retries < 0:
            raise ValueError("max_concurrency must be >= 1 and max_retries >= 0")
        self.base_url, self.model, self.api_key_env = base_url.rstrip("/"), model, api_key_env
        self.max_concurrency, self.max_retries, self.backoff_s = max_concurrency, max_retries, backoff_s
        self.timeout_s, self.temperature = timeout_s, temperature
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.requests_sent = self.cache_hits = 0
        self._lock = threading.Lock()

    def complete_many(self, requests: Sequence[Messages], max_tokens: int = 8) -> list[str]:
        """Replies in order; at most ``max_concurrency`` requests are in flight at once."""
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(requests))) as pool:
            return list(pool.map(lambda m: self.complete(m, max_tokens), requests))

    def complete(self, messages: Messages, max_tokens: int = 8) -> str:
        """One reply, from the cache when this exact request was answered before."""
        key = request_key(self.base_url, self.model, messages, max_tokens, self.temperature)
        cached = self._read_cache(key)
        if cached is not None:
            with self._lock:
                self.cache_hits += 1
            return cached
        reply = self._post_with_retries(messages, max_tokens)
        self._write_cache(key, reply)
        return reply

    def _post_with_retries(self, messages: Messages, max_tokens: int) -> str:
        for attempt in range(self.max_retries + 1):
            try:
                return self._post(messages, max_tokens)
            except urllib.error.HTTPError as err:
                if err.code not in _RETRY_STATUS:
                    raise LLMError(f"{self.base_url}: HTTP {err.code} {err.reason} (not retried)") from None
                problem = f"HTTP {err.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                problem = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            if attempt == self.max_retries:
                raise LLMError(
                    f"{self.base_url}: failed after {attempt + 1} attempts (last: {problem})", transient=True
                )
            # Exponential backoff with jitter, so concurrent callers do not retry in lock-step.
            delay = self.backoff_s * (2**attempt) * (1.0 + 0.25 * random.random())
            _log.warning(
                "%s: %s; retry %d/%d in %.1f s", self.base_url, problem, attempt + 1, self.max_retries, delay
            )
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _post(self, messages: Messages, max_tokens: int) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": self.temperature,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(
            f"{self.base_url}/chat/completions", data=body, headers=headers, method="POST"
        )
        with self._lock:
            self.requests_sent += 1
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            payload = json.loads(response.read().decode("utf-8"))
        try:
            return str(payload["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError) as err:
            raise LLMError(f"{self.base_url}: unexpected response shape ({type(err).__name__})") from None

    def _path(self, key: str) -> Path | None:
        return self.cache_dir / key[:2] / f"{key}.json" if self.cache_dir else None

    def _read_cache(self, key: str) -> str | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            return str(json.loads(path.read_text())["reply"])
        except (OSError, ValueError, KeyError):
            return None  # a torn or foreign file is simply a miss; it is rewritten below

    def _write_cache(self, key: str, reply: str) -> None:
        path = self._path(key)
        if path is None:
            return
        atomic_write(path, json.dumps({"model": self.model, "reply": reply}).encode())


def judge_chat(settings, cache_dir: str = "") -> Callable[[Sequence[Messages], int], list[str]]:
    """The chat function the ``llm`` judge calls (:data:`conva.judges.Chat`), built from its ``[judge]``
    settings (a :class:`conva.judges.JudgeSettings`): a :class:`ChatClient`'s ``complete_many``, its replies
    cached under ``settings.cache_dir`` or else ``cache_dir``."""
    if not settings.base_url or not settings.model:
        raise ValueError("judge.kind = 'llm' needs judge.base_url and judge.model")
    client = ChatClient(
        settings.base_url,
        settings.model,
        api_key_env=settings.api_key_env,
        max_concurrency=settings.max_concurrency,
        max_retries=settings.max_retries,
        backoff_s=settings.backoff_s,
        timeout_s=settings.timeout_s,
        cache_dir=settings.cache_dir or cache_dir or None,
    )
    return client.complete_many
