"""Errors as the API answers them: ``{"error", "message", "field"}``, with a message that
says what to fix (never a driver's traceback)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi.responses import JSONResponse

from .schemas import ErrorOut


def validation_message(errs: Sequence[Any]) -> tuple[str, str | None]:
    """pydantic's errors as one message (the first five, each "where: what") and the field
    of the first."""
    parts = []
    for e in errs[:5]:
        loc = ".".join(str(p) for p in e["loc"] if p != "body")
        msg = e["msg"].removeprefix("Value error, ")  # our validators' own messages
        if e.get("type") == "extra_forbidden":
            msg = "unknown field (check the spelling; see /docs for the schema)"
        parts.append(f"{loc or 'body'}: {msg}")
    field = ".".join(str(p) for p in errs[0]["loc"] if p != "body") if errs else None
    return "; ".join(parts), field or None


def error_response(status: int, error: str, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse(ErrorOut(error=error, message=message, field=field).model_dump(), status_code=status)
