"""A provider whose machines are libvirt domains: KVM/QEMU (or Xen, bhyve…) on a host of ours.

:class:`LibvirtProvider` clones each machine from a *template* — a shut-off golden domain
or its XML — through libvirt's Python binding (``pip install 'deskfleet[libvirt]'``). The
clone is named after the machine, gets new MAC addresses, and a copy-on-write qcow2
overlay over each of the template's writable disks, so machines share the golden image
without writing to it. Its name and pool are written into its SMBIOS OEM strings
(``deskfleet.machine=NAME``), where a first-boot script in the guest reads them to start
``deskfleet agent --machine NAME --exact-name``.

Libvirt holds the state, so that a new provider (after the server restarted) finds its
machines and tokens again: each domain carries a record in its ``<metadata>``, in a
namespace of ours (:data:`NS`) — pool, tags, ``created_at``, the state it was last put in
and since when, the overlays made for it, and every token acted on. It is written to the
domain's persistent configuration (and to the live one while it runs), so it survives the
domain's shutdowns. Only a destroyed domain takes its record with it: this provider still
answers ``terminated`` for it, and knows its tokens, until it is restarted. A provider
touches only the domains whose record names it (the template is not a machine).

The state is libvirt's (running, shut off, paused…), refined by the record: a domain
defined but not yet started is ``provisioning``, one asked to shut down ``stopping``, one
shut off ``stopped`` — with ``hibernated`` (a managed-save image) or ``powered off
(fenced)`` as its detail. A change nobody here made (a guest that shut itself down) dates
from when this provider first saw it.

The binding blocks, so every call runs in a worker thread; calls on one machine take its
lock, so that a retry whose first try is still running (cancelled by a timeout, its thread
is not) waits for it instead of acting beside it. libvirt's errors become
:class:`ProviderError`: retryable when the connection failed or an operation timed out
(the next call reconnects), :class:`MachineNotFound` for a domain that is gone.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import threading
import time
import urllib.parse
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .base import (
    Capabilities,
    MachineNotFound,
    MachineProvider,
    MachineSpec,
    ProviderError,
    ProviderMachine,
    ProviderState,
)

log = logging.getLogger(__name__)

S = ProviderState
#: the XML namespace of deskfleet's record in a domain's <metadata>
NS = "https://deskfleet.dev/libvirt/1"
#: how long tokens (and destroyed machines) are remembered: a retry comes within minutes
KEEP = 7 * 86400.0
#: while a stop waits for the guest to shut down, how often it looks
POLL = 0.25
#: libvirt's messages can be long (an XML error quotes the line); ours stay readable
MESSAGE_LIMIT = 500


@dataclass
class _Record:
    """What a domain's metadata says about the machine."""

    pool: str
    created_at: float
    state: ProviderState  # the state this provider last put it in
    since: float
    detail: str = ""
    provider: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, tuple[str, float]] = field(default_factory=dict)  # token → (op, when)
    volumes: list[str] = field(default_factory=list)  # the overlays made for it, by path

    def element(self, ns: str = "") -> ET.Element:
        q = (lambda tag: f"{{{ns}}}{tag}") if ns else (lambda tag: tag)
        root = ET.Element(q("machine"), pool=self.pool, provider=self.provider,
                          created_at=repr(self.created_at), state=self.state.value,
                          since=repr(self.since), detail=self.detail)
        for key, value in sorted(self.tags.items()):
            ET.SubElement(root, q("tag"), key=key).text = value
        for token, (op, at) in self.tokens.items():
            ET.SubElement(root, q("token"), id=token, op=op, at=repr(at))
        for path in self.volumes:
            ET.SubElement(root, q("volume"), path=path)
        return root

    @classmethod
    def parse(cls, text: str) -> _Record:
        root = ET.fromstring(text)
        children = [(c.tag.rpartition("}")[2], c) for c in root]
        return cls(pool=root.attrib["pool"], created_at=float(root.attrib["created_at"]),
                   state=S(root.attrib["state"]), since=float(root.attrib["since"]),
                   detail=root.get("detail", ""), provider=root.get("provider", ""),
                   tags={c.attrib["key"]: c.text or "" for tag, c in children if tag == "tag"},
                   tokens={c.attrib["id"]: (c.attrib["op"], float(c.attrib["at"]))
                           for tag, c in children if tag == "token"},
                   volumes=[c.attrib["path"] for tag, c in children if tag == "volume"])


@dataclass
class _Gone:
    """A machine destroyed by this provider: its domain, and the record in it, are no more."""

    machine: ProviderMachine
    tokens: dict[str, tuple[str, float]]


class LibvirtProvider(MachineProvider):
    """Machines that are libvirt domains at ``uri``, cloned from a template.

    ``template`` is the default template (a spec's ``image`` overrides it): the name of a
    domain at ``uri`` (keep it shut off), a path to a ``.xml`` file, or the XML itself. A
    ``stop`` asks the guest to shut down and waits ``stop_timeout`` seconds before it cuts
    the power; ``hibernate`` says whether ``stop(hibernate=True)`` may use managed save.
    """

    def __init__(
        self,
        uri: str = "qemu:///system",
        *,
        template: str | None = None,
        name: str = "libvirt",
        hibernate: bool = True,
        stop_timeout: float = 120.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._lv = _binding(name)
        self.name = name
        self.uri = uri
        self.template = template
        self.stop_timeout = stop_timeout
        self.capabilities = Capabilities(fence=True, hibernate=hibernate)
        self._clock = clock
        self._conn: Any = None
        self._conn_lock = threading.RLock()  # held while connecting, which may fail and reset it
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._seen: dict[str, tuple[ProviderState, float]] = {}  # id → a state nobody here made, since
        self._gone: dict[str, _Gone] = {}
        lv = self._lv
        #: besides a lost connection: another job holds the domain, or its guest agent is slow
        self._transient = {lv.VIR_ERR_OPERATION_TIMEOUT, lv.VIR_ERR_AGENT_UNRESPONSIVE,
                           getattr(lv, "VIR_ERR_RESOURCE_BUSY", -1)}

    @classmethod
    def from_spec(cls, spec: str, *, name: str) -> LibvirtProvider:
        """The provider of ``--provider NAME=libvirt:URI[?template=T]``: ``template`` is
        ours, taken out of the URI; libvirt's own parameters (``keyfile``, ``socket``…) stay."""
        base, sep, query = spec.strip().partition("?")
        kept, template = [], None
        for item in query.split("&") if sep else []:
            key, _, value = item.partition("=")
            if key != "template":
                kept.append(item)
            elif not (template := urllib.parse.unquote(value)):
                raise ConfigError(f"provider {name!r}: template= names no template; give a domain "
                                  "name or a .xml file, or leave it out")
        return cls(base + ("?" + "&".join(kept) if kept else ""), template=template, name=name)

    def close(self) -> None:
        """Close the connection to libvirt (the next call opens a new one)."""
        with self._conn_lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(self._lv.libvirtError):
                conn.close()

    # -- the provider ----------------------------------------------------------------------

    async def create(self, spec: MachineSpec, *, token: str) -> ProviderMachine:
        return await asyncio.to_thread(self._create, spec, token)

    async def start(self, machine_id: str, *, token: str) -> None:
        await asyncio.to_thread(self._order, "start", machine_id, token, self._start)

    async def stop(self, machine_id: str, *, token: str, hibernate: bool = False) -> None:
        if hibernate and not self.capabilities.hibernate:
            raise ProviderError(f"{self.name}: this provider cannot hibernate", retryable=False)
        act = self._hibernate if hibernate else self._shutdown
        await asyncio.to_thread(self._order, "stop", machine_id, token, act)
        # the guest shuts down in its own time; the power is cut if it takes too long
        while not await asyncio.to_thread(self._stopped, machine_id):
            await asyncio.sleep(POLL)

    async def reboot(self, machine_id: str, *, token: str) -> None:
        await asyncio.to_thread(self._order, "reboot", machine_id, token, self._reboot, before=True)

    async def power_off(self, machine_id: str, *, token: str) -> None:
        await asyncio.to_thread(self._order, "power_off", machine_id, token, self._power_off)

    async def destroy(self, machine_id: str, *, token: str) -> None:
        await asyncio.to_thread(self._destroy, machine_id, token)

    async def tag(self, machine_id: str, tags: dict[str, str], *, token: str) -> None:
        def act(dom: Any, rec: _Record) -> None:
            rec.tags.update(tags)

        def gone_ok(gone: _Gone) -> None:  # a destroyed machine keeps its tags here
            gone.machine.tags.update(tags)

        await asyncio.to_thread(self._order, "tag", machine_id, token, act, gone_ok=gone_ok)

    async def get(self, machine_id: str) -> ProviderMachine:
        return await asyncio.to_thread(self._get, machine_id)

    async def list(self, *, pool: str | None = None) -> builtins.list[ProviderMachine]:
        return await asyncio.to_thread(self._list, pool)

    # -- orders (in a worker thread) -------------------------------------------------------

    def _create(self, spec: MachineSpec, token: str) -> ProviderMachine:
        where = f"{self.name}: create {spec.name}"
        with self._lock(f"name:{spec.name}"), self._errors(where):
            conn = self._connection()
            used = self._used(conn, token)
            if used is not None:
                mid, op, dom = used
                self._check_reuse(token, op, mid, "create", mid)
                if dom is None:
                    return _copy(self._gone[mid].machine)
                rec = self._record(dom, mid)
                if rec.state == S.PROVISIONING:  # the first try stopped after the define
                    if dom.isActive():  # (and after the start)
                        self._set(rec, S.RUNNING)
                        self._write(dom, rec)
                    else:
                        self._boot(dom, rec, where)
                return self._view(dom, rec)
            if self._domain_named(conn, spec.name) is not None:
                raise ProviderError(f"{where}: a domain named {spec.name} already exists",
                                    retryable=False)
            now = self._clock()
            rec = _Record(pool=spec.pool, created_at=now, state=S.PROVISIONING, since=now,
                          provider=self.name, tags=dict(spec.tags), tokens={token: ("create", now)})
            domain = self._clone(conn, spec, rec, where)
            try:
                dom = conn.defineXML(ET.tostring(domain, encoding="unicode"))
            except self._lv.libvirtError:
                self._delete_volumes(conn, rec.volumes)
                raise
            log.info("provider %s: defined %s (%s)", self.name, spec.name, dom.UUIDString(),
                     extra={"machine": spec.name})
            self._boot(dom, rec, where)
            return self._view(dom, rec)

    def _order(self, op: str, machine_id: str, token: str,
               act: Callable[[Any, _Record], bool | None], *, before: bool = False,
               gone_ok: Callable[[_Gone], None] | None = None) -> None:
        """One idempotent change: a token already used does not act again.

        ``act`` changes the domain and its record, which is then written with the token —
        unless it answers False (it undefined the domain). With ``before``, for an act that
        would not be harmless twice (a reboot), the token is written ahead of it: at most
        once. A destroyed machine takes ``gone_ok`` orders (destroy, tag); others are refused.
        """
        with self._lock(machine_id), self._errors(f"{self.name}: {op} of {machine_id}", machine_id):
            conn = self._connection()
            dom = self._domain(conn, machine_id)
            if dom is None:
                gone = self._gone.get(machine_id)
                if gone is None:
                    raise MachineNotFound(machine_id, f"{self.name}: no machine {machine_id!r}")
                if self._known_token(conn, token, op, machine_id, gone.tokens):
                    return
                if gone_ok is None:
                    raise ProviderError(f"{self.name}: cannot {op} {machine_id}, it is terminated",
                                        retryable=False)
                gone_ok(gone)
                gone.tokens[token] = (op, self._clock())
                return
            rec = self._record(dom, machine_id)
            if self._known_token(conn, token, op, machine_id, rec.tokens):
                return
            rec.tokens[token] = (op, self._clock())
            if before:
                self._write(dom, rec)
                try:
                    act(dom, rec)
                except BaseException:
                    del rec.tokens[token]  # it did not act: a retry with this token must
                    with contextlib.suppress(self._lv.libvirtError):
                        self._write(dom, rec)
                    raise
            elif act(dom, rec) is False:
                return
            self._write(dom, rec)

    def _start(self, dom: Any, rec: _Record) -> None:
        lv = self._lv
        code, _ = dom.state(0)
        if rec.state == S.STOPPING and dom.isActive():  # a guest shutting down cannot be stopped
            raise ProviderError(f"{self.name}: {dom.name()} is still stopping; start it once it "
                                "has stopped", retryable=True)
        if code == lv.VIR_DOMAIN_SHUTOFF or code == lv.VIR_DOMAIN_CRASHED:
            dom.create()  # restores a managed-save image (hibernated) if there is one
        elif code == lv.VIR_DOMAIN_PAUSED:
            dom.resume()
        elif code == lv.VIR_DOMAIN_PMSUSPENDED:
            dom.pMWakeup(0)
        else:
            return
        self._set(rec, S.RUNNING)

    def _shutdown(self, dom: Any, rec: _Record) -> None:
        if dom.isActive():
            dom.shutdown()  # the guest's ACPI power button: it shuts down in its own time
            if rec.state != S.STOPPING:  # pressed again: the count goes on from the first time
                self._set(rec, S.STOPPING)
        elif rec.state != S.STOPPED:
            self._set(rec, S.STOPPED)

    def _hibernate(self, dom: Any, rec: _Record) -> None:
        if dom.isActive():
            dom.managedSave(0)  # memory to disk; the next start resumes from it
            self._set(rec, S.STOPPED, "hibernated")

    def _stopped(self, machine_id: str) -> bool:
        """Whether a stop is over: once the domain is off, powered off if it is still on
        ``stop_timeout`` after the stop began (by the record: a retry, or a stop repeated
        after a restart, does not start the count again)."""
        with self._lock(machine_id), self._errors(f"{self.name}: stop of {machine_id}", machine_id):
            dom = self._domain(self._connection(), machine_id)
            if dom is None:
                raise MachineNotFound(machine_id, f"{self.name}: {machine_id} vanished while it stopped")
            rec = self._record(dom, machine_id)
            if rec.state != S.STOPPING:  # stopped, or another order came since
                return True
            if dom.isActive():
                if self._clock() - rec.since < self.stop_timeout:
                    return False
                log.warning("provider %s: %s did not shut down within %gs: powering it off",
                            self.name, dom.name(), self.stop_timeout, extra={"machine": dom.name()})
                dom.destroy()
                self._set(rec, S.STOPPED, f"powered off: it did not shut down within {self.stop_timeout:g}s")
            else:
                self._set(rec, S.STOPPED)
            self._write(dom, rec)
            return True

    def _reboot(self, dom: Any, rec: _Record) -> None:
        dom.reboot(0)  # libvirt refuses for a domain that does not run
        self._set(rec, S.RUNNING)

    def _power_off(self, dom: Any, rec: _Record) -> None:
        if dom.isActive():
            log.warning("provider %s: fencing %s (virDomainDestroy)", self.name, dom.name(),
                        extra={"machine": dom.name()})
            dom.destroy()
        elif rec.state == S.STOPPED and not dom.hasManagedSaveImage(0):
            return
        # a hibernated machine must not resume what it was doing when it was fenced
        if dom.hasManagedSaveImage(0):
            dom.managedSaveRemove(0)
        self._set(rec, S.STOPPED, "powered off (fenced)")

    def _destroy(self, machine_id: str, token: str) -> None:
        def act(dom: Any, rec: _Record) -> bool:
            conn = dom.connect()
            if dom.isActive():
                dom.destroy()
            # the overlays first: a destroy that fails after them finds the record again
            self._delete_volumes(conn, rec.volumes)
            machine = self._view(dom, rec)
            flags = self._lv.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | self._lv.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            os_ = ET.fromstring(dom.XMLDesc(self._lv.VIR_DOMAIN_XML_INACTIVE)).find("os")
            if os_ is not None and (os_.get("firmware") == "efi" or os_.find("nvram") is not None
                                    or os_.find("loader") is not None):
                flags |= self._lv.VIR_DOMAIN_UNDEFINE_NVRAM  # UEFI: its variables go with it
            dom.undefineFlags(flags)
            now = self._clock()
            machine.state, machine.state_since, machine.detail, machine.address = S.TERMINATED, now, "", None
            self._gone[machine_id] = _Gone(machine, {**rec.tokens, token: ("destroy", now)})
            self._seen.pop(machine_id, None)
            log.info("provider %s: destroyed %s (%s)", self.name, machine.name, machine_id,
                     extra={"machine": machine.name})
            return False  # no record left to write

        self._order("destroy", machine_id, token, act, gone_ok=lambda gone: None)

    # -- reading ---------------------------------------------------------------------------

    def _get(self, machine_id: str) -> ProviderMachine:
        with self._errors(f"{self.name}: get {machine_id}", machine_id):
            dom = self._domain(self._connection(), machine_id)
            if dom is None:
                gone = self._gone.get(machine_id)
                if gone is None:
                    raise MachineNotFound(machine_id, f"{self.name}: no machine {machine_id!r}")
                return _copy(gone.machine)
            return self._view(dom, self._record(dom, machine_id))

    def _list(self, pool: str | None) -> builtins.list[ProviderMachine]:
        found, ids = [], set()
        with self._errors(f"{self.name}: list"):
            for dom, rec in self._ours(self._connection()):
                ids.add(dom.UUIDString())
                if pool is None or rec.pool == pool:
                    with contextlib.suppress(MachineNotFound):  # undefined while we looked
                        found.append(self._view(dom, rec))
        if pool is None:  # a full listing: forget what we saw of domains that are no more
            for mid in self._seen.keys() - ids:
                self._seen.pop(mid, None)
        self._prune()
        return found

    def _view(self, dom: Any, rec: _Record) -> ProviderMachine:
        mid = dom.UUIDString()
        with self._errors(f"{self.name}: get {mid}", mid):
            state, detail = self._observe(dom, rec)
            if state == rec.state:
                since = rec.since
                self._seen.pop(mid, None)
            else:
                seen = self._seen.get(mid)
                if seen is None or seen[0] != state:
                    seen = self._seen[mid] = (state, self._clock())
                since = seen[1]
            address = self._address(dom) if state == S.RUNNING else None
        return ProviderMachine(id=mid, name=dom.name(), pool=rec.pool, state=state,
                               tags=dict(rec.tags), created_at=rec.created_at, state_since=since,
                               detail=detail, address=address)

    def _observe(self, dom: Any, rec: _Record) -> tuple[ProviderState, str]:
        """The machine's state from libvirt's, refined by what the record knows."""
        lv = self._lv
        code, reason = dom.state(0)
        if code in (lv.VIR_DOMAIN_RUNNING, lv.VIR_DOMAIN_BLOCKED):
            return (S.STOPPING, "") if rec.state == S.STOPPING else (S.RUNNING, "")
        if code == lv.VIR_DOMAIN_SHUTDOWN:
            return S.STOPPING, ""
        if code == lv.VIR_DOMAIN_PAUSED:
            if reason == lv.VIR_DOMAIN_PAUSED_STARTING_UP:
                return S.BOOTING, ""
            if reason in (lv.VIR_DOMAIN_PAUSED_SAVE, lv.VIR_DOMAIN_PAUSED_SHUTTING_DOWN):
                return S.STOPPING, ""
            if reason in (lv.VIR_DOMAIN_PAUSED_IOERROR, lv.VIR_DOMAIN_PAUSED_CRASHED,
                          lv.VIR_DOMAIN_PAUSED_WATCHDOG):
                return S.FAILED, {lv.VIR_DOMAIN_PAUSED_IOERROR: "paused on a disk I/O error",
                                  lv.VIR_DOMAIN_PAUSED_CRASHED: "crashed (paused)",
                                  lv.VIR_DOMAIN_PAUSED_WATCHDOG: "paused by its watchdog"}[reason]
            if reason in (lv.VIR_DOMAIN_PAUSED_MIGRATION, lv.VIR_DOMAIN_PAUSED_SNAPSHOT,
                          lv.VIR_DOMAIN_PAUSED_DUMP, lv.VIR_DOMAIN_PAUSED_POSTCOPY):
                return S.RUNNING, ""  # a pause of seconds, by libvirt itself
            return S.STOPPED, "paused"
        if code == lv.VIR_DOMAIN_PMSUSPENDED:
            return S.STOPPED, "suspended by its guest"
        if code == lv.VIR_DOMAIN_CRASHED or (code == lv.VIR_DOMAIN_SHUTOFF
                                             and reason == lv.VIR_DOMAIN_SHUTOFF_CRASHED):
            return S.FAILED, "crashed"
        if code == lv.VIR_DOMAIN_SHUTOFF:
            if rec.state in (S.PROVISIONING, S.FAILED):
                return rec.state, rec.detail
            if reason == lv.VIR_DOMAIN_SHUTOFF_FAILED:
                return S.FAILED, "failed to start"
            if dom.hasManagedSaveImage(0):
                return S.STOPPED, "hibernated"
            if rec.state in (S.STOPPED, S.STOPPING):  # ours: a stop, or the fence
                return S.STOPPED, rec.detail if rec.state == S.STOPPED else ""
            return S.STOPPED, ("shut down from inside" if reason == lv.VIR_DOMAIN_SHUTOFF_SHUTDOWN
                               else "powered off" if reason == lv.VIR_DOMAIN_SHUTOFF_DESTROYED else "")
        return S.PROVISIONING, ""  # VIR_DOMAIN_NOSTATE

    def _address(self, dom: Any) -> str | None:
        """The first IPv4 address of the domain's DHCP leases (libvirt's own networks)."""
        try:
            interfaces = dom.interfaceAddresses(self._lv.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE)
        except self._lv.libvirtError:
            return None
        for interface in (interfaces or {}).values():
            for addr in interface.get("addrs") or []:
                if addr.get("type") == self._lv.VIR_IP_ADDR_TYPE_IPV4:
                    return str(addr["addr"])
        return None

    # -- cloning the template --------------------------------------------------------------

    def _clone(self, conn: Any, spec: MachineSpec, rec: _Record, where: str) -> ET.Element:
        """The template's XML made into the machine's, with an overlay over each writable disk."""
        image = spec.image or self.template
        if not image:
            raise ProviderError(f"{where}: no template: give the pool's machine image, or the "
                                "provider's (?template=NAME)", retryable=False)
        if image.lstrip().startswith("<"):
            text = image
        elif image.endswith(".xml"):
            try:
                text = Path(image).read_text(encoding="utf-8")
            except OSError as exc:
                raise ProviderError(f"{where}: cannot read the template {image}: {exc.strerror or exc}",
                                    retryable=False) from exc
        else:
            template = self._domain_named(conn, image)
            if template is None:
                raise ProviderError(f"{where}: no template domain {image!r} at {self.uri}",
                                    retryable=False)
            text = template.XMLDesc(self._lv.VIR_DOMAIN_XML_INACTIVE | self._lv.VIR_DOMAIN_XML_SECURE)
        try:
            root = ET.fromstring(text)
        except ET.ParseError as exc:
            raise ProviderError(f"{where}: the template {image[:60]!r} is not XML: {exc}",
                                retryable=False) from None
        if root.tag != "domain":
            raise ProviderError(f"{where}: the template {image[:60]!r} is not a <domain>", retryable=False)
        for tag in ("uuid", "name"):
            for old in root.findall(tag):
                root.remove(old)
        ET.SubElement(root, "name").text = spec.name
        # libvirt makes what must be unique: MAC addresses, tap devices, the NVRAM file
        for interface in root.findall("devices/interface"):
            for old in interface.findall("mac") + interface.findall("target"):
                interface.remove(old)
        for nvram in root.findall("os/nvram"):
            nvram.text = None
        metadata = root.find("metadata")
        if metadata is None:
            metadata = ET.SubElement(root, "metadata")
        for old in metadata.findall(f"{{{NS}}}machine"):
            metadata.remove(old)
        self._oem_strings(root, spec)
        try:
            for disk in root.findall("devices/disk"):
                self._overlay(conn, disk, spec, rec, where)
        except BaseException:
            self._delete_volumes(conn, rec.volumes)
            raise
        metadata.append(rec.element(NS))
        return root

    def _oem_strings(self, root: ET.Element, spec: MachineSpec) -> None:
        """The machine's name and pool in SMBIOS type 11, for the guest to read (Linux:
        ``dmidecode -t 11``; Windows: ``Win32_ComputerSystem.OEMStringArray``)."""
        sysinfo = next((s for s in root.findall("sysinfo") if s.get("type") == "smbios"), None)
        if sysinfo is None:
            sysinfo = ET.SubElement(root, "sysinfo", type="smbios")
        oem = sysinfo.find("oemStrings")
        if oem is None:
            oem = ET.SubElement(sysinfo, "oemStrings")
        for entry in oem.findall("entry"):
            if (entry.text or "").startswith("deskfleet."):
                oem.remove(entry)
        ET.SubElement(oem, "entry").text = f"deskfleet.machine={spec.name}"
        ET.SubElement(oem, "entry").text = f"deskfleet.pool={spec.pool}"
        os_ = root.find("os")
        if os_ is not None and os_.find("smbios") is None:
            ET.SubElement(os_, "smbios", mode="sysinfo")

    def _overlay(self, conn: Any, disk: ET.Element, spec: MachineSpec, rec: _Record, where: str) -> None:
        """Point a writable disk of the clone at a new qcow2 overlay over the template's."""
        lv = self._lv
        source = disk.find("source")
        shared = disk.find("readonly") is not None or disk.find("shareable") is not None
        if disk.get("device", "disk") != "disk" or shared or source is None:
            return  # CD-ROMs, shared disks and empty drives are the template's, as they are
        target = disk.find("target")
        dev = target.get("dev", "") if target is not None else ""
        kind = disk.get("type", "file")
        if kind == "file":
            path = source.get("file", "")
            if not path:
                return  # an empty drive
        elif kind == "volume":
            path = conn.storagePoolLookupByName(source.get("pool")).storageVolLookupByName(
                source.get("volume")).path()
        else:
            raise ProviderError(f"{where}: the template's disk {dev} is a {kind} disk: only file "
                                "and volume disks can be cloned (mark it <readonly/> or "
                                "<shareable/> to share it)", retryable=False)
        try:
            base = conn.storageVolLookupByPath(path)
        except lv.libvirtError as exc:
            if exc.get_error_code() != lv.VIR_ERR_NO_STORAGE_VOL:
                raise
            raise ProviderError(f"{where}: the template's disk {dev} ({path}) is in no libvirt "
                                "storage pool: define one for its directory (virsh pool-define-as)",
                                retryable=False) from None
        pool = base.storagePoolLookupByVolume()
        driver = disk.find("driver")
        if driver is None:
            driver = ET.SubElement(disk, "driver", name="qemu")
        name = f"{spec.name}-{dev or len(rec.volumes)}.qcow2"
        try:
            vol = pool.storageVolLookupByName(name)
        except lv.libvirtError as exc:
            if exc.get_error_code() != lv.VIR_ERR_NO_STORAGE_VOL:
                raise
            volume = ET.Element("volume")
            ET.SubElement(volume, "name").text = name
            ET.SubElement(volume, "capacity", unit="bytes").text = str(base.info()[1])
            ET.SubElement(ET.SubElement(volume, "target"), "format", type="qcow2")
            backing = ET.SubElement(volume, "backingStore")
            ET.SubElement(backing, "path").text = path
            ET.SubElement(backing, "format", type=driver.get("type", "raw"))
            vol = pool.createXML(ET.tostring(volume, encoding="unicode"), 0)
        else:  # left by a create that failed before its domain was defined: ours if over the same base
            if ET.fromstring(vol.XMLDesc(0)).findtext("backingStore/path") != path:
                raise ProviderError(f"{where}: a volume named {name} already exists in storage "
                                    f"pool {pool.name()}", retryable=False)
        rec.volumes.append(vol.path())
        disk.set("type", "file")
        source.attrib.clear()
        source.set("file", vol.path())
        driver.set("type", "qcow2")
        for old in disk.findall("backingStore"):
            disk.remove(old)

    def _delete_volumes(self, conn: Any, paths: builtins.list[str]) -> None:
        for path in paths:
            try:
                conn.storageVolLookupByPath(path).delete(0)
            except self._lv.libvirtError as exc:
                if exc.get_error_code() != self._lv.VIR_ERR_NO_STORAGE_VOL:  # gone already: fine
                    raise

    # -- libvirt ---------------------------------------------------------------------------

    def _connection(self) -> Any:
        """The connection, opened again if it was lost (libvirtd restarted)."""
        with self._conn_lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except self._lv.libvirtError:
                    pass
                self._conn = None
            with self._errors(f"{self.name}: cannot connect to {self.uri}"):
                conn = self._lv.open(self.uri)
            # a host that stops answering fails the calls in ~20s, rather than a TCP timeout's
            # minutes; local drivers have no keepalive (1, or an error): nothing to do there
            with contextlib.suppress(self._lv.libvirtError):
                conn.setKeepAlive(5, 3)
            self._conn = conn
            return conn

    def _domain(self, conn: Any, machine_id: str) -> Any:
        """The domain of this id (a UUID), or None."""
        try:
            uuid.UUID(machine_id)
        except ValueError:
            return None
        try:
            return conn.lookupByUUIDString(machine_id)
        except self._lv.libvirtError as exc:
            if exc.get_error_code() == self._lv.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def _domain_named(self, conn: Any, name: str) -> Any:
        try:
            return conn.lookupByName(name)
        except self._lv.libvirtError as exc:
            if exc.get_error_code() == self._lv.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def _record(self, dom: Any, machine_id: str) -> _Record:
        rec = self._read(dom)
        if rec is None:
            raise MachineNotFound(machine_id, f"{self.name}: domain {dom.name()} ({machine_id}) "
                                  "is not one of this provider's machines")
        return rec

    def _read(self, dom: Any) -> _Record | None:
        """The domain's record (from its persistent configuration); None if it has none, or
        another provider's (two servers sharing a host give their providers different names)."""
        lv = self._lv
        try:
            text = dom.metadata(lv.VIR_DOMAIN_METADATA_ELEMENT, NS, lv.VIR_DOMAIN_AFFECT_CONFIG)
        except lv.libvirtError as exc:
            # none, or a transient domain (no persistent configuration): not one of ours
            if exc.get_error_code() in (lv.VIR_ERR_NO_DOMAIN_METADATA, lv.VIR_ERR_OPERATION_INVALID):
                return None
            raise
        try:
            rec = _Record.parse(text)
        except (ET.ParseError, KeyError, ValueError) as exc:
            raise ProviderError(f"{self.name}: the deskfleet metadata of domain {dom.name()} is "
                                f"malformed ({type(exc).__name__}: {exc})", retryable=False) from None
        return rec if rec.provider == self.name else None

    def _write(self, dom: Any, rec: _Record) -> None:
        """The record into the persistent configuration, which outlives shutdowns and is
        what :meth:`_read` reads — and into the live one while the domain runs, so that
        what ``virsh dumpxml`` shows agrees."""
        lv = self._lv
        old = self._clock() - KEEP
        rec.tokens = {t: (op, at) for t, (op, at) in rec.tokens.items() if at >= old}
        text = ET.tostring(rec.element(), encoding="unicode")
        flags = lv.VIR_DOMAIN_AFFECT_CONFIG
        if dom.isActive():
            flags |= lv.VIR_DOMAIN_AFFECT_LIVE
        try:
            dom.setMetadata(lv.VIR_DOMAIN_METADATA_ELEMENT, text, "deskfleet", NS, flags)
        except lv.libvirtError as exc:
            if not flags & lv.VIR_DOMAIN_AFFECT_LIVE or exc.get_error_code() != lv.VIR_ERR_OPERATION_INVALID:
                raise
            # it stopped meanwhile: its persistent configuration is all there is now
            dom.setMetadata(lv.VIR_DOMAIN_METADATA_ELEMENT, text, "deskfleet", NS, lv.VIR_DOMAIN_AFFECT_CONFIG)

    def _ours(self, conn: Any) -> Iterator[tuple[Any, _Record]]:
        for dom in conn.listAllDomains(0):
            try:
                rec = self._read(dom)
            except self._lv.libvirtError as exc:
                if exc.get_error_code() == self._lv.VIR_ERR_NO_DOMAIN:
                    continue  # undefined while we looked
                raise
            except ProviderError as exc:  # one domain's metadata, spoilt by hand: not the others'
                log.warning("%s", exc.message)
                continue
            if rec is not None:
                yield dom, rec

    def _boot(self, dom: Any, rec: _Record, where: str) -> None:
        """Start a new machine; a start libvirt refuses for good makes it ``failed``."""
        try:
            dom.create()
        except self._lv.libvirtError as exc:
            error = self._error(exc, where)
            if error.retryable:
                raise error from exc
            self._set(rec, S.FAILED, f"failed to start: {self._message(exc)}")
            log.warning("provider %s: %s %s", self.name, dom.name(), rec.detail,
                        extra={"machine": dom.name()})
        else:
            self._set(rec, S.RUNNING)
        self._write(dom, rec)

    def _set(self, rec: _Record, state: ProviderState, detail: str = "") -> None:
        rec.state, rec.since, rec.detail = state, self._clock(), detail

    # -- tokens ----------------------------------------------------------------------------

    def _used(self, conn: Any, token: str) -> tuple[str, str, Any] | None:
        """Who used this token: (machine id, operation, its domain — None if destroyed)."""
        for dom, rec in self._ours(conn):
            if token in rec.tokens:
                return dom.UUIDString(), rec.tokens[token][0], dom
        for mid, gone in list(self._gone.items()):  # a snapshot: other threads add to it
            if token in gone.tokens:
                return mid, gone.tokens[token][0], None
        return None

    def _known_token(self, conn: Any, token: str, op: str, machine_id: str,
                     mine: dict[str, tuple[str, float]]) -> bool:
        """Whether the token was used already — for this order, else it is refused."""
        if token in mine:
            self._check_reuse(token, mine[token][0], machine_id, op, machine_id)
            return True
        used = self._used(conn, token)
        if used is not None:
            self._check_reuse(token, used[1], used[0], op, machine_id)
        return False

    def _check_reuse(self, token: str, used_op: str, used_id: str, op: str, machine_id: str) -> None:
        """A token names one order; the same token on another order is a caller's bug."""
        if (used_op, used_id) != (op, machine_id):
            raise ProviderError(f"{self.name}: token {token!r} was used for {used_op} of "
                                f"{used_id}, not {op} of {machine_id}", retryable=False)

    def _prune(self) -> None:
        old = self._clock() - KEEP
        for mid, gone in list(self._gone.items()):
            if gone.machine.state_since < old:
                self._gone.pop(mid, None)
                with self._locks_lock:
                    self._locks.pop(mid, None)
                    self._locks.pop(f"name:{gone.machine.name}", None)

    # -- errors and locks ------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, where: str, machine_id: str | None = None) -> Iterator[None]:
        """libvirt's errors as ours, said where they happened."""
        try:
            yield
        except self._lv.libvirtError as exc:
            raise self._error(exc, where, machine_id) from exc

    def _error(self, exc: Any, where: str, machine_id: str | None = None) -> ProviderError:
        lv = self._lv
        code = exc.get_error_code()
        message = f"{where}: {self._message(exc)}"
        if code == lv.VIR_ERR_NO_DOMAIN and machine_id is not None:
            return MachineNotFound(machine_id, message)
        # the connection broke (libvirtd restarted, the network to the host failed)
        lost = code in (lv.VIR_ERR_NO_CONNECT, lv.VIR_ERR_INVALID_CONN, lv.VIR_ERR_RPC) or (
            exc.get_error_domain() in (lv.VIR_FROM_RPC, lv.VIR_FROM_REMOTE)
            and code in (lv.VIR_ERR_SYSTEM_ERROR, lv.VIR_ERR_INTERNAL_ERROR))
        if lost:
            with self._conn_lock:
                self._conn = None  # the next call connects again
        return ProviderError(message, retryable=lost or code in self._transient)

    @staticmethod
    def _message(exc: Any) -> str:
        text = " ".join(str(exc.get_error_message() or exc).split())
        return text if len(text) <= MESSAGE_LIMIT else text[:MESSAGE_LIMIT - 1] + "…"

    @contextlib.contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        with self._locks_lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            yield


def _copy(machine: ProviderMachine) -> ProviderMachine:
    return replace(machine, tags=dict(machine.tags))


def _binding(name: str) -> Any:
    """The ``libvirt`` module, imported when a provider is built: deskfleet runs without it."""
    try:
        import libvirt
    except ImportError:
        raise ConfigError(f"provider {name!r}: the libvirt provider needs libvirt's Python binding: "
                          "pip install 'deskfleet[libvirt]' (it builds against libvirt's headers: "
                          "apt-get install libvirt-dev pkg-config)") from None
    global _events
    with _events_lock:
        if not _events:
            # libvirt prints every error to stderr by default; ours are raised, and said once
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            # keepalive needs libvirt's event loop, running before a connection opens
            libvirt.virEventRegisterDefaultImpl()
            threading.Thread(target=_run_events, args=(libvirt,), name="libvirt-events",
                             daemon=True).start()
            _events = True
    return libvirt


_events = False
_events_lock = threading.Lock()


def _run_events(libvirt: Any) -> None:
    while True:
        if libvirt.virEventRunDefaultImpl() < 0:
            time.sleep(1.0)  # it failed (it says why on stderr): do not spin
