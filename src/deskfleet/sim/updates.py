"""SimEHR's "OS update" (``[hooks] update``): what a pack's update hook does on a real
machine — on Windows, e.g. ``Install-WindowsUpdate -AcceptAll -IgnoreReboot`` of the
PSWindowsUpdate module — played by a line written in the pack's data directory.

Each update appends the machine's name to ``<data>/os-updates``, so a test counts the
updates of each machine; a machine named in ``<data>/os-updates.fail`` (one a line) fails
its update instead, as a broken patch would.
"""

from __future__ import annotations

import asyncio

from deskfleet import UpdateContext


async def update(ctx: UpdateContext) -> None:
    if ctx.data_dir is None:
        raise RuntimeError("no data directory to record the update in")
    ctx.log.info("%s: applying the simulated OS updates (%s)", ctx.machine, ctx.reason)
    await asyncio.sleep(0.05)  # the updates take a moment; the agent beats meanwhile
    ctx.data_dir.mkdir(parents=True, exist_ok=True)
    failing = ctx.data_dir / "os-updates.fail"
    if failing.exists() and ctx.machine in failing.read_text().split():
        raise RuntimeError(f"update KB5031356 failed to install on {ctx.machine} (0x800f0922)")
    with (ctx.data_dir / "os-updates").open("a") as f:
        f.write(f"{ctx.machine}\n")
