"""``python -m deskfleet.demoapp --data FILE [switches]``: start DemoEHR on ``$DISPLAY``.

Every switch has a ``DESKFLEET_DEMOAPP_*`` environment variable (``--session-timeout`` →
``DESKFLEET_DEMOAPP_SESSION_TIMEOUT``). Steps are given as ``STEP`` or ``STEP:N`` (the
first N processes to reach the step take the fault), comma-separated.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .app import STEPS, Options, run
from .layout import DIALOGS


def _steps(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        step, _, times = item.partition(":")
        if step not in STEPS:
            raise argparse.ArgumentTypeError(f"unknown step {step!r}; steps: {', '.join(STEPS)}")
        try:
            out[step] = int(times) if times else 1
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{item!r}: the count after ':' must be a number") from exc
    return out


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"DESKFLEET_DEMOAPP_{name.upper().replace('-', '_')}", default)


def parse(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="python -m deskfleet.demoapp", description="DemoEHR, deskfleet's demo application.")
    p.add_argument("--data", type=Path, default=_env("data"), help="the shared records file (SQLite)")
    p.add_argument("--name", default=_env("name", "demoehr"), help="this desktop's name, recorded with each record")
    p.add_argument("--seed", type=int, default=int(_env("seed", "0") or 0), help="seed of the accounts and random faults")
    p.add_argument("--mfa", action="store_true", default=_env("mfa", "") in ("1", "true", "yes"),
                   help="ask every account for a TOTP code")
    p.add_argument("--session-timeout", type=float, default=_env("session_timeout"),
                   help="seconds without input after which the session ends")
    p.add_argument("--error-rate", type=float, default=float(_env("error_rate", "0") or 0),
                   help="chance of a modal error dialog at each step")
    p.add_argument("--crash-rate", type=float, default=float(_env("crash_rate", "0") or 0),
                   help="chance that the process exits at each step")
    p.add_argument("--freeze-rate", type=float, default=float(_env("freeze_rate", "0") or 0),
                   help="chance that the app hangs at each step")
    p.add_argument("--error-at", type=_steps, default=_steps(_env("error_at", "") or ""), help="steps that show an error dialog")
    p.add_argument("--crash-at", type=_steps, default=_steps(_env("crash_at", "") or ""), help="steps where the process exits")
    p.add_argument("--freeze-at", type=_steps, default=_steps(_env("freeze_at", "") or ""), help="steps where the app hangs")
    p.add_argument("--expire-at", type=_steps, default=_steps(_env("expire_at", "") or ""),
                   help="steps where the session ends (back to login, as after an idle timeout)")
    p.add_argument("--leak-mb", type=float, default=float(_env("leak_mb", "0") or 0), help="MB kept per saved record")
    p.add_argument("--font-delta", type=int, default=int(_env("font_delta", "0") or 0), help="pixels added to font sizes")
    p.add_argument("--show-dialog", choices=sorted(DIALOGS), default=_env("show_dialog"),
                   help="show this dialog over the login screen at start")
    args = p.parse_args(argv)
    if args.data is None:
        p.error("--data is required (or DESKFLEET_DEMOAPP_DATA)")
    try:
        return Options(
            data=args.data, name=args.name, seed=args.seed, mfa=args.mfa,
            session_timeout=float(args.session_timeout) if args.session_timeout else None,
            error_rate=args.error_rate, crash_rate=args.crash_rate, freeze_rate=args.freeze_rate,
            error_at=args.error_at, crash_at=args.crash_at, freeze_at=args.freeze_at, expire_at=args.expire_at,
            leak_mb=args.leak_mb, font_delta=args.font_delta, show_dialog=args.show_dialog,
        )
    except ValueError as exc:
        p.error(str(exc))
        raise  # p.error exits; this keeps type checkers informed


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s demoapp %(levelname)s %(message)s")
    options = parse(argv)
    if not os.environ.get("DISPLAY") and sys.platform.startswith("linux"):
        sys.exit("DemoEHR needs an X display: set DISPLAY (tests and the demo start Xvfb for it)")
    run(options)


if __name__ == "__main__":
    main()
