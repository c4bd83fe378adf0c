"""Process logging: text or JSON lines on stderr, each line carrying the row ids it is about.

``log_context(job_id=..., study_pk=..., series_pk=...)`` sets the ids for everything logged inside
it (by us or by a library, in this thread); the formatter adds them: ``[job=12 study=3 series=7]``
in text, fields ``job_id``, ``study_pk`` ... in JSON (``logging.format: json``), so a log shipper
can follow one study or one job across the listener, the workers and the dispatcher.

Only ids and UIDs go in the context, never data set values.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from contextlib import contextmanager
from typing import Any

from pynetdicom import _config as pynetdicom_config

CONTEXT_KEYS = ("job_id", "study_pk", "series_pk", "instance_pk", "sop_uid", "destination")
_SHORT = {"job_id": "job", "study_pk": "study", "series_pk": "series", "instance_pk": "instance",
          "sop_uid": "sop", "destination": "destination"}
OWN_PACKAGES = frozenset({"common", "config", "cradle", "inference", "node", "storage", "training"})
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("cradle_log_context", default={})


@contextmanager
def log_context(**ids: Any) -> Iterator[None]:
    """Row ids (``job_id``, ``study_pk``, ``series_pk``, ``instance_pk``, ``sop_uid``,
    ``destination``) for every record logged inside the block."""
    unknown = set(ids) - set(CONTEXT_KEYS)
    if unknown:
        raise ValueError(f"not a log context key: {', '.join(sorted(unknown))}")
    token = _context.set({**_context.get(), **{k: v for k, v in ids.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


def current_context() -> dict[str, Any]:
    return dict(_context.get())


class ContextFilter(logging.Filter):
    """Puts the current ids on the record (``record.job_id`` ...) unless the call gave its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def _ids(record: logging.LogRecord) -> dict[str, Any]:
    return {key: getattr(record, key) for key in CONTEXT_KEYS if getattr(record, key, None) is not None}


def describe_exception(exc: BaseException) -> str:
    """An exception on one line: its type and, for cradle's own exception classes (whose messages
    carry UIDs and row ids only), its message.

    Any other message may quote the data element value it choked on (pydicom's or Python's
    "could not convert string to float: '<value>'"), which can be a name, an ID or a birth date;
    for those only the type and the place it was raised are kept.
    """
    if type(exc).__module__.split(".")[0] in OWN_PACKAGES:
        message = " ".join(str(exc).split())
        return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return f"{type(exc).__name__} (message withheld)"
    return f"{type(exc).__name__} (message withheld; raised in {_short_path(frames[-1].filename)}:{frames[-1].lineno})"


def _short_path(filename: str) -> str:
    """``pydicom/valuerep.py`` or ``inference/sr/radiograph.py`` rather than this machine's full path."""
    parts = Path(filename).parts
    for anchor in ("site-packages", "dist-packages"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + 1:])
    return "/".join(parts[-2:])


def format_exception_safely(exc_info: Any) -> str:
    """A traceback's frames (file, line, code) and :func:`describe_exception` in place of the
    usual last line, which repeats the message."""
    _type, exc, tb = exc_info
    frames = "".join(traceback.format_tb(tb))
    return f"Traceback (most recent call last):\n{frames}{describe_exception(exc)}"


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return format_exception_safely(ei)

    def format(self, record: logging.LogRecord) -> str:
        cached, record.exc_text = record.exc_text, None  # another handler may have cached the full text
        try:
            text = super().format(record)
        finally:
            record.exc_text = cached
        ids = _ids(record)
        if not ids:
            return text
        suffix = " ".join(f"{_SHORT[k]}={v}" for k, v in ids.items())
        first, newline, rest = text.partition("\n")
        return f"{first} [{suffix}]{newline}{rest}"


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
            "component": self.component, "pid": record.process, "thread": record.threadName,
        }
        entry.update(_ids(record))
        if record.exc_info:
            entry["exception"] = format_exception_safely(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, fmt: str = "text", component: str = "cradle") -> logging.Handler | None:
    """One stderr handler on the root logger, in the chosen format (replacing one set up before).

    Like ``logging.basicConfig``, it leaves a root logger alone that has handlers of someone else's
    (an embedding application, pytest's capture) and returns None then."""
    quiet_libraries()
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "cradle", False)]
    if len(ours) != len(root.handlers):
        return None
    for old in ours:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.cradle = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter(component) if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root.addHandler(handler)
    root.setLevel(level)
    return handler


QUIET_LOGGERS = ("alembic",)
"""Libraries whose INFO lines tell an operator nothing (alembic announces each plugin it loads)."""


def quiet_libraries() -> None:
    """Hold the chatty libraries' loggers at WARNING (unless set higher already)."""
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(max(logging.WARNING, logger.level))


def protect_logs() -> None:
    """Keep patient identifiers out of the logs of libraries that would print them."""
    logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLogger("pynetdicom").level))
    logging.getLogger("pydicom").setLevel(max(logging.ERROR, logging.getLogger("pydicom").level))
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
    # pynetdicom's "standard" handlers dump every PDU and DIMSE message (identifiers included) to its
    # logger; held at WARNING they print nothing, so do not bind them at all.
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
