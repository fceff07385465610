"""One error hierarchy for the whole project, and the process exit codes it maps to.

Every error recsvc raises on purpose is a :class:`RecsvcError`. Its kind says what the caller can do
about it, and the two edges map kinds once: the web layer to an HTTP status, the command line to an
:class:`ExitCode`. Specific errors (a bad events file, a failed publish...) subclass a kind and keep
their own fields.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of every ``recsvc`` command (documented in the README)."""

    OK = 0
    FAILED = 1  # unexpected error, or a missing/corrupt artifact; nothing live changed
    BAD_INPUT = 2  # unusable input file or option (click usage errors are 2 as well)
    UNAVAILABLE = 3  # Redis unreachable
    GATE_REFUSED = 3  # retrain: the new model did not pass the quality gate; the live one serves on
    LOCKED = 4  # another run holds the lock


class RecsvcError(Exception):
    """Base of every error recsvc raises on purpose; ``field`` names the input at fault, if any."""

    exit_code = ExitCode.FAILED

    def __init__(self, message: str = "", *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


class BadInput(RecsvcError, ValueError):
    """The caller's input breaks a rule (a file, a request body, an option)."""

    exit_code = ExitCode.BAD_INPUT


class NotFound(RecsvcError, LookupError):
    """What was asked for does not exist (a version, an experiment, an item)."""


class NotPublished(NotFound):
    """Redis holds no complete version under the name asked for (or nothing is live)."""


class Unavailable(RecsvcError):
    """A dependency (Redis) cannot take the request now; retrying later may work."""

    exit_code = ExitCode.UNAVAILABLE


class OutcomeUnknown(Unavailable):
    """A write's reply was lost and could not be learned in time: it may or may not have happened.

    ``batch_id`` names the write; repeating it under that id applies it exactly once.
    """

    def __init__(self, message: str, *, batch_id: str):
        super().__init__(message)
        self.batch_id = batch_id


class Conflict(RecsvcError):
    """The request cannot be applied in the current state (nothing to roll back to, ...)."""


class Locked(Conflict):
    """Another run holds the lock this one needs."""

    exit_code = ExitCode.LOCKED


class Failed(RecsvcError):
    """A job could not complete; what was live before is unchanged."""


class RateLimited(RecsvcError):
    """Too many requests for one key in the current window."""

    def __init__(self, message: str, retry_after_s: int, limit: int):
        super().__init__(message)
        self.retry_after_s, self.limit = retry_after_s, limit
