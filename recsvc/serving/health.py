"""Whether Redis just failed: after a failure, requests go straight to the fallback for a while."""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class RedisHealth:
    """Remembers that Redis just failed, so the next requests go straight to the fallback.

    After a failure, requests skip Redis for ``recheck_s`` seconds instead of each waiting for a
    timeout; the first request after that window tries Redis again.
    """

    def __init__(self, recheck_s: float):
        self.recheck_s = recheck_s
        self._down_until = 0.0
        self.last_error: str | None = None
        #: The error's type only: safe to show to anyone (no host, port or path).
        self.last_error_kind: str | None = None
        self.last_failure_at: float | None = None

    def is_down(self) -> bool:
        return time.monotonic() < self._down_until

    def mark_down(self, error: BaseException) -> None:
        self._down_until = time.monotonic() + self.recheck_s
        self.last_error = f"{type(error).__name__}: {error}"
        self.last_error_kind = type(error).__name__
        self.last_failure_at = time.time()
        log.warning("redis unavailable, serving fallback for %.1fs: %s", self.recheck_s, self.last_error)

    def mark_up(self) -> None:
        self._down_until = 0.0
