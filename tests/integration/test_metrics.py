"""``GET /metrics``: the fleet's figures come from the store, so every replica shows the same
fleet and a restart resets nothing; the exposition follows Prometheus' conventions.

- the store suite's part, on SQLite and PostgreSQL: the counters and histograms are added
  to by the transactions that make what they count (submit, assign, finish, retry, a stale
  write refused), and concurrent writers on two stores (two replicas' engines) add up
  exactly;
- two replicas on one PostgreSQL database, each with its own agents, runs done by both:
  either replica's scrape shows the same fleet figures, which equal what the API's run list
  says, and a replica started afterwards (a restart) shows them still;
- every family of a scrape (SQLite and PostgreSQL) walked for the naming rules.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from deskfleet.errors import StaleLease
from deskfleet.models import AutomationSpec, Ending, RunSpec
from deskfleet.scheduler import Policy
from deskfleet.store import Heartbeat, SQLStore
from deskfleet.store.metrics import FleetFigures
from support import LiveServer, PgServer, fast_settings, start_server

T0 = 1_700_000_000.0
LOOKUP = AutomationSpec("ehr.lookup", "1", idempotent=True)
FINAL = ("succeeded", "failed", "cancelled", "timed_out")
#: names before the store kept the figures (issue 13): none may come back
OLD_NAMES = ("deskfleet_runs_submitted", "deskfleet_attempts_assigned", "deskfleet_stale_writes_rejected",
             "deskfleet_schedule_seconds", "deskfleet_runs_retried")


def add_machine(store: SQLStore, mid: str, now: float = T0) -> None:
    store.enrol_machine(mid, pool="default", labels={}, key_hash=f"hash-{mid}", now=now)
    store.connect_machine(mid, boot_id="boot-1", agent_version="1.0", automations=(LOOKUP,), labels=None,
                          heartbeat=Heartbeat(mid, now), lease_timeout=30.0, now=now)


def counted(figures: FleetFigures) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(name, tuple(sorted(labels.items()))): value for name, labels, value in figures.counts}


# -- the store ----------------------------------------------------------------------------------


def test_the_transactions_that_make_what_is_counted_count_it(s: SQLStore, backend: Any) -> None:
    add_machine(s, "m-1")
    add_machine(s, "m-2")
    runs = [s.submit(RunSpec("ehr.lookup"), request_hash=None, now=T0)[0] for _ in range(3)]
    assigned = s.schedule(Policy(), T0 + 2, 30.0)  # two machines: two runs waited 2 s each
    assert len(assigned) == 2
    ok, bad = assigned
    for a in assigned:
        s.attempt_preparing(a.attempt.id, a.attempt.machine_id, T0 + 3)
        s.attempt_start(a.attempt.id, a.attempt.machine_id, T0 + 3)
    s.finish_attempt(ok.attempt.id, ok.attempt.machine_id, Ending.SUCCEEDED, output={}, detail="", now=T0 + 7)
    s.finish_attempt(bad.attempt.id, bad.attempt.machine_id, Ending.SYSTEM_ERROR, output=None, detail="boom",
                     now=T0 + 8)  # idempotent: retried
    try:
        s.attempt_progress(bad.attempt.id, bad.attempt.machine_id, "late", {}, T0 + 9)
    except StaleLease:
        pass
    else:
        raise AssertionError("a write for an ended attempt was accepted")
    waiting = next(r for r in runs if r.id not in {ok.run.id, bad.run.id})
    s.request_cancel(waiting.id, T0 + 10)

    c = counted(s.fleet_figures(T0 + 11))
    pool = ("pool", "default")
    assert c[("deskfleet_runs_submitted", (pool,))] == 3
    assert c[("deskfleet_attempts_started", (pool,))] == 2
    assert c[("deskfleet_runs_finished", (("error_code", ""), pool, ("state", "succeeded")))] == 1
    assert c[("deskfleet_runs_finished", (("error_code", "cancelled"), pool, ("state", "cancelled")))] == 1
    assert c[("deskfleet_attempts_retried",
              (("ending", "system_error"), pool, ("reason", "retry_idempotent")))] == 1
    assert c[("deskfleet_stale_writes_refused", (("op", "progress"),))] == 1
    lookup = ("automation", "ehr.lookup")
    assert c[("deskfleet_run_queue_wait_seconds", (lookup, ("le", "2.5"), pool))] == 2
    assert c[("deskfleet_run_queue_wait_seconds:sum", (lookup, pool))] == 4.0
    assert c[("deskfleet_run_duration_seconds", (lookup, ("le", "10.0"), pool))] == 2  # 7 s and 10 s
    assert c[("deskfleet_run_duration_seconds:sum", (lookup, pool))] == 17.0

    figures = s.fleet_figures(T0 + 11)
    assert figures.runs == {("default", "queued"): 1}  # the retried one
    assert figures.oldest_queued == {"default": T0 + 8}
    assert figures.machines == {("default", "ready"): 2}
    # Another store on the database (another replica's engine; or this one after a
    # restart) reads the same figures.
    other = backend.open()
    assert counted(other.fleet_figures(T0 + 11)) == c


def test_counters_of_concurrent_writers_add_up_exactly(s: SQLStore, backend: Any) -> None:
    """Two stores (two replicas' engines) submitting at once: not one addition lost, and no
    deadlock between their counter rows."""
    add_machine(s, "m-1")
    stores = [s, backend.open()]
    errors: list[BaseException] = []

    def submit_many(store: SQLStore) -> None:
        try:
            for i in range(40):
                if i % 4 == 0:  # a batch too: its additions go in one statement
                    store.submit_many([(RunSpec("ehr.lookup"), None)] * 3, now=T0)
                else:
                    store.submit(RunSpec("ehr.lookup"), request_hash=None, now=T0)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=submit_many, args=(st,)) for st in stores for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    submitted = counted(s.fleet_figures(T0))[("deskfleet_runs_submitted", (("pool", "default"),))]
    assert submitted == sum(s.count_runs().values()) == 4 * (30 + 10 * 3)


# -- replicas ------------------------------------------------------------------------------------


def scrape(url: str) -> dict[str, Any]:
    resp = httpx.get(f"{url}/metrics", timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    return {"text": resp.text, "families": list(text_string_to_metric_families(resp.text))}


def fleet_samples(scraped: dict[str, Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the fleet's figures: those a replica reports for itself (labelled
    ``replica``) and the one that depends on the moment of the scrape left out."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in scraped["families"] for s in f.samples
            if "replica" not in s.labels and f.name != "deskfleet_queue_oldest_wait_seconds"}


def by_label(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, label: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for (n, labels), value in samples.items():
        if n == name:
            out[dict(labels)[label]] += int(value)
    return out


async def test_every_replica_shows_the_same_fleet_and_a_restart_resets_nothing(
        tmp_path: Path, fleet_factory: Callable[..., Any]) -> None:
    pg = PgServer()
    url = pg.new_database()
    started: list[LiveServer] = []

    def replica() -> LiveServer:
        # one data directory: the replicas share the secret key and the enrolment token
        started.append(start_server(fast_settings(tmp_path / "data", db=url)))
        return started[-1]

    try:
        a, b = replica(), replica()
        await fleet_factory(a, count=2, prefix="a")
        await fleet_factory(b, count=2, prefix="b", state_dir=tmp_path / "agents-b")
        async with httpx.AsyncClient(timeout=30) as c:
            bodies = [{"automation": "ehr.lookup_patient", "input": {"mrn": f"M-{i}"}} for i in range(16)]
            bodies += [{"automation": "ehr.export_summary", "input": {"mrn": f"NOBODY-{i}"}} for i in range(2)]
            ids = []
            for i, body in enumerate(bodies):
                resp = await c.post(f"{(a, b)[i % 2].url}/v1/runs", json=body)
                assert resp.status_code == 201, resp.text
                ids.append(resp.json()["id"])
            # A run cancelled while it waits (for its machine, cordoned), through the other replica.
            assert (await c.post(f"{a.url}/v1/machines/a-01/cordon", json={"reason": ""})).status_code == 200
            resp = await c.post(f"{a.url}/v1/runs", json={**bodies[0], "machine": "a-01"})
            assert resp.status_code == 201, resp.text
            ids.append(resp.json()["id"])
            assert (await c.post(f"{b.url}/v1/runs/{ids[-1]}/cancel")).status_code in (200, 202)
            assert (await c.post(f"{a.url}/v1/machines/a-01/uncordon", json={"reason": ""})).status_code == 200
            for rid in ids:
                resp = await c.get(f"{(a, b)[len(rid) % 2].url}/v1/runs/{rid}", params={"wait": 30})
                assert resp.json()["state"] in FINAL, resp.json()
            listed = (await c.get(f"{a.url}/v1/runs", params={"limit": 1000})).json()
            listed = listed["runs"] if isinstance(listed, dict) else listed
        assert {r["current_machine"][:2] for r in listed if r["state"] == "succeeded"} == {"a-", "b-"}, \
            "both replicas' agents were to do runs"

        first, second = scrape(a.url), scrape(b.url)
        assert fleet_samples(first) == fleet_samples(second)
        samples = fleet_samples(first)
        api_states = Counter(r["state"] for r in listed)
        assert by_label(samples, "deskfleet_runs_finished_total", "state") == +Counter(
            {s: n for s, n in api_states.items() if s in FINAL})
        assert api_states == {"succeeded": 16, "failed": 2, "cancelled": 1}
        assert sum(by_label(samples, "deskfleet_runs_submitted_total", "pool").values()) == len(listed)
        assert sum(by_label(samples, "deskfleet_attempts_started_total", "pool").values()) == sum(
            r["dispatches"] for r in listed)
        errors = Counter((r["error"] or {}).get("error") for r in listed if r["state"] == "failed")
        assert by_label(samples, "deskfleet_runs_finished_total", "error_code") == Counter(
            {"": 16, "cancelled": 1, **errors})
        assert sum(by_label(samples, "deskfleet_run_duration_seconds_count", "pool").values()) == len(listed)
        assert samples[("deskfleet_machines", (("pool", "default"), ("status", "ready")))] == 4
        # each replica's own: its agents
        for scraped, server in ((first, a), (second, b)):
            own = {s.name: s.value for f in scraped["families"] for s in f.samples
                   if s.labels.get("replica") == server.orch.replica_name}
            assert own["deskfleet_agents_connected"] == 2
        check_names(first)

        # A restart: replica b goes, a new one comes; nothing was reset.
        b.stop()
        started.remove(b)
        c_ = replica()
        after = fleet_samples(scrape(c_.url))  # b's agents are offline now: machines aside

        def figures(found: dict[Any, float]) -> dict[Any, float]:
            return {k: v for k, v in found.items() if k[0] != "deskfleet_machines"}

        assert figures(after) == figures(samples)
    finally:
        for server in started:
            server.stop()
        await asyncio.sleep(0)
        pg.drop_all()


# -- naming ------------------------------------------------------------------------------------------


def check_names(scraped: dict[str, Any]) -> None:
    """Prometheus' conventions, family by family (https://prometheus.io/docs/practices/naming/)."""
    text = scraped["text"]
    for old in OLD_NAMES:
        assert f"\n{old} " not in text and f"\n{old}{{" not in text, f"an old name is back: {old}"
    seen = set()
    for f in scraped["families"]:
        seen.add(f.name)
        assert f.name.startswith("deskfleet_"), f.name
        assert f.documentation, f"{f.name}: no HELP"
        assert f"# TYPE {f.name}" in text, f"{f.name}: no TYPE line"
        names = {s.name for s in f.samples}
        assert not any(n.endswith("_created") for n in names), f"{f.name}: _created samples"
        if f.type == "counter":
            assert names <= {f.name + "_total"}, f"{f.name}: a counter's samples end in _total: {names}"
        else:
            assert "_total" not in f.name, f"{f.name}: only a counter ends in _total"
        if f.type == "histogram":
            assert f.name.endswith("_seconds"), f"{f.name}: a histogram names its unit"
            series: dict[tuple[tuple[str, str], ...], list[Any]] = {}
            for s in f.samples:
                key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                series.setdefault(key, []).append(s)
            for key, samples in series.items():
                buckets = [s for s in samples if s.name == f.name + "_bucket"]
                count = next(s.value for s in samples if s.name == f.name + "_count")
                assert any(s.name == f.name + "_sum" for s in samples), (f.name, key)
                assert buckets and buckets[-1].labels["le"] == "+Inf", (f.name, key)
                values = [s.value for s in buckets]
                assert values == sorted(values), f"{f.name}{key}: buckets must be cumulative"
                assert values[-1] == count, f"{f.name}{key}: +Inf bucket == _count"
        if re.search(r"(duration|latency|_time|seconds|_wait)(_|$)", f.name):  # a time
            assert f.name.endswith("_seconds"), f"{f.name}: base unit last"
    assert {"deskfleet_runs_submitted", "deskfleet_runs_finished", "deskfleet_attempts_started",
            "deskfleet_attempts_retried", "deskfleet_stale_writes_refused", "deskfleet_run_queue_wait_seconds",
            "deskfleet_run_duration_seconds", "deskfleet_runs", "deskfleet_queue_oldest_wait_seconds",
            "deskfleet_machines", "deskfleet_human_tasks_waiting", "deskfleet_schedule_pass_seconds",
            "deskfleet_agents_connected"} <= seen


async def test_the_exposition_follows_the_naming_rules(live_server: LiveServer,
                                                      fleet_factory: Callable[..., Any]) -> None:
    await fleet_factory(live_server, count=1)
    async with httpx.AsyncClient(base_url=live_server.url, timeout=30) as c:
        for i in range(2):
            resp = await c.post("/v1/runs", json={"automation": "ehr.lookup_patient", "input": {"mrn": f"X-{i}"}},
                                params={"wait": 30})
            assert resp.json()["state"] == "succeeded"
    check_names(scrape(live_server.url))
