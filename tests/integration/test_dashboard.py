"""The dashboard in a real browser: Playwright driving Debian's Chromium (no browser
download) against a real server with simulated machines (real agents over real sockets).

Each view is screenshotted into ``$DESKFLEET_TEST_ARTIFACTS/dashboard`` (default:
``test-artifacts/dashboard`` in the checkout), to look at and to keep from a CI run.
"""

from __future__ import annotations

import asyncio
import html
import os
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

BOOT = "boot-dash-41d2"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: as the machine's notes say Chromium must start here: no sandbox as root, and none of the
#: background connections a closed network refuses
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
SHOTS = Path(os.environ.get("DESKFLEET_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")) / "dashboard"
LOOKUP = {"automation": "ehr.lookup_patient", "input": {"mrn": "M-1"}}


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert Path(CHROMIUM).exists(), "Debian's chromium is needed (apt-get install chromium; ./dev test installs it)"
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield b
        await b.close()


async def _key(c: httpx.AsyncClient, name: str, role: str, tenant: str = "*", screenshots: bool = False) -> str:
    resp = await c.post("/v1/api-keys", json={"name": name, "role": role, "tenant": tenant, "screenshots": screenshots})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["key"])


async def _login(browser: Browser, url: str, key: str) -> Page:
    page = await browser.new_page(viewport={"width": 1440, "height": 900})
    await page.goto(f"{url}/ui/")
    await expect(page).to_have_url(f"{url}/ui/login?next=%2Fui%2F")
    await page.fill("input[name=key]", key)
    await page.click("button[type=submit]")
    return page


async def _shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


async def _images_loaded(page: Page, selector: str) -> int:
    """How many of the matching images the browser decoded (a refused one has no width),
    once every one of them has loaded or failed."""
    await page.wait_for_function("sel => [...document.querySelectorAll(sel)].every(e => e.complete)", arg=selector,
                                 timeout=10_000)
    return int(await page.eval_on_selector_all(selector, "els => els.filter(e => e.naturalWidth > 0).length"))


async def test_the_dashboard_shows_the_fleet_runs_failures_tasks_and_audit_and_acts(
        server_factory, fleet_factory, browser: Browser) -> None:
    # Not a fault test: leases of 5 s, longer than the 3 s of fast_settings, so that a busy host (the
    # browser, the server's thread and the agents share this process's turns) loses no lease.
    server = server_factory(api_key=BOOT, sample_interval=0.2, heartbeat_timeout=5.0)
    await fleet_factory(server, count=2, screenshots="evidence")
    async with httpx.AsyncClient(base_url=server.url, timeout=30, headers={"authorization": f"Bearer {BOOT}"}) as c:
        admin = await _key(c, "ada", "admin", screenshots=True)
        operator = await _key(c, "night shift", "operator")
        acme = await _key(c, "acme portal", "submitter", "acme")
        runs: list[dict[str, Any]] = []
        for i in range(3):
            runs.append((await c.post("/v1/runs", params={"wait": 30}, json={**LOOKUP, "tenant": "acme" if i else "default"})).json())
        for mrn in ("X-404", "X-405"):
            runs.append((await c.post("/v1/runs", params={"wait": 30}, json={
                "automation": "ehr.export_summary", "input": {"mrn": mrn}})).json())
        assert [r["state"] for r in runs] == ["succeeded"] * 3 + ["failed"] * 2, runs
        failed = runs[-1]
        asked = (await c.post("/v1/runs", json={"automation": "sim.approval", "input": {
            "key": "dash-1", "kind": "push_approval", "prompt": "Approve the sign-in on your phone"}})).json()
        # A trend needs two samples: sim-01's second may be a beat away yet.
        for _ in range(100):
            if len((await c.get("/v1/machines/sim-01/samples", params={"hours": 1})).json()) >= 2:
                break
            await asyncio.sleep(0.1)

    # -- logging in: a wrong key is told so; the right one lands on the fleet -------------------------
    page = await browser.new_page(viewport={"width": 1440, "height": 900})
    await page.goto(f"{server.url}/ui/fleet")
    await page.fill("input[name=key]", "dfk_aaaaaaaaaa_wrong")
    await page.click("button[type=submit]")
    await expect(page.locator(".flash.bad")).to_contain_text("API key")
    await _shot(page, "login-refused")
    await page.close()

    page = await _login(browser, server.url, admin)
    await expect(page).to_have_url(f"{server.url}/ui/fleet")
    await expect(page.locator("#machine-sim-01")).to_be_visible()
    await expect(page.locator(".pool h2")).to_have_text(["default"])
    assert await _images_loaded(page, "#machine-sim-01 img.thumb") == 1, "the latest screen, for a key that may see it"
    await expect(page.locator("#machine-sim-01 svg.spark")).to_be_visible()  # its app memory over time
    await _shot(page, "fleet")

    # -- cordon from the fleet view: the row follows, through the live stream ------------------------
    idle = "sim-01" if "busy" in await page.locator("#machine-sim-02 .status").inner_text() else "sim-02"
    await page.click(f"#machine-{idle} >> text=cordon")
    await expect(page.locator("#flash")).to_contain_text(f"{idle}: cordoned")
    await expect(page.locator(f"#machine-{idle} .status")).to_have_text("cordoned")
    async with httpx.AsyncClient(base_url=server.url, timeout=30, headers={"authorization": f"Bearer {BOOT}"}) as c:
        assert (await c.get(f"/v1/machines/{idle}")).json()["admin"] == "cordoned"
    await page.click(f"#machine-{idle} >> text=uncordon")
    await expect(page.locator(f"#machine-{idle} .status")).to_have_text("ready")

    # -- runs: the list, live; a failed run's timeline with its screens; retry --------------------------
    await page.click("nav >> text=Runs")
    await expect(page.locator("table.runs tbody tr")).to_have_count(len(runs) + 1)
    async with httpx.AsyncClient(base_url=server.url, timeout=30, headers={"authorization": f"Bearer {BOOT}"}) as c:
        late = (await c.post("/v1/runs", json=LOOKUP)).json()
    await expect(page.locator(f"text={late['id']}")).to_be_visible()  # no reload: the stream said so
    await _shot(page, "runs")

    await page.goto(f"{server.url}/ui/runs/{failed['id']}")
    await expect(page.locator(".summary")).to_contain_text("business_error")
    await expect(page.locator(".timeline li.event")).not_to_have_count(0)
    await expect(page.locator(".timeline .kind", has_text="run.state").first).to_be_visible()
    shots = await _images_loaded(page, ".timeline img.shot")
    assert shots >= 1, "the attempt's screens in its timeline"
    await _shot(page, "run-failed")
    await page.click("text=retry")
    await expect(page.locator("#flash")).to_contain_text("retried as run_")
    await expect(page.locator(".summary")).to_contain_text("retried as")
    retry = re.search(r"retried as (run_\w+)", await page.locator("#flash").inner_text())
    assert retry, await page.locator("#flash").inner_text()
    async with httpx.AsyncClient(base_url=server.url, timeout=60, headers={"authorization": f"Bearer {BOOT}"}) as c:
        again = (await c.get(f"/v1/runs/{retry[1]}", params={"wait": 30})).json()
    assert again["state"] == "failed", again  # X-405 again: the same business error

    # -- failures, grouped by signature -----------------------------------------------------------------
    await page.click("nav >> text=Failures")
    group = page.locator("table.failures tbody tr").first
    await expect(group.locator("td.big")).to_have_text("3")  # X-404, X-405 and X-405's retry, as it fails again
    await expect(group).to_contain_text("no patient with MRN")
    await _shot(page, "failures")

    # -- a human task answered from the dashboard ---------------------------------------------------------
    await page.click("nav >> text=Human tasks")
    task = page.locator("table.tasks tbody tr", has_text="Approve the sign-in")
    await expect(task).to_be_visible()
    await _shot(page, "human-tasks")
    await task.locator("text=claim").click()
    await expect(task).to_contain_text("claimed by ada")
    await task.locator("input[name=response]").fill("approved")
    await task.locator("button[type=submit]").click()
    await expect(page.locator("#flash")).to_contain_text("completed")
    async with httpx.AsyncClient(base_url=server.url, timeout=30, headers={"authorization": f"Bearer {BOOT}"}) as c:
        done = (await c.get(f"/v1/runs/{asked['id']}", params={"wait": 30})).json()
        assert done["state"] == "succeeded" and done["output"]["by"] == "ada", done

    # -- a run waiting for a person, cancelled from its page ---------------------------------------------
    async with httpx.AsyncClient(base_url=server.url, timeout=30, headers={"authorization": f"Bearer {BOOT}"}) as c:
        stuck = (await c.post("/v1/runs", json={"automation": "sim.approval", "input": {
            "key": "dash-2", "kind": "push_approval", "prompt": "Nobody will answer this"}})).json()
    page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await page.goto(f"{server.url}/ui/runs/{stuck['id']}")
    await page.click(".summary >> text=cancel")
    await expect(page.locator("#flash")).to_contain_text(stuck["id"])
    await expect(page.locator(".summary .state")).to_have_text("cancelled", timeout=15_000)

    # -- the audit log holds what was done here ----------------------------------------------------------
    await page.click("nav >> text=Audit log")
    await expect(page.locator("table.audit")).to_contain_text("POST /ui/machines/{machine_id}/cordon")
    await expect(page.locator("table.audit")).to_contain_text("screenshot.viewed")
    await expect(page.locator("table.audit")).to_contain_text("POST /ui/runs/{run_id}/retry")
    await expect(page.locator("table.audit")).to_contain_text("POST /ui/runs/{run_id}/cancel")
    await _shot(page, "audit")
    await page.close()

    # -- an operator without the screenshot permission: no screens, no audit log ---------------------------
    page = await _login(browser, server.url, operator)
    await expect(page.locator("#machine-sim-01 .locked")).to_have_text("hidden")
    assert await page.locator("img.thumb").count() == 0
    await expect(page.locator("nav")).not_to_contain_text("Audit log")
    await page.goto(f"{server.url}/ui/runs/{failed['id']}")
    await expect(page.locator(".timeline .locked").first).to_contain_text("may not view screenshots")
    resp = await page.goto(f"{server.url}/ui/audit")
    assert resp is not None and resp.status == 403
    await expect(page.locator(".flash.bad")).to_contain_text("audit.read")
    await _shot(page, "operator-denied")
    await page.close()

    # -- a tenant's submitter: its own runs only, no fleet ---------------------------------------------
    page = await _login(browser, server.url, acme)
    await expect(page).to_have_url(f"{server.url}/ui/runs")
    await expect(page.locator("table.runs tbody tr")).to_have_count(2)  # the two acme lookups
    await expect(page.locator("table.runs")).not_to_contain_text(failed["id"])
    resp = await page.goto(f"{server.url}/ui/runs/{failed['id']}")
    assert resp is not None and resp.status == 404
    await _shot(page, "tenant-runs")
    await page.close()

    async with httpx.AsyncClient(base_url=server.url, timeout=30, headers={"authorization": f"Bearer {BOOT}"}) as c:
        denied = (await c.get("/v1/audit", params={"outcome": "denied"})).json()["entries"]
        assert any(e["action"] == "GET /ui/runs/{run_id}" and e["actor"] == acme[:14] for e in denied), denied


async def test_the_fleet_view_filters_and_pages_a_fleet_of_hundreds(server_factory) -> None:
    """A page shows FLEET_PAGE machines (each with its trend); filters and pages reach the rest."""
    server = server_factory(api_key=BOOT)
    store = server.view()
    for i in range(230):
        store.enrol_machine(f"vm-{i:03d}", pool="day" if i < 150 else "night", labels={}, key_hash=f"h{i}",
                            now=time.time())

    async with httpx.AsyncClient(base_url=server.url, timeout=30, follow_redirects=True) as c:
        assert (await c.post("/ui/login", data={"key": BOOT, "next": "/ui/fleet"})).status_code == 200

        async def shown(query: str) -> tuple[list[str], str]:
            page = await c.get(f"/ui/fleet{query}")
            assert page.status_code == 200, page.text
            return re.findall(r'<tr id="machine-([^"]+)"', page.text), page.text

        def vms(start: int, stop: int) -> list[str]:
            return [f"vm-{i:03d}" for i in range(start, stop)]

        ids, page = await shown("")
        assert ids == vms(0, 100) and "machines 1\N{EN DASH}100 of 230" in page and "page 1 of 3" in page
        assert 'rel="prev"' not in page
        nxt = html.unescape(re.findall(r'<a rel="next" href="([^"]+)"', page)[0])
        ids, page = await shown(nxt.removeprefix("/ui/fleet"))
        assert ids == vms(100, 200) and "page 2 of 3" in page
        ids, page = await shown("?page=99")  # past the end: the last page
        assert ids == vms(200, 230) and "machines 201\N{EN DASH}230 of 230" in page and 'rel="next"' not in page
        ids, _ = await shown("?page=abc")
        assert ids == vms(0, 100)

        ids, page = await shown("?pool=night")
        assert ids == vms(150, 230) and "machines 1\N{EN DASH}80 of 80 (of 230 in the fleet)" in page
        assert "page 1 of" not in page  # one page: no pager
        ids, page = await shown("?pool=night&q=VM-2")  # part of an id, any case
        assert ids == vms(200, 230)
        ids, page = await shown("?status=offline&page=3")  # enrolled, never connected
        assert ids == vms(200, 230)
        assert 'href="/ui/fleet?status=offline&amp;page=2"' in page  # a page's links keep its filters
        # What the live updates redraw: the page's part below its filters, filtered the same, so
        # what a person types into a filter is not redrawn under them.
        ids, page = await shown("?pool=night&q=vm-2&partial=1")
        assert ids == vms(200, 230) and 'class="filters"' not in page
        assert 'class="filters"' in (await shown("?pool=night"))[1]
        ids, page = await shown("?status=ready")
        assert ids == [] and "No machine matches." in page and "no machines (of 230 in the fleet)" in page
