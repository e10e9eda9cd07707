"""LibvirtProvider against libvirt itself: the binding and its built-in test driver.

``test:///default`` is a hypervisor that lives in this process: domains, storage pools and
volumes, states and metadata as libvirt keeps them for KVM, without a daemon or a guest.
Its state is shared by every connection to it while one is open, and dropped when the
last one closes — so the fixture holds a connection for the test (a restarted server is
a new provider with a new connection to the same libvirt), and leaves the driver as it
found it. The golden template is a shut-off domain whose disk is a volume of the driver's
storage pool, as on a real host.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from deskfleet.errors import ConfigError
from deskfleet.fleet.controller import Controller
from deskfleet.models import Pool
from deskfleet.pools import PoolPolicy
from deskfleet.providers import (
    Capabilities,
    LibvirtProvider,
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
URI = "test:///default"
GOLDEN_DISK = "/default-pool/golden.qcow2"
GOLDEN_MAC = "52:54:00:00:00:01"
GOLDEN = f"""\
<domain type='test'>
  <name>golden</name>
  <memory unit='MiB'>2048</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{GOLDEN_DISK}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/isos/drivers.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='{GOLDEN_MAC}'/>
      <source network='default'/>
    </interface>
  </devices>
</domain>
"""


def spec(name: str = "desk-1", pool: str = "ehr", **kw: Any) -> MachineSpec:
    return MachineSpec(name=name, pool=pool, **kw)


@pytest.fixture
def conn() -> Iterator[Any]:
    """The test driver, with the golden template and its disk, held for the test."""
    c = libvirt.open(URI)
    assert [d.name() for d in c.listAllDomains()] == ["test"], "the test driver holds an earlier test's state"
    pool = c.storagePoolLookupByName("default-pool")
    pool.createXML("<volume><name>golden.qcow2</name><capacity unit='GiB'>4</capacity>"
                   "<target><format type='qcow2'/></target></volume>", 0)
    c.defineXML(GOLDEN)
    yield c
    for dom in c.listAllDomains():
        if dom.name() != "test":
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
    for vol in pool.listAllVolumes():
        vol.delete(0)
    c.close()


@pytest.fixture
def make(conn: Any) -> Iterator[Callable[..., LibvirtProvider]]:
    made: list[LibvirtProvider] = []

    def make_provider(**kw: Any) -> LibvirtProvider:
        kw.setdefault("template", "golden")
        p = LibvirtProvider(kw.pop("uri", URI), name=kw.pop("name", "kvm"), **kw)
        made.append(p)
        return p

    yield make_provider
    for p in made:
        p.close()


def domains(conn: Any) -> list[str]:
    return sorted(d.name() for d in conn.listAllDomains() if d.name() not in ("test", "golden"))


def volumes(conn: Any) -> list[str]:
    return sorted(conn.storagePoolLookupByName("default-pool").listVolumes())


async def test_a_machines_whole_life(conn: Any, make: Callable[..., LibvirtProvider]) -> None:
    p = make()
    assert p.capabilities == Capabilities(fence=True, hibernate=True)
    before = time.time()
    m = await p.create(spec(tags={"owner": "ops"}), token="c1")
    assert (m.name, m.pool, m.state, m.tags, m.detail) == ("desk-1", "ehr", S.RUNNING, {"owner": "ops"}, "")
    assert before <= m.created_at <= m.state_since <= time.time()
    assert m.address is not None  # the driver's DHCP lease
    dom = conn.lookupByName("desk-1")
    assert m.id == dom.UUIDString() != conn.lookupByName("golden").UUIDString()
    assert dom.isActive() and not conn.lookupByName("golden").isActive()

    xml = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    disk, cdrom = xml.findall("devices/disk")
    # a disk of its own: a qcow2 overlay over the golden image, which nobody writes to
    assert disk.find("source").get("file") == "/default-pool/desk-1-vda.qcow2"  # type: ignore[union-attr]
    assert disk.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    overlay = ET.fromstring(conn.storageVolLookupByPath("/default-pool/desk-1-vda.qcow2").XMLDesc(0))
    assert (overlay.findtext("backingStore/path"), overlay.find("backingStore/format").get("type"),  # type: ignore[union-attr]
            overlay.findtext("capacity")) == (GOLDEN_DISK, "qcow2", str(4 << 30))
    assert cdrom.find("source").get("file") == "/isos/drivers.iso"  # type: ignore[union-attr]  # shared as it is
    assert xml.find("devices/interface/mac").get("address") != GOLDEN_MAC  # type: ignore[union-attr]
    # its name and pool, where a first-boot script in the guest reads them
    assert [e.text for e in xml.findall("sysinfo/oemStrings/entry")] == [
        "deskfleet.machine=desk-1", "deskfleet.pool=ehr"]
    assert xml.find("os/smbios").get("mode") == "sysinfo"  # type: ignore[union-attr]

    await p.stop(m.id, token="s1")
    stopped = await p.get(m.id)
    assert (stopped.state, stopped.detail, dom.isActive()) == (S.STOPPED, "", False)
    assert stopped.state_since >= m.state_since and stopped.address is None
    await p.start(m.id, token="st1")
    started = await p.get(m.id)
    assert (started.state, dom.isActive()) == (S.RUNNING, True) and started.state_since >= stopped.state_since
    await p.reboot(m.id, token="r1")
    rebooted = await p.get(m.id)
    assert rebooted.state == S.RUNNING and rebooted.state_since > started.state_since
    await p.power_off(m.id, token="f1")
    fenced = await p.get(m.id)
    assert (fenced.state, fenced.detail, dom.isActive()) == (S.STOPPED, "powered off (fenced)", False)
    assert [x.id for x in await p.list()] == [m.id]

    await p.destroy(m.id, token="d1")
    gone = await p.get(m.id)
    assert (gone.state, gone.name, gone.tags, gone.created_at) == (S.TERMINATED, "desk-1", {"owner": "ops"}, m.created_at)
    assert await p.list() == [] and domains(conn) == []
    assert volumes(conn) == ["golden.qcow2"]  # its overlay went with it; the golden image stays
    await p.destroy(m.id, token="d1")  # the same order again: done
    await p.destroy(m.id, token="d2")  # destroying the destroyed: nothing to do
    with pytest.raises(ProviderError, match="it is terminated") as err:
        await p.start(m.id, token="st2")
    assert not err.value.retryable


async def test_a_guest_that_does_not_shut_down_is_powered_off_after_the_stop_timeout(
        conn: Any, make: Callable[..., LibvirtProvider], monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_800_000_000.0]
    p = make(stop_timeout=60, clock=lambda: now[0])
    m = await p.create(spec(), token="c1")
    # a guest that ignores the power button (the driver's guests obey it at once)
    monkeypatch.setattr(libvirt.virDomain, "shutdown", lambda self: 0)
    stop = asyncio.create_task(p.stop(m.id, token="s1"))
    while (await p.get(m.id)).state != S.STOPPING:
        await asyncio.sleep(0.05)
    stopping = await p.get(m.id)
    assert (stopping.state_since, stop.done()) == (now[0], False)
    stop.cancel()  # the server went down while it waited
    now[0] += 59
    again = make(stop_timeout=60, clock=lambda: now[0])  # and came back, and stops it again
    waiting = asyncio.create_task(again.stop(m.id, token="s2"))
    await asyncio.sleep(0.6)
    assert not waiting.done() and conn.lookupByName("desk-1").isActive()
    now[0] += 1  # 60s since the stop began, not since it was repeated
    await asyncio.wait_for(waiting, 5)
    stopped = await again.get(m.id)
    assert (stopped.state, stopped.detail) == (S.STOPPED, "powered off: it did not shut down within 60s")
    assert not conn.lookupByName("desk-1").isActive()


async def test_a_stop_is_stopping_until_the_guest_is_off(conn: Any, make: Callable[..., LibvirtProvider],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    p = make(stop_timeout=60)
    m = await p.create(spec(), token="c1")
    monkeypatch.setattr(libvirt.virDomain, "shutdown", lambda self: 0)
    stop = asyncio.create_task(p.stop(m.id, token="s1"))
    while (await p.get(m.id)).state != S.STOPPING:
        await asyncio.sleep(0.05)
    with pytest.raises(ProviderError, match="still stopping") as err:
        await p.start(m.id, token="st1")
    assert err.value.retryable
    assert not stop.done()
    conn.lookupByName("desk-1").destroy()  # the guest powers off at last
    await stop
    assert (await p.get(m.id)).state == S.STOPPED


async def test_hibernation_keeps_the_memory_and_a_fence_throws_it_away(
        conn: Any, make: Callable[..., LibvirtProvider]) -> None:
    p = make()
    m = await p.create(spec(), token="c1")
    dom = conn.lookupByName("desk-1")
    await p.stop(m.id, token="h1", hibernate=True)
    assert ((await p.get(m.id)).state, (await p.get(m.id)).detail) == (S.STOPPED, "hibernated")
    assert dom.hasManagedSaveImage(0)
    await p.start(m.id, token="st1")  # resumed from its memory
    assert (await p.get(m.id)).state == S.RUNNING and not dom.hasManagedSaveImage(0)
    await p.stop(m.id, token="h2", hibernate=True)
    # fenced while hibernated: it must never resume the work it was doing
    await p.power_off(m.id, token="f1")
    assert ((await p.get(m.id)).detail, dom.hasManagedSaveImage(0)) == ("powered off (fenced)", False)

    cold = make(hibernate=False)
    assert cold.capabilities == Capabilities(fence=True)
    await cold.start(m.id, token="st2")
    with pytest.raises(ProviderError, match="cannot hibernate") as err:
        await cold.stop(m.id, token="h3", hibernate=True)
    assert not err.value.retryable and dom.isActive()


async def test_tokens_live_in_libvirt_and_hold_for_a_restarted_server(
        conn: Any, make: Callable[..., LibvirtProvider]) -> None:
    first = make()
    m = await first.create(spec(tags={"owner": "ops"}), token="c1")
    await first.stop(m.id, token="s1")
    await first.start(m.id, token="st1")
    await first.reboot(m.id, token="r1")
    rebooted = await first.get(m.id)
    first.close()

    second = make()  # the server restarted: a new provider, a new connection
    again = await second.create(spec(), token="c1")
    assert (again.id, again.created_at, again.tags) == (m.id, m.created_at, {"owner": "ops"})
    # the token names the order, not the spec: the machine that token created
    assert (await second.create(spec("desk-2", pool="billing"), token="c1")).id == m.id
    assert domains(conn) == ["desk-1"]
    await second.stop(m.id, token="s1")  # acted already, before the restart: does nothing
    await second.reboot(m.id, token="r1")  # nor does a reboot twice
    after = await second.get(m.id)
    assert (after.state, after.state_since) == (S.RUNNING, rebooted.state_since)

    other = await second.create(spec("desk-2"), token="c2")
    refused: list[Callable[[], Awaitable[object]]] = [
        lambda: second.stop(m.id, token="c1"),  # a create's token, on a stop
        lambda: second.reboot(m.id, token="s1"),  # a stop's, on a reboot
        lambda: second.start(other.id, token="st1"),  # a start of desk-1, on desk-2
        lambda: second.create(spec("desk-3"), token="r1"),
    ]
    for call in refused:
        with pytest.raises(ProviderError, match="was used for") as err:
            await call()
        assert not err.value.retryable
    assert domains(conn) == ["desk-1", "desk-2"] and (await second.get(m.id)).state == S.RUNNING

    # a destroyed machine's tokens are remembered by the provider that destroyed it
    await second.destroy(other.id, token="d2")
    assert (await second.create(spec("desk-2"), token="c2")).state == S.TERMINATED
    with pytest.raises(ProviderError, match=f"was used for destroy of {other.id}"):
        await second.destroy(m.id, token="d2")


async def test_a_create_cut_short_after_its_define_is_finished_by_its_retry(
        conn: Any, make: Callable[..., LibvirtProvider], monkeypatch: pytest.MonkeyPatch) -> None:
    p = make()
    start = libvirt.virDomain.create

    def server_dies(self: Any) -> int:
        raise RuntimeError("the server died between the define and the start")

    monkeypatch.setattr(libvirt.virDomain, "create", server_dies)
    with pytest.raises(RuntimeError):
        await p.create(spec(), token="c1")
    dom = conn.lookupByName("desk-1")
    [defined] = await p.list()
    assert (defined.state, dom.isActive()) == (S.PROVISIONING, False)
    monkeypatch.setattr(libvirt.virDomain, "create", start)
    made = await make().create(spec(), token="c1")
    assert (made.id, made.state, dom.isActive()) == (defined.id, S.RUNNING, True)
    assert domains(conn) == ["desk-1"]

    # a start libvirt refuses for good: a failed machine, with libvirt's reason
    def refused(self: Any) -> int:
        return int(self.reboot(0))  # a real libvirt error: the domain does not run

    monkeypatch.setattr(libvirt.virDomain, "create", refused)
    failed = await p.create(spec("desk-2"), token="c2")
    assert (failed.state, failed.detail) == (
        S.FAILED, "failed to start: Requested operation is not valid: domain is not running")
    assert (await p.get(failed.id)).state == S.FAILED


async def test_tags_and_pools(conn: Any, make: Callable[..., LibvirtProvider]) -> None:
    p = make()
    a = await p.create(spec("desk-1", tags={"owner": "ops", "cost": "7"}), token="c1")
    b = await p.create(spec("desk-2", pool="billing"), token="c2")
    await p.tag(a.id, {"drain": "yes", "cost": "9"}, token="t1")
    await p.tag(a.id, {"drain": "no"}, token="t1")  # a repeat: nothing changes
    assert (await p.get(a.id)).tags == {"owner": "ops", "cost": "9", "drain": "yes"}
    # the golden template and the driver's own domain are not deskfleet's machines
    assert sorted(m.id for m in await p.list()) == sorted([a.id, b.id])
    assert [(m.id, m.pool) for m in await p.list(pool="billing")] == [(b.id, "billing")]
    assert await p.list(pool="nope") == []
    assert (await make().get(a.id)).tags == {"owner": "ops", "cost": "9", "drain": "yes"}
    await p.destroy(a.id, token="d1")
    await p.tag(a.id, {"gone": "yes"}, token="t2")
    assert (await p.get(a.id)).tags["gone"] == "yes"


async def test_an_unknown_machine_is_not_found(conn: Any, make: Callable[..., LibvirtProvider]) -> None:
    p = make()
    golden = conn.lookupByName("golden").UUIDString()
    for machine_id in (str(uuid.uuid4()), "desk-1", golden):
        with pytest.raises(MachineNotFound) as err:
            await p.get(machine_id)
        assert err.value.machine_id == machine_id and not err.value.retryable
        with pytest.raises(MachineNotFound):
            await p.start(machine_id, token=f"st-{machine_id}")
        with pytest.raises(MachineNotFound):
            await p.destroy(machine_id, token=f"d-{machine_id}")
    assert "is not one of this provider's machines" in str(err.value)
    assert not conn.lookupByName("golden").isActive()
    # another provider's machine (another server sharing the host) is not this one's either
    theirs = await make(name="other").create(spec(), token="c1")
    assert await p.list() == []
    with pytest.raises(MachineNotFound):
        await p.power_off(theirs.id, token="f1")
    assert conn.lookupByName("desk-1").isActive()
    # nor does a domain whose record was spoilt by hand hide the others
    mine = await p.create(spec("desk-2"), token="c2")
    conn.lookupByName("desk-1").setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, "<machine pool='x'/>",
                                            "deskfleet", "https://deskfleet.dev/libvirt/1",
                                            libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    assert [m.id for m in await p.list()] == [mine.id]
    with pytest.raises(ProviderError, match="metadata of domain desk-1 is malformed"):
        await p.get(theirs.id)


async def test_libvirt_errors_are_provider_errors_with_libvirts_message(
        conn: Any, make: Callable[..., LibvirtProvider]) -> None:
    p = make()
    m = await p.create(spec(), token="c1")
    await p.stop(m.id, token="s1")
    with pytest.raises(ProviderError) as err:
        await p.reboot(m.id, token="r1")
    assert not err.value.retryable and not isinstance(err.value, MachineNotFound)
    assert err.value.message == f"kvm: reboot of {m.id}: Requested operation is not valid: domain is not running"
    assert "Traceback" not in str(err.value)
    # the reboot did not happen, so its token did not act: once the machine runs, it does
    await p.start(m.id, token="st1")
    await p.reboot(m.id, token="r1")

    # a template libvirt refuses: its reason, and nothing left behind (the overlay made first)
    broken = GOLDEN.replace("<os><type arch='x86_64'>hvm</type></os>", "")
    with pytest.raises(ProviderError, match="an os <type> must be specified") as err:
        await p.create(spec("desk-2", image=broken), token="c2")
    assert not err.value.retryable
    assert domains(conn) == ["desk-1"] and volumes(conn) == ["desk-1-vda.qcow2", "golden.qcow2"]
    with pytest.raises(ProviderError, match="no template domain 'win11' at test:///default"):
        await p.create(spec("desk-2", image="win11"), token="c3")
    with pytest.raises(ProviderError, match="is not XML"):
        await p.create(spec("desk-2", image="<domain"), token="c4")
    with pytest.raises(ProviderError, match=r"disk vda \(/elsewhere/disk.img\) is in no libvirt storage pool"):
        await p.create(spec("desk-2", image=GOLDEN.replace(GOLDEN_DISK, "/elsewhere/disk.img")), token="c5")
    with pytest.raises(ProviderError, match="a domain named golden already exists"):
        await p.create(spec("golden"), token="c6")
    with pytest.raises(ProviderError, match="no template"):
        await make(template=None).create(spec("desk-2"), token="c7")
    # a template file, as a pool's image names it
    path = Path(__file__).parent / "nonexistent-template.xml"
    with pytest.raises(ProviderError, match="cannot read the template"):
        await p.create(spec("desk-2", image=str(path)), token="c8")
    assert domains(conn) == ["desk-1"]


async def test_a_template_file(conn: Any, make: Callable[..., LibvirtProvider], tmp_path: Path) -> None:
    path = tmp_path / "golden.xml"
    path.write_text(GOLDEN)
    m = await make(template=str(path)).create(spec(), token="c1")
    assert m.state == S.RUNNING and volumes(conn) == ["desk-1-vda.qcow2", "golden.qcow2"]


async def test_retrying_rides_out_a_lost_connection(conn: Any, make: Callable[..., LibvirtProvider],
                                                    tmp_path: Path) -> None:
    down = f"qemu+unix:///system?socket={tmp_path}/libvirt-sock"  # libvirtd is not there (yet)
    p = make(uri=down)
    waits: list[float] = []

    async def sleep(seconds: float) -> None:  # meanwhile, libvirt comes back
        waits.append(seconds)
        p.uri = URI

    made = await Retrying(p, sleep=sleep).create(spec(), token="c1")
    assert made.state == S.RUNNING and domains(conn) == ["desk-1"] and len(waits) == 1

    q = make(uri=down)
    retrying = Retrying(q, sleep=lambda _s: asyncio.sleep(0), attempts=3)
    with pytest.raises(ProviderError) as err:
        await retrying.get(made.id)
    assert err.value.retryable and retrying.stats["get"].attempts == 3
    assert err.value.message.startswith(f"kvm: cannot connect to {down}: Failed to connect socket to")
    assert "Traceback" not in str(err.value)
    # a permanent error is not retried
    with pytest.raises(ProviderError):
        await Retrying(p, sleep=sleep).reboot(made.id, token="c1")
    assert len(waits) == 1


async def test_the_server_configures_it(conn: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = open_provider("kvm", f"libvirt:{URI}?template=golden", data_dir=tmp_path)
    assert isinstance(provider, Retrying) and isinstance(provider.inner, LibvirtProvider)
    assert (provider.name, provider.inner.uri, provider.inner.template) == ("kvm", URI, "golden")
    m = await provider.create(spec(), token="c1")
    assert m.state == S.RUNNING
    provider.inner.close()
    ssh = open_provider("far", "libvirt:qemu+ssh://root@host/system?keyfile=/k&template=win11&no_verify=1",
                        data_dir=tmp_path)
    assert isinstance(ssh, Retrying) and isinstance(ssh.inner, LibvirtProvider)
    assert (ssh.inner.uri, ssh.inner.template) == ("qemu+ssh://root@host/system?keyfile=/k&no_verify=1", "win11")
    plain = open_provider("x", "libvirt:qemu:///system", data_dir=tmp_path)
    assert isinstance(plain, Retrying) and isinstance(plain.inner, LibvirtProvider)
    assert (plain.inner.uri, plain.inner.template) == ("qemu:///system", None)
    with pytest.raises(ConfigError, match="template"):
        open_provider("x", "libvirt:qemu:///system?template=", data_dir=tmp_path)
    # without the binding, the server says how to get it
    monkeypatch.setitem(sys.modules, "libvirt", None)
    with pytest.raises(ConfigError, match=r"pip install 'deskfleet\[libvirt\]'"):
        open_provider("kvm", f"libvirt:{URI}", data_dir=tmp_path)


async def test_the_pool_controller_scales_a_pool_of_domains(
        conn: Any, make: Callable[..., LibvirtProvider], tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}", sqlite_synchronous="NORMAL")
    try:
        store.put_pool(Pool("ehr"), now[0])
        policy = PoolPolicy.model_validate({"min": 2, "max": 4, "provider": "kvm",
                                            "machine": {"image": "golden"}, "warm": {"min": 0, "max": 0}})
        store.put_pool_policy("ehr", policy.model_dump(mode="json"), expected_version=0, now=now[0])
        provider = make(template=None, clock=lambda: now[0])
        controller = Controller(store, StoreRunner(store), {"kvm": Retrying(provider)}, leads=lambda: True,
                                clock=lambda: now[0], ready_time=60.0)
        await controller.tick()
        first = domains(conn)
        assert len(first) == 2 and all(conn.lookupByName(n).isActive() for n in first)
        assert sorted(m.name for m in await provider.list(pool="ehr")) == first
        # no agent ever enrols from them: after the boot timeout they are destroyed and replaced
        now[0] += 200
        await controller.tick()
        await controller.tick()
        second = domains(conn)
        assert len(second) == 2 and not set(first) & set(second)
        assert [e.reason for e in store.events(limit=100) if e.kind == "machine.lifecycle"].count("destroyed") == 2
    finally:
        store.close()
