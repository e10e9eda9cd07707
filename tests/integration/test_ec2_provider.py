"""EC2Provider against moto's standalone server: real HTTP on loopback, real boto3.

One moto server runs for the module (``ThreadedMotoServer``: a werkzeug server in a
thread, spoken to over HTTP exactly as EC2 is — not the in-process ``mock_aws``), reset
before each test, with two launch templates. Credentials come from the environment, as
boto3's chain finds them in production; every EC2 call a provider makes is recorded (from
botocore's events), so a test can say which calls a create made — a warm instance started
rather than a launch — and with what (``Force``, ``Hibernate``, ``ClientToken``), which
moto alone would not show: it stops, hibernates and force-stops alike, and ignores
ClientToken (so our own token tags are what makes creates idempotent here).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from deskfleet.errors import ConfigError
from deskfleet.fleet.controller import Controller
from deskfleet.models import Pool
from deskfleet.pools import PoolPolicy
from deskfleet.providers import (
    Capabilities,
    EC2Provider,
    MachineNotFound,
    MachineSpec,
    ProviderError,
    ProviderState,
    Retrying,
)
from deskfleet.providers.configure import open_provider
from deskfleet.store import open_store
from deskfleet.store.runner import StoreRunner

S = ProviderState
REGION = "eu-west-1"
AMI = "ami-12c6146b"  # one of moto's stock images
# dummy credentials with the shape of real ones: no error message may show them
ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"

Calls = list[tuple[str, dict[str, Any]]]


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server, and credentials for it where boto3 looks first: only these, from the
    environment (no profile, no instance metadata)."""
    empty = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as env:
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            env.delenv(key)
        env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        env.setenv("AWS_CONFIG_FILE", str(empty / "config"))
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty / "credentials"))
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
        server.stop()


@pytest.fixture(scope="module")
def session(moto: str) -> Any:
    """One boto3 session for the module's clients: a client from a new session parses EC2's
    API description again (a third of a second), one from this session does not."""
    return boto3.Session()


@pytest.fixture
def endpoint(moto: str, session: Any) -> str:
    """A clean moto with the launch templates "desk" (hibernation configured) and "desk-big"."""
    httpx.post(f"{moto}/moto-api/reset").raise_for_status()
    ec2 = session.client("ec2", region_name=REGION, endpoint_url=moto)
    ec2.create_launch_template(LaunchTemplateName="desk", LaunchTemplateData={
        "ImageId": AMI, "InstanceType": "t3.large", "HibernationOptions": {"Configured": True}})
    ec2.create_launch_template(LaunchTemplateName="desk-big", LaunchTemplateData={
        "ImageId": AMI, "InstanceType": "m5.2xlarge"})
    return moto


@pytest.fixture
def aws(endpoint: str, session: Any) -> Any:
    """A plain boto3 client on the same server: the test's own view of the account."""
    return session.client("ec2", region_name=REGION, endpoint_url=endpoint)


@pytest.fixture
def make(endpoint: str, session: Any) -> Callable[..., tuple[EC2Provider, Calls]]:
    """A provider on the moto server, and the list of EC2 calls it makes (operation, params)."""

    def make_provider(**kw: Any) -> tuple[EC2Provider, Calls]:
        kw.setdefault("session", session)
        kw.setdefault("region", REGION)
        kw.setdefault("endpoint_url", endpoint)
        kw.setdefault("warm_boot", 0.0)
        kw.setdefault("poll", 0.01)
        kw.setdefault("fence_timeout", 2.0)
        p = EC2Provider(kw.pop("launch_template", "desk"), **kw)
        calls: Calls = []
        p.client.meta.events.register(
            "provide-client-params.ec2", lambda params, model, **_: calls.append((model.name, dict(params))))
        return p, calls

    return make_provider


def spec(name: str = "desk-1", pool: str = "ehr", **kw: Any) -> MachineSpec:
    return MachineSpec(name=name, pool=pool, **kw)


def changes(calls: Calls) -> list[str]:
    """The calls that change something (not the Describe* ones), in order."""
    return [op for op, _ in calls if not op.startswith("Describe")]


def params(calls: Calls, op: str) -> list[dict[str, Any]]:
    return [p for o, p in calls if o == op]


def instances(aws: Any) -> dict[str, dict[str, Any]]:
    return {i["InstanceId"]: i for r in aws.describe_instances()["Reservations"] for i in r["Instances"]}


def tags_of(aws: Any, instance_id: str) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instances(aws)[instance_id].get("Tags", [])}


# -- a machine's life -----------------------------------------------------------------------------


async def test_a_machines_whole_life_through_its_states(make: Any, aws: Any) -> None:
    p, calls = make(session=None)  # boto3's own chain finds the credentials
    assert p.capabilities == Capabilities(fence=True, hibernate=True, warm_pool=True)
    before = time.time()
    m = await p.create(spec(tags={"owner": "ops"}, labels={"gpu": "no"}), token="c1")
    assert m.id.startswith("i-") and m.state == S.PROVISIONING  # EC2's "pending"
    assert (m.name, m.pool, m.tags) == ("desk-1", "ehr", {"owner": "ops"})
    run = params(calls, "RunInstances")
    assert len(run) == 1 and run[0]["LaunchTemplate"] == {"LaunchTemplateName": "desk"}
    assert (run[0]["MinCount"], run[0]["MaxCount"], len(run[0]["ClientToken"])) == (1, 1, 64)
    assert {k: v for k, v in tags_of(aws, m.id).items() if not k.startswith("aws:")} == {
        "deskfleet:provider": "ec2", "deskfleet:name": "desk-1", "deskfleet:pool": "ehr",
        "deskfleet:image": "desk", "deskfleet:token": "c1", "deskfleet:labels": '{"gpu":"no"}',
        "owner": "ops"}
    assert instances(aws)[m.id]["InstanceType"] == "t3.large"  # the template's

    got = await p.get(m.id)
    assert got.state == S.RUNNING and got.address
    assert before - 2 <= got.created_at <= time.time() + 2
    await p.tag(m.id, {"drain": "yes"}, token="t1")
    assert (await p.get(m.id)).tags == {"owner": "ops", "drain": "yes"}

    await p.stop(m.id, token="s1")
    stopped = await p.get(m.id)
    assert (stopped.state, stopped.detail) == (S.STOPPED, "")
    assert stopped.state_since >= got.state_since
    await p.start(m.id, token="st1")
    running = await p.get(m.id)
    assert (running.state, running.detail) == (S.RUNNING, "")
    assert running.state_since >= stopped.state_since
    await p.reboot(m.id, token="r1")
    assert (await p.get(m.id)).state == S.RUNNING
    await p.power_off(m.id, token="f1")
    fenced = await p.get(m.id)
    assert (fenced.state, fenced.detail) == (S.STOPPED, "powered off (forced stop)")
    await p.destroy(m.id, token="d1")
    assert (await p.get(m.id)).state == S.TERMINATED
    assert [(x.id, x.state) for x in await p.list()] == [(m.id, S.TERMINATED)]  # while EC2 reports it
    with pytest.raises(ProviderError, match=r"cannot start i-\w+, it is terminated") as err:
        await p.start(m.id, token="st2")
    assert not err.value.retryable

    # each change one EC2 call, its token recorded beside it in the same CreateTags
    assert changes(calls) == ["RunInstances", "CreateTags", "StopInstances", "CreateTags",
                              "StartInstances", "CreateTags", "RebootInstances", "CreateTags",
                              "StopInstances", "CreateTags", "TerminateInstances", "CreateTags"]
    assert params(calls, "StopInstances") == [{"InstanceIds": [m.id], "Hibernate": False},
                                              {"InstanceIds": [m.id], "Force": True}]  # the fence
    assert tags_of(aws, m.id)["deskfleet:last-power_off"] == "f1"


async def test_list_is_by_pool_and_by_provider(make: Any, aws: Any) -> None:
    p, _ = make()
    a = await p.create(spec("desk-1", "ehr"), token="a")
    b = await p.create(spec("desk-2", "billing"), token="b")
    stranger = aws.run_instances(ImageId=AMI, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    assert sorted(m.id for m in await p.list()) == sorted([a.id, b.id])  # not the stranger
    assert [(m.id, m.name) for m in await p.list(pool="billing")] == [(b.id, "desk-2")]
    assert await p.list(pool="*") == []  # a pool is a name, not a pattern
    other, _ = make(name="ec2-staging")  # another provider in the same account sees none of them
    assert await other.list() == []
    with pytest.raises(MachineNotFound, match="not one of this provider's machines"):
        await other.get(a.id)
    assert stranger not in {m.id for m in await p.list()}


# -- tokens --------------------------------------------------------------------------------------------


async def test_a_create_acts_once_per_token_even_after_a_restart(make: Any, aws: Any) -> None:
    p, calls = make()
    first = await p.create(spec(), token="create:ehr:desk-1")
    again = await p.create(spec(), token="create:ehr:desk-1")
    restarted, calls_after = make()  # a new provider, as after the server restarted: the tags remember
    third = await restarted.create(spec(), token="create:ehr:desk-1")
    assert first.id == again.id == third.id and third.name == "desk-1"
    assert changes(calls) == ["RunInstances"] and changes(calls_after) == []
    assert list(instances(aws)) == [first.id]
    # EC2's own guarantee is asked for as well: its ClientToken, the same from any provider of this name
    assert instances(aws)[first.id]["ClientToken"] == params(calls, "RunInstances")[0]["ClientToken"]

    # a token that is no tag value or filter as it is (wildcards, length) is kept as a digest
    odd = "create:ehr:desk-2:" + "*?\\" * 90
    m = await p.create(spec("desk-2"), token=odd)
    assert (await restarted.create(spec("desk-2"), token=odd)).id == m.id
    assert tags_of(aws, m.id)["deskfleet:token"].startswith("sha256:")
    assert len(instances(aws)) == 2


async def test_a_token_on_another_order_is_refused_and_a_repeat_does_nothing(make: Any, aws: Any) -> None:
    p, calls = make()
    a = await p.create(spec("desk-1"), token="c1")
    b = await p.create(spec("desk-2"), token="c2")
    with pytest.raises(ProviderError, match=rf"token 'c1' was used for create of {a.id}, not stop of {a.id}") as err:
        await p.stop(a.id, token="c1")
    assert not err.value.retryable
    with pytest.raises(ProviderError, match="token 'c1' was used for create"):
        await p.create(spec("desk-3"), token="c1")  # the same token, another machine
    await p.stop(a.id, token="s1")
    with pytest.raises(ProviderError, match=rf"used for stop of {a.id}, not stop of {b.id}"):
        await p.stop(b.id, token="s1")
    await p.start(a.id, token="st1")
    await p.stop(a.id, token="s1")  # a late retry of the first stop: already done
    assert (await p.get(a.id)).state == S.RUNNING

    restarted, calls_after = make()  # the same answers from the tags alone
    await restarted.stop(a.id, token="s1")
    await restarted.start(a.id, token="st1")
    with pytest.raises(ProviderError, match=rf"used for stop of {a.id}, not reboot of {a.id}"):
        await restarted.reboot(a.id, token="s1")
    with pytest.raises(ProviderError, match=rf"used for create of {b.id}"):
        await restarted.destroy(a.id, token="c2")
    assert (await p.get(a.id)).state == S.RUNNING
    assert changes(calls_after) == []
    assert changes(calls).count("StopInstances") == 1


async def test_tags_merge_and_our_keys_are_reserved(make: Any, aws: Any) -> None:
    p, calls = make()
    m = await p.create(spec(tags={"team": "a"}), token="c")
    await p.tag(m.id, {"team": "b", "cost": "42"}, token="t1")
    await p.tag(m.id, {"team": "c"}, token="t1")  # the repeat does nothing
    assert (await p.get(m.id)).tags == {"team": "b", "cost": "42"}
    for bad in ({"deskfleet:pool": "other"}, {"aws:x": "y"}):
        with pytest.raises(ProviderError, match="reserved") as err:
            await p.tag(m.id, bad, token="t2")
        assert not err.value.retryable
    with pytest.raises(ProviderError, match="reserved"):
        await p.create(spec("desk-2", tags={"deskfleet:token": "x"}), token="c2")
    assert tags_of(aws, m.id)["deskfleet:pool"] == "ehr"
    assert changes(calls).count("CreateTags") == 1


# -- the warm pool, hibernation, the fence ----------------------------------------------------------


async def test_create_takes_a_stopped_warm_instance_instead_of_launching(make: Any, aws: Any) -> None:
    p, calls = make()
    warm = await p.fill_warm_pool("ehr", 2)
    assert [(w.state, w.name, w.detail) for w in warm] == [(S.STOPPED, "", "warm")] * 2
    assert await p.list(pool="ehr") == []  # not machines until taken
    assert changes(calls) == ["RunInstances", "StopInstances", "CreateTags"]
    assert params(calls, "RunInstances")[0]["MinCount"] == 2
    assert await p.fill_warm_pool("ehr", 2) == warm  # full: nothing more
    calls.clear()

    before = time.time()
    m = await p.create(spec("desk-1", tags={"owner": "ops"}), token="c1")
    assert m.id in {w.id for w in warm} and (m.name, m.state, m.detail) == ("desk-1", S.PROVISIONING, "")
    assert changes(calls) == ["CreateTags", "DeleteTags", "StartInstances"]  # no RunInstances
    got = await p.get(m.id)
    assert (got.state, got.tags) == (S.RUNNING, {"owner": "ops"})
    assert got.created_at >= before - 1  # when it became this machine, not when it was launched
    assert "deskfleet:warm" not in tags_of(aws, m.id) and tags_of(aws, m.id)["deskfleet:token"] == "c1"
    assert [(x.id, x.name) for x in await p.list(pool="ehr")] == [(m.id, "desk-1")]
    assert [w.id for w in await p.warm("ehr")] == [w.id for w in warm if w.id != m.id]

    restarted, _ = make()
    assert (await restarted.create(spec("desk-1", tags={"owner": "ops"}), token="c1")).id == m.id
    big = await p.create(spec("desk-2", image="desk-big"), token="c2")  # another template's: launched
    second = await p.create(spec("desk-3"), token="c3")  # the pool's last warm one
    launched = await p.create(spec("desk-4"), token="c4")  # none left: launched
    assert second.id in {w.id for w in warm} and {big.id, launched.id}.isdisjoint(w.id for w in warm)
    assert await p.warm("ehr") == []
    assert changes(calls).count("RunInstances") == 2 and len(instances(aws)) == 4


async def test_a_warm_size_keeps_each_listed_pool_filled_hibernated(make: Any, aws: Any) -> None:
    p, calls = make(warm_size=2, warm_hibernate=True)
    assert await p.list(pool="ehr") == []
    warm = await p.warm("ehr")
    assert [(w.state, w.detail) for w in warm] == [(S.STOPPED, "warm, hibernated")] * 2
    assert params(calls, "StopInstances")[0]["Hibernate"] is True
    m = await p.create(spec(), token="c1")
    assert m.id in {w.id for w in warm}
    assert [x.id for x in await p.list(pool="ehr")] == [m.id]  # and the pool is topped up again
    assert len(await p.warm("ehr")) == 2 and len(instances(aws)) == 3
    assert await p.warm("billing") == []  # only pools that were listed


async def test_stop_can_hibernate(make: Any, aws: Any) -> None:
    p, calls = make()
    m = await p.create(spec(), token="c")
    await p.stop(m.id, token="h1", hibernate=True)
    assert params(calls, "StopInstances") == [{"InstanceIds": [m.id], "Hibernate": True}]
    assert ((got := await p.get(m.id)).state, got.detail) == (S.STOPPED, "hibernated")
    await p.start(m.id, token="s1")
    assert ((got := await p.get(m.id)).state, got.detail) == (S.RUNNING, "")

    # an instance launched without hibernation (EC2 says so): a clear error, and no call
    plain = aws.run_instances(ImageId=AMI, MinCount=1, MaxCount=1, HibernationOptions={"Configured": False},
                              TagSpecifications=[{"ResourceType": "instance", "Tags": [
                                  {"Key": "deskfleet:provider", "Value": "ec2"},
                                  {"Key": "deskfleet:name", "Value": "desk-9"},
                                  {"Key": "deskfleet:pool", "Value": "ehr"}]}])["Instances"][0]["InstanceId"]
    with pytest.raises(ProviderError, match="not launched with hibernation configured") as err:
        await p.stop(plain, token="h2", hibernate=True)
    assert not err.value.retryable
    assert len(params(calls, "StopInstances")) == 1
    await p.stop(plain, token="h3")  # a plain stop is fine
    assert (await p.get(plain)).state == S.STOPPED


async def test_power_off_is_a_forced_stop_once_per_token(make: Any) -> None:
    p, calls = make()
    m = await p.create(spec(), token="c")
    await p.power_off(m.id, token="fence:1")
    await p.power_off(m.id, token="fence:1")  # the retry: waits for "stopped", does not act again
    assert params(calls, "StopInstances") == [{"InstanceIds": [m.id], "Force": True}]
    assert (await p.get(m.id)).detail == "powered off (forced stop)"
    await p.destroy(m.id, token="d")
    await p.power_off(m.id, token="fence:2")  # a terminated machine is fenced already
    await p.destroy(m.id, token="d2")  # and destroyed already
    assert changes(calls).count("StopInstances") == 1 and changes(calls).count("TerminateInstances") == 1


def test_states_moto_never_shows_are_read_as_ec2_reports_them(make: Any) -> None:
    """moto's instances jump from state to state; EC2's pass through stopping and
    shutting-down, say GMT, and give a reason when they hibernate or fail to launch."""
    p, _ = make()
    launched = datetime(2024, 6, 10, 12, 0, 0, tzinfo=UTC)
    mine = [{"Key": "deskfleet:name", "Value": "desk-1"}, {"Key": "deskfleet:pool", "Value": "ehr"}]

    def view(state: str, reason: str = "", code: str = "", message: str = "", tags: Any = ()) -> Any:
        return p._view({"InstanceId": "i-1", "State": {"Name": state}, "LaunchTime": launched,
                        "StateTransitionReason": reason, "StateReason": {"Code": code, "Message": message},
                        "Tags": [*mine, *tags]})

    at = datetime(2024, 6, 10, 12, 34, 56, tzinfo=UTC).timestamp()
    assert [view(s).state for s in ("pending", "running", "stopping", "stopped", "shutting-down",
                                    "terminated")] == [S.PROVISIONING, S.RUNNING, S.STOPPING, S.STOPPED,
                                                       S.TERMINATING, S.TERMINATED]
    assert view("running").state_since == view("running").created_at == launched.timestamp()
    hibernating = view("stopping", "User initiated (2024-06-10 12:34:56 GMT)", "Client.UserInitiatedHibernate",
                       "Client.UserInitiatedHibernate: User initiated hibernate")
    assert (hibernating.state_since, hibernating.detail) == (at, "hibernated")
    failed = view("terminated", "Server.InsufficientInstanceCapacity", "Server.InsufficientInstanceCapacity",
                  "Server.InsufficientInstanceCapacity: Insufficient capacity.")
    assert failed.detail == "Server.InsufficientInstanceCapacity: Insufficient capacity."
    # our own order, later than EC2's time, is when the state began
    later = view("stopped", "User initiated (2024-06-10 12:34:56 GMT)", tags=[
        {"Key": "deskfleet:since", "Value": str(at + 5)}, {"Key": "deskfleet:stopped-as", "Value": "power-off"}])
    assert (later.state_since, later.detail) == (at + 5, "powered off (forced stop)")
    assert view("rebooting-ish").state == S.FAILED


# -- errors ----------------------------------------------------------------------------------------------


async def test_an_unknown_instance_is_not_found(make: Any, aws: Any) -> None:
    p, calls = make()
    with pytest.raises(MachineNotFound, match="i-0123456789abcdef0") as err:
        await p.get("i-0123456789abcdef0")
    assert err.value.machine_id == "i-0123456789abcdef0" and not err.value.retryable
    with pytest.raises(MachineNotFound):
        await p.stop("i-0123456789abcdef0", token="s")
    # an instance that is not the provider's is never touched
    stranger = aws.run_instances(ImageId=AMI, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
    with pytest.raises(MachineNotFound, match="no tag deskfleet:provider=ec2"):
        await p.destroy(stranger, token="d")
    assert instances(aws)[stranger]["State"]["Name"] == "running"
    assert changes(calls) == []


async def test_a_missing_launch_template_is_a_permanent_error_that_says_so(make: Any, aws: Any) -> None:
    p, _ = make(launch_template="no-such-template")
    retrying = Retrying(p, sleep=_no_sleep)
    with pytest.raises(ProviderError) as err:
        await retrying.create(spec(), token="c")
    message = str(err.value)
    assert not err.value.retryable and retrying.stats["create"].attempts == 1
    assert message.startswith("ec2: create of desk-1: InvalidLaunchTemplateName.NotFoundException: ")
    assert f"no launch template 'no-such-template' in {REGION}" in message
    assert ACCESS_KEY not in message and SECRET_KEY not in message
    assert instances(aws) == {}
    with pytest.raises(ProviderError, match="no launch template 'desk-missing:3'"):  # a pool's image too
        await p.create(spec(image="desk-missing:3"), token="c2")
    with pytest.raises(ProviderError, match="the image ':3' is not a launch template") as err:
        await p.create(spec(image=":3"), token="c3")
    assert not err.value.retryable


async def test_retrying_rides_out_a_server_that_is_not_up_yet(make: Any) -> None:
    with socket.socket() as s:  # a port with nothing behind it, for now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p, _ = make(endpoint_url=f"http://127.0.0.1:{port}")
    with pytest.raises(ProviderError, match="Could not connect") as err:
        await p.list()
    assert err.value.retryable and ACCESS_KEY not in str(err.value) and SECRET_KEY not in str(err.value)

    servers: list[ThreadedMotoServer] = []

    async def sleep_then_start(seconds: float) -> None:
        if not servers:
            servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
            servers[0].start()

    retrying = Retrying(p, sleep=sleep_then_start)
    try:
        assert await retrying.list() == []
    finally:
        for server in servers:
            server.stop()
    assert (retrying.stats["list"].attempts, retrying.stats["list"].retries) == (2, 1)


# -- configuration ------------------------------------------------------------------------------------


def test_a_server_names_it_with_its_launch_template(endpoint: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """As ``deskfleet server --provider`` builds it: credentials from boto3's chain."""
    p = open_provider("aws", f"ec2:desk:2?region={REGION}&endpoint={endpoint}&warm=3&hibernate=yes",
                      data_dir=tmp_path)
    assert isinstance(p, Retrying) and isinstance(p.inner, EC2Provider)
    inner = p.inner
    assert (inner.name, inner.launch_template, inner.warm_size, inner.warm_hibernate) == ("aws", "desk:2", 3, True)
    assert inner.client.meta.region_name == REGION and p.capabilities.fence
    for bad, says in [("ec2:desk?secret_key=x", "never from here"), ("ec2:desk?warm=lots", "warm='lots'"),
                      ("ec2:?region=x", "not a launch template"), ("ec2:desk?hibernate=maybe", "yes or no"),
                      ("ec2:desk?region", "cannot read")]:
        with pytest.raises(ConfigError, match=says):
            open_provider("aws", bad, data_dir=tmp_path)
    with pytest.raises(ConfigError, match="give a region"):  # none in the environment either
        open_provider("aws", "ec2:desk", data_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "boto3", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"pip install 'deskfleet\[ec2\]'"):
        open_provider("aws", "ec2:desk", data_dir=tmp_path)


async def _no_sleep(seconds: float) -> None:
    pass


# -- a pool of instances ----------------------------------------------------------------------------


async def test_the_pool_controller_keeps_a_pool_of_instances_and_replaces_one_terminated_behind_its_back(
        make: Any, aws: Any, tmp_path: Path) -> None:
    """The pool controller on EC2: its floor launched, and an instance terminated from the
    console (not by the pool) said once as vanished and replaced — nothing destroyed twice."""
    now = [1_800_000_000.0]
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}", sqlite_synchronous="NORMAL")
    try:
        store.put_pool(Pool("ehr"), now[0])
        policy = PoolPolicy.model_validate({"min": 2, "max": 3, "provider": "ec2", "warm": {"min": 0, "max": 0}})
        store.put_pool_policy("ehr", policy.model_dump(mode="json"), expected_version=0, now=now[0])
        provider, calls = make(clock=lambda: now[0])
        controller = Controller(store, StoreRunner(store), {"ec2": Retrying(provider)}, leads=lambda: True,
                                clock=lambda: now[0], ready_time=600.0)

        def live() -> set[str]:
            return {i for i, d in instances(aws).items() if d["State"]["Name"] not in ("terminated", "shutting-down")}

        await controller.tick()
        first = live()
        assert len(first) == 2, instances(aws)
        assert len(params(calls, "RunInstances")) == 2
        gone = sorted(first)[0]
        aws.terminate_instances(InstanceIds=[gone])  # someone else's doing
        now[0] += 10
        await controller.tick()
        await controller.tick()  # said once, not every pass
        [vanished] = [e for e in store.events(limit=100) if e.kind == "pool.machine_vanished"]
        assert vanished.data["provider_id"] == gone and vanished.data["now"] == "terminated", vanished
        second = live()
        assert len(second) == 2 and gone not in second and len(second & first) == 1, instances(aws)
        assert len(params(calls, "RunInstances")) == 3  # one replacement
        assert params(calls, "TerminateInstances") == []  # nothing left to destroy: the pool did not try
    finally:
        store.close()
