"""Server settings and the limits that bound what clients may ask for.

The CLI builds :class:`ServerSettings` from flags, each with a ``DESKFLEET_*`` environment
variable; tests and embedders build it directly.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

# Bounds on what a run may ask for: beyond these a value is a mistake, not a wish.
MAX_QUEUE_TIMEOUT = 7 * 24 * 3600.0
MAX_ATTEMPT_TIMEOUT = 24 * 3600.0
MAX_PROGRESS_TIMEOUT = 24 * 3600.0
MAX_DEADLINE = 30 * 24 * 3600.0
MIN_TIMEOUT = 0.1
MAX_ATTEMPTS = 20
MAX_PRIORITY = 1000
#: the most runs one batch submit (POST /v1/runs:batch) takes
MAX_BATCH = 1000


#: how long artifacts (screenshots, files automations attach) are kept unless a pool's policy
#: or an automation says otherwise (``deskfleet server --artifact-retention``)
DEFAULT_ARTIFACT_RETENTION = 30 * 86400.0
_RETENTION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw]?)$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_FOREVER = ("forever", "never", "none", "keep")
RETENTION_HINT = "a duration such as 30d, 12h, 90m, 2w or a number of seconds; 0 or 'forever' keeps them"


def parse_retention(value: str | float | None) -> float | None:
    """How long to keep artifacts, in seconds: ``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or a
    number of seconds; ``0`` (or ``forever``) is 0.0, which keeps them for good; None stays
    None (not said: the next level's retention applies). ValueError saying what is accepted."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"retention {value!r}: {RETENTION_HINT}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip().lower()
        if text in _FOREVER:
            return 0.0
        m = _RETENTION.match(text)
        if m is None:
            raise ValueError(f"retention {value!r}: {RETENTION_HINT}")
        seconds = float(m.group(1)) * _UNIT[m.group(2)]
    if not 0 <= seconds <= 100 * 365 * 86400 or seconds != seconds:
        raise ValueError(f"retention {value!r}: {RETENTION_HINT} (at most 100 years)")
    return seconds


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(slots=True)
class ServerSettings:
    data_dir: Path = field(default_factory=lambda: Path("deskfleet-data"))
    db: str | None = None  # default: sqlite:///<data_dir>/deskfleet.db
    host: str = "127.0.0.1"
    port: int = 8470
    api_key: str | None = None  # required on client endpoints when listening beyond loopback
    enrolment_token: str | None = None  # default: read or create <data_dir>/enrolment-token
    heartbeat_interval: float = 2.0
    heartbeat_timeout: float = 10.0
    stop_grace: float = 15.0  # how long an agent has to confirm a stop before it is forced
    sweep_interval: float = 0.25
    schedule_tick: float = 0.5  # scheduler runs at least this often (backoffs, affinity waits)
    verify_interval: float = 5.0  # how often a quarantined, connected machine is asked to re-prove
    #: how often a machine's figures (app memory, CPU) from its heartbeats are kept as a sample
    #: of its history (the dashboard's memory trend); a day of them is kept
    sample_interval: float = 60.0
    sqlite_synchronous: str = "FULL"
    max_body_bytes: int = 1 << 20  # a run request (input included)
    max_batch_bytes: int = 16 << 20  # a batch of run requests (POST /v1/runs:batch)
    #: how a backlog (more runs than free machines) is started within one priority:
    #: "longest-first", by the durations learnt per automation, runs that must not wait
    #: excepted (scheduler.durations); "queued": strictly first come, first served
    backlog_order: str = "longest-first"
    max_artifact_bytes: int = 16 << 20
    max_pack_bytes: int = 256 << 20  # a pack archive (POST /v1/packs)
    webhook_secret: str | None = None
    #: where human tasks' transitions are posted (created, escalated, expired, completed)
    human_webhook: str | None = None
    #: where escalated human tasks are posted besides (a team lead's channel, an on-call pager)
    human_escalation_webhook: str | None = None
    secret_key_file: Path | None = None  # default: <data_dir>/secret.key (created on first start)
    #: machine providers by name (``command:PATH`` or ``local:COMMAND``: providers.configure),
    #: which pool policies name
    providers: dict[str, str] = field(default_factory=dict)
    #: a local provider's update command (rolling maintenance), by the provider's name
    provider_updates: dict[str, str] = field(default_factory=dict)
    controller_tick: float = 5.0  # seconds between the pool controller's passes (on the leader)
    #: seconds artifacts are kept unless their pool's policy or their automation says otherwise;
    #: 0: kept for good (the leader's retention sweep: fleet.retention)
    artifact_retention: float = DEFAULT_ARTIFACT_RETENTION

    def __post_init__(self) -> None:
        if self.backlog_order not in ("longest-first", "queued"):
            raise ConfigError(f"backlog order {self.backlog_order!r}: choose longest-first or queued")
        if self.heartbeat_interval <= 0 or self.heartbeat_timeout <= 0:
            raise ConfigError("heartbeat interval and timeout must be positive")
        if self.heartbeat_timeout < 2 * self.heartbeat_interval:
            raise ConfigError(
                f"heartbeat timeout ({self.heartbeat_timeout:g}s) must be at least twice the "
                f"heartbeat interval ({self.heartbeat_interval:g}s), or one late beat loses a lease"
            )
        for name in ("human_webhook", "human_escalation_webhook"):
            url = getattr(self, name)
            if url is not None and not url.startswith(("http://", "https://")):
                raise ConfigError(f"--{name.replace('_', '-')} {url!r}: give an http:// or https:// URL")
        if not self.artifact_retention >= 0:
            raise ConfigError(f"artifact retention {self.artifact_retention!r}: seconds, 0 to keep artifacts for good")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port {self.port} is not a TCP port")

    @property
    def db_url(self) -> str:
        return self.db or f"sqlite:///{self.data_dir / 'deskfleet.db'}"

    @property
    def lease_timeout(self) -> float:
        return self.heartbeat_timeout

    def check_exposure(self) -> None:
        """Listening beyond loopback without an API key would hand the fleet to anyone."""
        if not is_loopback(self.host) and not self.api_key:
            raise ConfigError(
                f"listening on {self.host} exposes the API beyond this machine; set an API key "
                "with --api-key or DESKFLEET_API_KEY (clients then send it as a Bearer token)"
            )

    def resolve_enrolment_token(self) -> str:
        if self.enrolment_token:
            return self.enrolment_token
        path = self.data_dir / "enrolment-token"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_urlsafe(32) + "\n")
            path.chmod(0o600)
        self.enrolment_token = path.read_text().strip()
        return self.enrolment_token
