"""Structured logging: every line names its run, attempt and machine (``-`` when none).

Library code logs through ``logging.getLogger(__name__)`` and passes context as
``extra={"run": …, "attempt": …, "machine": …}``; only the CLI calls :func:`configure`.
Secrets never reach here: inputs are not logged, and secret fields are redacted before
anything that could carry them is formatted.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

_FIELDS = ("run", "attempt", "machine")


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for name in _FIELDS:
            if not hasattr(record, name):
                setattr(record, name, None)
        return True


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ctx = " ".join(f"{n}={getattr(record, n, None) or '-'}" for n in _FIELDS)
        line = f"{ts}.{int(record.msecs):03d}Z {record.levelname:<7} {record.name}: {record.getMessage()} [{ctx}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for n in _FIELDS:
            out[n] = getattr(record, n, None)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


def configure(level: str = "info", fmt: str = "text", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The HTTP access log is noise at fleet scale; errors still come through.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    for noisy in ("httpx", "httpcore", "websockets", "alembic", "matplotlib", "PIL", "uvicorn.error"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
