"""Log lines: one JSON object per line for machines, or plain text for people; set up in one place.

Every process of recsvc -- a command, the gunicorn master and each worker -- logs through the root
logger with :class:`JsonFormatter` or :class:`TextFormatter` on stderr, at ``RECSVC_LOG_LEVEL``.
Structured fields are passed as ``extra={"fields": {...}}`` and become keys of the JSON object
(``request_id``, ``endpoint``, ``status``...); :func:`log_fields` is the shorthand.

Nothing here formats a request's headers, query string or body: callers name the fields they log,
so an API key can only reach a log line if some code puts it into ``fields`` -- none does.
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, TextIO, cast

#: ``RECSVC_LOG_FORMAT`` values.
FORMATS = ("auto", "json", "text")

# One encoder for every line: json.dumps with options builds a new encoder per call (~4 µs).
_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode

# The LogRecord attribute that carries a line's structured fields (set through ``extra=``).
_FIELDS_ATTR = "fields"


def log_fields(**fields: Any) -> dict[str, Any]:
    """``extra=`` for a structured log line: ``log.info("msg", extra=log_fields(status=200))``."""
    return {_FIELDS_ATTR: fields}


_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def _iso(created: float) -> str:
    whole = int(created)
    if _second[0] != whole:  # one strftime per second, not per line
        _second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second[0] = whole
    return f"{_second[1]}.{int(created % 1 * 1000):03d}Z"


def envelope(logger: str, level: str, msg: str, created: float | None = None) -> dict[str, Any]:
    """The first keys of every JSON line: ``ts``, ``level``, ``logger``, ``pid``, ``msg``."""
    when = time.time() if created is None else created
    return {"ts": _iso(when), "level": level, "logger": logger, "pid": os.getpid(), "msg": msg}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "pid", "msg", **fields}`` on one line; exceptions as ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        out = envelope(record.name, record.levelname.lower(), record.getMessage(), record.created)
        fields = getattr(record, _FIELDS_ATTR, None)
        if type(fields) is dict:  # an isinstance against Mapping costs more than the rest
            for key, value in fields.items():
                out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return _encode(out)


class TextFormatter(logging.Formatter):
    """``2026-12-02T10:00:00.123Z INFO logger: message key=value ...`` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_iso(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        fields = getattr(record, _FIELDS_ATTR, None)
        if isinstance(fields, Mapping) and fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class LineHandler(logging.Handler):
    """Writes formatted lines to a stream, optionally in batches (the server's request lines).

    Writing and flushing one line per request costs more than the rest of the log line; with
    ``flush_s`` > 0 lines are collected and written at most ``flush_s`` seconds later (by a
    background thread), when 64 KiB are waiting, at a WARNING or higher, for an audit line, and
    when the process exits normally. A process killed with SIGKILL loses its last ``flush_s``
    seconds of lines.
    """

    CAPACITY = 64 * 1024

    def __init__(self, stream: TextIO | None = None, flush_s: float = 0.0):
        super().__init__()
        self.stream = stream if stream is not None else sys.stderr
        self.flush_s = flush_s
        self._pending: list[str] = []
        self._size = 0
        self._thread_pid: int | None = None  # the thread does not survive a fork: one per process
        # A forked child (a gunicorn worker) must not write the lines its parent still holds.
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._pending, self._size = [], 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:  # noqa: BLE001 -- logging must never raise into the caller
            self.handleError(record)
            return
        if self.flush_s <= 0:
            self._write(line)
            return
        fields = getattr(record, _FIELDS_ATTR, None)
        urgent = record.levelno >= logging.WARNING or (type(fields) is dict and "audit" in fields)
        self.write_line(line, urgent)

    def write_line(self, line: str, urgent: bool = False) -> None:
        """Write one formatted line (ending in a newline), batched unless ``urgent``."""
        if self.flush_s <= 0:
            self._write(line)
            return
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            self._pending.append(line)
            self._size += len(line)
            full = self._size >= self.CAPACITY
        if urgent or full:
            self.flush()
        elif self._thread_pid != os.getpid():
            self._thread_pid = os.getpid()
            threading.Thread(target=self._flush_every, name="log-flush", daemon=True).start()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            text, self._pending, self._size = "".join(self._pending), [], 0
        if text:
            self._write(text)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stderr must not break the request

    def _flush_every(self) -> None:
        while True:
            time.sleep(self.flush_s)
            self.flush()


def direct_json_handler(logger: logging.Logger, level: int = logging.INFO) -> LineHandler | None:
    """The one handler a ``level`` line of ``logger`` would reach, when writing to it directly
    gives the same line: a :class:`LineHandler` with a :class:`JsonFormatter`, no filters on the way.

    The per-request line is written this way (building a LogRecord and formatting it cost ~45 µs of
    a ~400 µs request in bench measurements); anything else (text format, caplog, extra handlers)
    returns None and the caller logs as usual.
    """
    if not logger.isEnabledFor(level):
        return None
    reached: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        reached.extend(current.handlers)
        current = current.parent if current.propagate else None
    if len(reached) != 1:
        return None
    handler = reached[0]
    ok = (
        isinstance(handler, LineHandler)
        and type(handler.formatter) is JsonFormatter
        and not handler.filters
        and handler.level <= level
    )
    return cast(LineHandler, handler) if ok else None


def resolve_format(log_format: str, stream: Any = None) -> str:
    """``json`` or ``text``: ``auto`` is text on a terminal and json otherwise.

    Raises
    ------
    ValueError
        ``log_format`` is none of :data:`FORMATS`.
    """
    if log_format not in FORMATS:
        raise ValueError(f"RECSVC_LOG_FORMAT must be one of {', '.join(FORMATS)}, not {log_format!r}")
    if log_format != "auto":
        return log_format
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def formatter_for(log_format: str) -> logging.Formatter:
    """The formatter of a resolved format (``json`` or ``text``)."""
    return JsonFormatter() if resolve_format(log_format) == "json" else TextFormatter()


def check_level(level: str) -> str:
    """``level`` upper-cased when it is a logging level name.

    Raises
    ------
    ValueError
        Not one of DEBUG, INFO, WARNING, ERROR, CRITICAL.
    """
    name = str(level).upper()
    if name not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError(f"RECSVC_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not {level!r}")
    return name


def dict_config(level: str, log_format: str, flush_s: float = 0.0) -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` document: root, gunicorn's error log, one stderr handler.

    Passed to gunicorn (``logconfig_dict``) so that its master and workers log like every other
    recsvc process; loggers created before (recsvc's module loggers) are kept. ``flush_s``: see
    :class:`LineHandler` (the server batches; a command writes each line at once).
    """
    kind = resolve_format(log_format)
    cls = JsonFormatter if kind == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"recsvc": {"()": f"{cls.__module__}.{cls.__qualname__}"}},
        "handlers": {
            "stderr": {
                "()": f"{LineHandler.__module__}.{LineHandler.__qualname__}",
                "formatter": "recsvc",
                "stream": "ext://sys.stderr",
                "flush_s": flush_s,
            }
        },
        "root": {"level": check_level(level), "handlers": ["stderr"]},
        "loggers": {
            # gunicorn.access is left as gunicorn sets it (off unless --access-log): recsvc writes
            # its own structured line per request (logger recsvc.request).
            "gunicorn.error": {"level": check_level(level), "handlers": ["stderr"], "propagate": False},
        },
    }


def configure(level: str, log_format: str, flush_s: float = 0.0) -> None:
    """Send every log line of this process to stderr in ``log_format`` at ``level`` (idempotent).

    Our formats use neither the caller's file and line nor the process name: not collecting them
    saves a stack walk and a lookup per line (the logging HOWTO's "Optimization").
    """
    logging._srcfile = None
    logging.logMultiprocessing = False
    logging.config.dictConfig(dict_config(level, log_format, flush_s))
