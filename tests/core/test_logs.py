"""Log lines: one JSON object per line with the structured fields, or text; level and format checked."""

from __future__ import annotations

import io
import json
import logging

import pytest

from recsvc.core.logs import (
    JsonFormatter,
    LineHandler,
    TextFormatter,
    check_level,
    dict_config,
    log_fields,
    resolve_format,
)


def _record(**fields) -> logging.LogRecord:
    record = logging.LogRecord("recsvc.request", logging.INFO, __file__, 1, "request %s", ("done",), None)
    record.__dict__.update(log_fields(**fields))
    return record


def test_json_lines_carry_the_fields_after_the_envelope():
    line = JsonFormatter().format(_record(status=200, request_id="r1", latency_ms=1.25))
    assert "\n" not in line
    body = json.loads(line)
    assert list(body)[:5] == ["ts", "level", "logger", "pid", "msg"]
    assert body["msg"] == "request done" and body["level"] == "info" and body["logger"] == "recsvc.request"
    assert (body["status"], body["request_id"], body["latency_ms"]) == (200, "r1", 1.25)
    assert body["ts"].endswith("Z")


def test_a_field_never_replaces_the_envelope_and_exceptions_stay_on_one_line():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = _record(msg="overwritten?")
        record.exc_info = __import__("sys").exc_info()
    body = json.loads(JsonFormatter().format(record))
    assert body["msg"] == "request done" and "RuntimeError: boom" in body["exc"]


def test_text_lines_for_people():
    line = TextFormatter().format(_record(status=200))
    assert "INFO recsvc.request: request done status=200" in line


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_and_level_from_the_environment_are_checked():
    assert resolve_format("auto", _Tty()) == "text"
    assert resolve_format("auto", io.StringIO()) == "json"
    assert resolve_format("json", _Tty()) == "json"
    with pytest.raises(ValueError, match="RECSVC_LOG_FORMAT"):
        resolve_format("xml")
    assert check_level("warning") == "WARNING"
    with pytest.raises(ValueError, match="RECSVC_LOG_LEVEL"):
        check_level("loud")


def test_gunicorn_logging_config_keeps_existing_loggers_and_leaves_the_access_log_alone():
    config = dict_config("INFO", "json")
    assert config["disable_existing_loggers"] is False
    assert config["root"]["level"] == "INFO" and "gunicorn.access" not in config["loggers"]
    logging.config.dictConfig({**config, "root": {"level": "INFO", "handlers": []}})  # it is valid


def _handler(flush_s: float) -> tuple[LineHandler, io.StringIO, logging.Logger]:
    out = io.StringIO()
    handler = LineHandler(out, flush_s=flush_s)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"test.lines.{flush_s}")
    logger.handlers[:] = [handler]
    logger.propagate, logger.level = False, logging.INFO
    return handler, out, logger


def test_batched_lines_come_out_within_the_flush_interval_and_urgent_ones_at_once():
    import time

    handler, out, logger = _handler(0.2)
    logger.info("request", extra=log_fields(status=200))
    assert out.getvalue() == ""  # waiting for the next batch
    deadline = time.monotonic() + 5
    while not out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert json.loads(out.getvalue())["status"] == 200
    logger.info("admin publish", extra=log_fields(audit="publish"))
    assert '"audit":"publish"' in out.getvalue()  # audit lines are never held back
    logger.warning("redis unavailable")
    assert "redis unavailable" in out.getvalue()
    logger.info("last one")
    handler.flush()  # what logging.shutdown does at a normal exit
    assert "last one" in out.getvalue()


def test_unbatched_lines_are_written_at_once():
    _, out, logger = _handler(0.0)
    logger.info("now")
    assert json.loads(out.getvalue())["msg"] == "now"
