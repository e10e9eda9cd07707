"""``deskfleet server``: the orchestrator."""

from __future__ import annotations

from pathlib import Path

import click

from .. import __version__
from ..errors import DeskfleetError
from ._common import _tune_gc, main, opt


# -- server ---------------------------------------------------------------------------------------
@main.command()
@opt("--host", default="127.0.0.1", help="address to listen on; beyond loopback an API key is required")
@opt("--port", default=8470, type=int)
@opt("--data-dir", default="deskfleet-data", type=click.Path(file_okay=False, path_type=Path),
     help="database, secret key and enrolment token live here")
@opt("--db", default=None, help="database URL (default: sqlite:///<data-dir>/deskfleet.db)")
@opt("--enrolment-token", default=None, help="token agents enrol with (default: generated into <data-dir>)")
@opt("--heartbeat-interval", default=2.0, type=float, help="seconds between agent heartbeats")
@opt("--heartbeat-timeout", default=10.0, type=float, help="silence after which an agent's lease is lost")
@opt("--stop-grace", default=15.0, type=float, help="seconds an agent has to confirm a stop")
@opt("--sqlite-synchronous", default="FULL", type=click.Choice(["NORMAL", "FULL"], case_sensitive=False),
     help="FULL survives power loss; NORMAL survives process crashes and is faster")
@opt("--webhook-secret", default=None, help="HMAC key for the X-Deskfleet-Signature webhook header")
@opt("--secret-key-file", default=None, type=click.Path(dir_okay=False, path_type=Path),
     help="key that encrypts secrets at rest (default: <data-dir>/secret.key); replicas share one")
@click.pass_context
def server(ctx: click.Context, host: str, port: int, data_dir: Path, db: str | None, enrolment_token: str | None,
           heartbeat_interval: float, heartbeat_timeout: float, stop_grace: float, sqlite_synchronous: str,
           webhook_secret: str | None, secret_key_file: Path | None) -> None:
    """Run the orchestrator (API, scheduler, fleet manager)."""
    import uvicorn

    from ..api import create_app
    from ..config import ServerSettings
    from ..orchestrator import Orchestrator

    settings = ServerSettings(
        data_dir=data_dir, db=db, host=host, port=port, api_key=ctx.find_root().params["api_key"],
        enrolment_token=enrolment_token, heartbeat_interval=heartbeat_interval,
        heartbeat_timeout=heartbeat_timeout, stop_grace=stop_grace, sqlite_synchronous=sqlite_synchronous,
        webhook_secret=webhook_secret, secret_key_file=secret_key_file,
    )
    settings.check_exposure()
    orch = Orchestrator(settings)
    orch.prepare()
    click.echo(f"deskfleet {__version__} on http://{host}:{port}  (db: {settings.db_url}; "
               f"enrolment token in {data_dir / 'enrolment-token'} unless set)", err=True)
    _tune_gc()
    try:
        # Agent messages are small JSON frames: compressing each costs more CPU than it saves
        # bandwidth (a heartbeat is ~150 bytes), on both ends. No WebSocket pings: heartbeats
        # are the liveness check, and the hub closes the connection of a silent agent.
        uvicorn.run(create_app(orch), host=host, port=port, log_config=None, ws_max_size=16 << 20,
                    ws_per_message_deflate=False, ws_ping_interval=None, timeout_graceful_shutdown=5)
    except OSError as exc:
        raise DeskfleetError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
