"""deskfleet's exceptions: one root, the whole tree here.

    DeskfleetError
    ├── ConfigError              bad settings or command-line arguments
    ├── InvalidRequest           a client or agent sent something we cannot accept (HTTP 4xx)
    │   ├── InvalidInput         the run's input does not match the automation's schema (422)
    │   ├── NotFound             no such run / machine / pool / automation (404)
    │   ├── Conflict             valid, but contradicts what exists (409): idempotency key reuse,
    │   │                        cancelling a finished run, enrolling over a live agent
    │   ├── Unservable           no machine could ever serve this run (422)
    │   ├── Unauthorized         a missing, wrong, expired or revoked API key or enrolment token (401)
    │   └── Forbidden            a key whose role or tenant does not allow the request (403)
    ├── StaleLease               an agent wrote with a fencing token that is no longer current
    ├── StoreUnavailable         the database cannot be reached (HTTP 503)
    ├── StoreRetry               a transaction lost a race (deadlock, serialization); run it again
    ├── AutomationError          raised inside a user's automation
    │   ├── BusinessError        the automation decided the work cannot be done; never retried
    │   └── DesktopError         the desktop did not behave (app crashed, state never reached)
    │       └── StateTimeout     a wanted screen state did not appear in time
    ├── Stopped                  the orchestrator told the attempt to stop (cancel, timeout, lease lost)
    └── ServerUnreachable        a client or the CLI cannot reach the orchestrator

Driver errors (SQLAlchemy, httpx, websockets) are converted to these at the boundary with
``raise ... from exc`` so that API users and CLI users see our message, never a driver trace.
"""

from __future__ import annotations


class DeskfleetError(Exception):
    """Root of every error deskfleet raises on purpose."""


class ConfigError(DeskfleetError):
    """Settings or arguments that cannot work; the message says which and how to fix it."""


class InvalidRequest(DeskfleetError):
    status_code = 400
    error = "invalid_request"  # the machine-readable name in error responses

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInput(InvalidRequest):
    status_code = 422
    error = "invalid_input"


class NotFound(InvalidRequest):
    status_code = 404
    error = "not_found"


class Conflict(InvalidRequest):
    status_code = 409
    error = "conflict"


class Unservable(InvalidRequest):
    status_code = 422
    error = "unservable"


class Unauthorized(InvalidRequest):
    status_code = 401
    error = "unauthorized"


class Forbidden(InvalidRequest):
    status_code = 403
    error = "forbidden"


class StaleLease(DeskfleetError):
    """A write carried a fencing token for a lease that was lost or superseded."""

    def __init__(self, attempt_id: int, reason: str) -> None:
        super().__init__(f"attempt {attempt_id}: lease is no longer held ({reason})")
        self.attempt_id = attempt_id
        self.reason = reason


class StoreUnavailable(DeskfleetError):
    """The database is unreachable or refused the operation for a transient reason."""


class StoreRetry(DeskfleetError):
    """The transaction was rolled back by the database to break a deadlock or a
    serialization conflict; the whole operation may run again."""


class AutomationError(DeskfleetError):
    """Base for errors raised inside automations."""


class BusinessError(AutomationError):
    """The work itself cannot be done (bad data, record locked by a person…).

    Raising it ends the run as ``failed`` without a retry: another machine would meet the
    same answer.
    """


class DesktopError(AutomationError):
    """The desktop or application did not behave as the automation expected."""


class StateTimeout(DesktopError):
    def __init__(self, wanted: str, seen: str, timeout: float) -> None:
        super().__init__(f"state {wanted!r} not reached within {timeout:g}s (screen shows {seen!r})")
        self.wanted = wanted
        self.seen = seen
        self.timeout = timeout


class Stopped(DeskfleetError):
    """Raised inside an automation when its attempt must stop (cancelled, timed out, lease lost)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"attempt stopped: {reason}")
        self.reason = reason


class ServerUnreachable(DeskfleetError):
    def __init__(self, url: str, detail: str) -> None:
        super().__init__(f"cannot reach the deskfleet server at {url}: {detail}")
        self.url = url
