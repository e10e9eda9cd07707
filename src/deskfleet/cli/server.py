"""``deskfleet server``: the orchestrator; ``deskfleet keys``: its secret keys."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from ..errors import DeskfleetError
from ..version import __version__
from ._common import F, _Group, _tune_gc, main, opt


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
@opt("--human-webhook", default=None, metavar="URL",
     help="post human tasks' transitions here (created, escalated, expired, completed), signed like run webhooks")
@opt("--human-escalation-webhook", default=None, metavar="URL",
     help="post escalated human tasks here too (nobody answered within the task's escalate_after)")
@opt("--secret-key-file", default=None, type=click.Path(dir_okay=False, path_type=Path),
     help="key that encrypts secrets at rest (default: <data-dir>/secret.key); replicas share one")
@opt("--backlog-order", default="longest-first", type=click.Choice(["longest-first", "queued"]),
     help="a backlog within one priority: longest runs first, by the durations learnt per automation "
          "(runs with a deadline or half their queue timeout waited keep their place), or strictly as queued")
@opt("--provider", "providers", multiple=True, metavar="NAME=SPEC",
     help="a machine provider pool policies may name: NAME=command:PATH (hook scripts), NAME=local:COMMAND "
          "(a process per machine on this host), NAME=libvirt:URI[?template=NAME] or "
          "NAME=ec2:LAUNCH_TEMPLATE[?region=…&warm=N]; repeatable (docs/providers.md)")
@opt("--provider-update", "provider_updates", multiple=True, metavar="NAME=COMMAND",
     help="what a local provider's machine runs for an OS update in rolling maintenance (split as a shell "
          "would; {name} and {state_dir} filled in); repeatable")
@opt("--controller-tick", default=5.0, type=click.FloatRange(min=0.05),
     help="seconds between the pool controller's passes (on the leader)")
@opt("--otel/--no-otel", default=False,
     help="OpenTelemetry traces of each run (needs deskfleet[otel]); where they go: the standard OTEL_* "
          "variables, e.g. OTEL_EXPORTER_OTLP_ENDPOINT (docs/observability.md)")
@opt("--artifact-retention", default="30d", metavar="DURATION",
     help="how long screenshots and other artifacts are kept unless their pool's policy (artifacts.retention) "
          "or their automation (artifact_retention) says otherwise: 30d, 12h, 2w, seconds; 0 or 'forever' "
          "keeps them (the leader deletes older ones; runs stay)")
@click.pass_context
def server(ctx: click.Context, host: str, port: int, data_dir: Path, db: str | None, enrolment_token: str | None,
           heartbeat_interval: float, heartbeat_timeout: float, stop_grace: float, sqlite_synchronous: str,
           webhook_secret: str | None, human_webhook: str | None, human_escalation_webhook: str | None,
           secret_key_file: Path | None, backlog_order: str, providers: tuple[str, ...],
           provider_updates: tuple[str, ...], controller_tick: float, artifact_retention: str,
           otel: bool) -> None:
    """Run the orchestrator (API, scheduler, fleet manager)."""
    import uvicorn

    from ..api import create_app
    from ..config import ServerSettings, parse_retention
    from ..orchestrator import Orchestrator
    from ..providers.configure import parse_specs

    try:
        retention = parse_retention(artifact_retention) or 0.0
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--artifact-retention") from None
    settings = ServerSettings(
        data_dir=data_dir, db=db, host=host, port=port, api_key=ctx.find_root().params["api_key"],
        enrolment_token=enrolment_token, heartbeat_interval=heartbeat_interval,
        heartbeat_timeout=heartbeat_timeout, stop_grace=stop_grace, sqlite_synchronous=sqlite_synchronous,
        webhook_secret=webhook_secret, human_webhook=human_webhook, human_escalation_webhook=human_escalation_webhook,
        secret_key_file=secret_key_file, backlog_order=backlog_order,
        providers=parse_specs(providers), controller_tick=controller_tick,
        provider_updates=parse_specs(provider_updates, "--provider-update", "COMMAND",
                                     "here='sh -c \"apt-get upgrade -y\"'"),
        artifact_retention=retention,
    )
    settings.check_exposure()
    if otel:
        from .. import tracing

        tracing.enable("deskfleet-server")  # before the app is built: it traces requests
    orch = Orchestrator(settings)
    orch.prepare()
    click.echo(f"deskfleet {__version__} on http://{host}:{port}  (db: {settings.db_url}; "
               f"enrolment token in {data_dir / 'enrolment-token'} unless set); "
               f"the dashboard: http://{host}:{port}/ui/", err=True)
    _tune_gc()
    try:
        # Agent messages are small JSON frames: compressing each costs more CPU than it saves
        # bandwidth (a heartbeat is ~150 bytes), on both ends. No WebSocket pings: heartbeats
        # are the liveness check, and the hub closes the connection of a silent agent.
        uvicorn.run(create_app(orch), host=host, port=port, log_config=None, ws_max_size=16 << 20,
                    ws_per_message_deflate=False, ws_ping_interval=None, timeout_graceful_shutdown=5)
    except OSError as exc:
        raise DeskfleetError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


# -- keys ----------------------------------------------------------------------------------------
@main.group(cls=_Group)
def keys() -> None:
    """The secret keys that encrypt stored secrets; rotating them without downtime."""


def _key_options(f: F) -> F:
    f = opt("--secret-key-file", default=None, type=click.Path(dir_okay=False, path_type=Path),
            help="the servers' keyring (default: <data-dir>/secret.key)")(f)
    f = opt("--db", default=None, help="database URL (default: sqlite:///<data-dir>/deskfleet.db)")(f)
    f = opt("--data-dir", default="deskfleet-data", type=click.Path(file_okay=False, path_type=Path),
            help="the servers' data directory")(f)
    return f


def _open(data_dir: Path, db: str | None, secret_key_file: Path | None) -> tuple[Any, Any, Path]:
    from ..crypto import SecretBox
    from ..store import open_store

    path = secret_key_file or data_dir / "secret.key"
    if not path.exists():
        raise DeskfleetError(f"no key file at {path}; give --secret-key-file or --data-dir as the servers have them")
    box = SecretBox.from_file(path)
    return box, open_store(db or f"sqlite:///{data_dir / 'deskfleet.db'}"), path


def _short(fp: str | None) -> str:
    return (fp or "?")[:12]


@keys.command("status")
@_key_options
def keys_status(data_dir: Path, db: str | None, secret_key_file: Path | None) -> None:
    """Which keys the key file holds, which ones encrypted the stored secrets, and which key
    each running server encrypts with (fingerprints only, never a key)."""
    box, store, path = _open(data_dir, db, secret_key_file)
    try:
        in_use, replicas = store.keys_in_use(), store.replica_keys()
    finally:
        store.close()
    click.echo(f"key file {path}: {len(box.fingerprints)} key(s), newest first")
    for i, fp in enumerate(box.fingerprints):
        click.echo(f"  {_short(fp)}{'  encrypts' if i == 0 else ''}{'  in use' if fp in in_use else ''}")
    missing = [fp for fp in in_use if fp not in box.fingerprints]
    if missing:
        click.echo(f"  missing from the file but in use: {', '.join(_short(f) for f in missing)}")
    for _, name, key, seen in replicas:
        click.echo(f"server {name}: encrypts with {_short(key)} (seen {time.time() - seen:.0f}s ago)")


@keys.command("rotate")
@_key_options
@opt("--reencrypt-only", is_flag=True, default=False,
     help="the new key is already first in every server's key file: only re-encrypt")
@opt("--wait", default=30.0, type=float, help="seconds to wait for every running server to encrypt with the new key")
@opt("--batch", default=500, type=click.IntRange(1, 100_000), help="runs re-encrypted per transaction")
@opt("--retire", is_flag=True, default=False, help="remove the older keys from the key file when done")
def keys_rotate(data_dir: Path, db: str | None, secret_key_file: Path | None, reencrypt_only: bool, wait: float,
                batch: int, retire: bool) -> None:
    """Rotate the secret key while the servers run: add a new newest key to the key file,
    wait until every running server encrypts with it (they re-read the file within a
    second), re-encrypt every stored secret with it in batches, then record that only the
    new key is in use — after which the older keys may leave every key file (--retire does
    it for this one). See docs/credentials.md for servers with separate key files."""
    from ..crypto import new_key, write_keyring
    from ..vault import Reencrypted, reencrypt

    box, store, path = _open(data_dir, db, secret_key_file)
    try:
        if not reencrypt_only:
            write_keyring(path, [new_key(), *box.keys])
            box = type(box).from_file(path)
            click.echo(f"added key {_short(box.key_fingerprint())} first in {path}", err=True)
        newest = box.key_fingerprint()
        if not store.claim_key(box.fingerprints):
            missing = [_short(f) for f in store.keys_in_use() if f not in box.fingerprints]
            raise DeskfleetError(f"{path} lacks key(s) still in use ({', '.join(missing)}); put them back first")
        deadline = time.monotonic() + wait
        while True:
            now = time.time()
            behind = [name for _, name, key, seen in store.replica_keys() if now - seen < 15 and key != newest]
            if not behind:
                break
            if time.monotonic() > deadline:
                raise DeskfleetError(
                    f"server(s) {', '.join(behind)} still encrypt with an older key after {wait:g}s; give them "
                    f"the key file with {_short(newest)} first, then run: deskfleet keys rotate --reencrypt-only")
            time.sleep(0.5)
        time.sleep(1.0)  # a write encrypted with the old key just before the switch has landed
        expected = store.keys_in_use()

        def progress(done: Reencrypted) -> None:
            click.echo(f"\r  re-encrypted: {done.accounts} accounts, {done.runs} runs, {done.artifacts} artifacts",
                       err=True, nl=False)

        done = reencrypt(store, box, batch=batch, progress=progress)
        click.echo("", err=True)
        if not store.settle_keys(expected, newest):
            raise DeskfleetError("a server started encrypting with yet another key meanwhile; run "
                                 "'deskfleet keys status', fix its key file, then run this again with --reencrypt-only")
        again = reencrypt(store, box, batch=batch)  # anything written under an older key during the pass
        old = [fp for fp in box.fingerprints if fp != newest]
        if retire and old:
            write_keyring(path, box.keys[:1])
        click.echo(
            f"every secret is encrypted with {_short(newest)} ({done.accounts + again.accounts} accounts, "
            f"{done.runs + again.runs} runs, {done.artifacts + again.artifacts} artifacts, {done.other} other); "
            + (f"removed {len(old)} older key(s) from {path}" if retire and old else
               f"older key(s) {', '.join(_short(f) for f in old)} may now leave every key file" if old else
               "no older key left"), err=True)
    finally:
        store.close()
