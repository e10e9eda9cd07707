"""A provider whose machines are EC2 instances, through boto3.

Each machine is one instance launched from a *launch template* — the AMI, instance type,
network, instance profile and user data are the template's business, so what a machine is
stays in the AWS account where its owners manage it, and deskfleet only says how many and
which. ``MachineSpec.image`` names another template (``NAME`` or ``lt-…``, optionally
``:VERSION``); without it the provider's default is used.

The instances' tags are the provider's memory, so that a new provider (after the server
restarted, or on another replica) knows everything the last one did: ``deskfleet:provider``
(which provider's it is — instances without it are never touched), ``deskfleet:name``,
``deskfleet:pool``, ``deskfleet:image``, ``deskfleet:token`` (the create token),
``deskfleet:last-<op>`` (the last token of each other operation), ``deskfleet:labels``
(JSON, for the instance's boot script), ``deskfleet:since``, ``deskfleet:stopped-as``,
and for the warm pool ``deskfleet:warm`` and ``deskfleet:claimed``.

Tokens: what is EC2's and what is ours
    RunInstances gets a ``ClientToken`` made from the provider's name and the token: EC2
    then launches at most one instance for it, for at least 24 hours after that instance
    terminates, and answers a different launch with the same token with
    ``IdempotentParameterMismatch`` — EC2's guarantee, which also covers the seconds in
    which a new instance's tags are not yet visible to DescribeTags. Ours, on top of it: a
    create looks for an instance tagged with its token first (EC2 reports terminated
    instances for about an hour; moto, which our tests run against, ignores ClientToken
    altogether), and a token this provider acted on is remembered in memory as well. The
    other operations record their token as ``deskfleet:last-<op>`` once they have acted: a
    repeat of the last token of each kind does nothing, and a token found on another order
    (another operation, another machine) is refused for good. Every operation but reboot
    is also idempotent by state (stopping a stopped instance is nothing), so an act whose
    token record was lost is harmless to repeat; a reboot is not.

The warm pool
    :meth:`EC2Provider.fill_warm_pool` launches instances for a pool that boot once and are
    stopped (hibernated with ``warm_hibernate``), tagged ``deskfleet:warm=true`` and no
    name; ``create`` takes a stopped one, when the pool has one made from the same
    template, names it and starts it — seconds instead of a launch and a first boot. Warm
    instances are not machines yet: ``list`` leaves them out, :meth:`EC2Provider.warm`
    shows them. With ``warm_size`` set, listing a pool also keeps its warm pool filled.

The fence
    ``power_off`` is StopInstances with ``Force=True``: EC2 stops the instance without
    waiting for its operating system to shut down — the closest EC2 has to pulling the
    plug. It returns once EC2 reports the instance stopped (or fails as retryable after
    ``fence_timeout``; the retry, with the same token, waits again).

Every boto3 call is blocking and runs in a thread (``asyncio.to_thread``); botocore's own
retries are off, since :class:`~deskfleet.providers.retry.Retrying` retries with the
caller's token, backoff and stats. boto3 is imported when a provider is built, so deskfleet
imports without it (``pip install 'deskfleet[ec2]'``); credentials come from boto3's usual
chain (environment, profile, instance role), never from deskfleet's settings.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import json
import logging
import re
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
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
T_PROVIDER = "deskfleet:provider"
T_NAME = "deskfleet:name"
T_POOL = "deskfleet:pool"
T_IMAGE = "deskfleet:image"
T_TOKEN = "deskfleet:token"
T_LAST = "deskfleet:last-"  # + the operation
T_LABELS = "deskfleet:labels"
T_WARM = "deskfleet:warm"
T_CLAIMED = "deskfleet:claimed"  # when a warm instance became this machine
T_SINCE = "deskfleet:since"  # when we last ordered a change of state
T_STOPPED_AS = "deskfleet:stopped-as"  # stop, hibernate or power-off: what the last stop was
#: tag keys a caller may not set: ours, and the ones AWS reserves
RESERVED = ("deskfleet:", "aws:")
STATES = {"pending": S.PROVISIONING, "running": S.RUNNING, "stopping": S.STOPPING,
          "stopped": S.STOPPED, "shutting-down": S.TERMINATING, "terminated": S.TERMINATED}
ALIVE = ("pending", "running", "stopping", "stopped")
#: EC2 error codes that a later try may not meet: throttling, capacity, EC2's own trouble,
#: and an instance between states (starting one that is still stopping)
RETRYABLE = frozenset({
    "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
    "InsufficientInstanceCapacity", "InsufficientHostCapacity", "InsufficientCapacity",
    "InsufficientReservedInstanceCapacity", "InternalError", "InternalFailure", "ServerInternal",
    "ServiceUnavailable", "Unavailable", "RequestTimeout", "IncorrectInstanceState", "IncorrectState",
})
NOT_FOUND = frozenset({"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"})
MESSAGE_LIMIT = 500
#: a token as it is in a tag and in a DescribeTags filter: no wildcard (* ?), no escape (\),
#: short enough for a tag value; other tokens are stored as their digest
_PLAIN = re.compile(r"^[A-Za-z0-9:._/@+=-]{1,200}$")
_TEMPLATE_ID = re.compile(r"^lt-[0-9a-f]{8,}$")
_REASON_TIME = re.compile(r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (?:GMT|UTC)\)")
_ACCESS_KEY = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
_ENCODED = re.compile(r"Encoded authorization failure message: \S+")
#: how many tokens acted on are remembered in memory (the tags remember them for good)
RECENT = 4096
#: how long EC2 may take to show a new instance or new tags (seconds; it is usually one or two)
FRESH = 60.0
NOT_A_TEMPLATE = "is not a launch template: write NAME or lt-ID, either optionally with :VERSION"


class EC2Provider(MachineProvider):
    """Machines that are EC2 instances launched from ``launch_template``; see the module
    docstring.

    ``region`` and ``endpoint_url`` (a VPC endpoint, or a test server) default to boto3's
    own configuration; ``session`` is a ``boto3.Session`` to take credentials from (by
    default boto3's usual chain). ``warm_size`` keeps that many stopped instances per pool
    (filled whenever the pool is listed), ``warm_hibernate`` hibernates them instead of
    stopping them, and ``warm_boot`` is how long a warm instance runs its first boot before
    it is stopped. ``timeout`` bounds each API call; ``fence_timeout`` how long
    ``power_off`` waits for the instance to be stopped, polling every ``poll`` seconds.
    """

    def __init__(
        self,
        launch_template: str,
        *,
        name: str = "ec2",
        region: str | None = None,
        endpoint_url: str | None = None,
        warm_size: int = 0,
        warm_hibernate: bool = False,
        warm_boot: float = 120.0,
        timeout: float = 30.0,
        fence_timeout: float = 300.0,
        poll: float = 2.0,
        session: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.capabilities = Capabilities(fence=True, hibernate=True, warm_pool=True)
        self.launch_template = launch_template.strip()
        if _template(self.launch_template) is None:
            raise ConfigError(f"provider {name!r}: {launch_template!r} {NOT_A_TEMPLATE}")
        if warm_size < 0:
            raise ConfigError(f"provider {name!r}: warm_size must be 0 or more, not {warm_size}")
        self.warm_size, self.warm_hibernate, self.warm_boot = warm_size, warm_hibernate, warm_boot
        self.fence_timeout, self.poll = fence_timeout, poll
        self._clock = clock
        try:
            import boto3
            from botocore.config import Config
            from botocore.exceptions import BotoCoreError
        except ImportError:
            raise ConfigError(f"provider {name!r}: the ec2 provider needs boto3, which is not "
                              "installed: pip install 'deskfleet[ec2]'") from None
        # one try a call: retrying is Retrying's, with the caller's token, jitter and stats
        config = Config(retries={"total_max_attempts": 1, "mode": "standard"},
                        connect_timeout=min(timeout, 10.0), read_timeout=timeout,
                        user_agent_extra="deskfleet")
        try:
            self.client: Any = (session or boto3.Session()).client(
                "ec2", region_name=region, endpoint_url=endpoint_url, config=config)
        except (BotoCoreError, ValueError) as exc:  # NoRegionError, a malformed endpoint…
            raise ConfigError(f"provider {name!r}: cannot make an EC2 client: {exc} (give a "
                              "region, or set AWS_REGION or a profile's region)") from None
        self._lock = threading.Lock()  # guards the two below, and claims of warm instances
        #: token → (operation, instance id) of the tokens acted on lately
        self._recent: OrderedDict[str, tuple[str, str]] = OrderedDict()
        #: instances this provider launched or claimed lately (id → time.monotonic()): EC2
        #: may take a moment to show a new instance, or a claimed one's tags
        self._fresh: dict[str, float] = {}
        #: pool → the template its last create used: the one its warm pool is kept filled from
        self._pool_images: dict[str, str] = {}

    @classmethod
    def from_spec(cls, spec: str, *, name: str) -> EC2Provider:
        """From the server's ``--provider NAME=ec2:TEMPLATE[?region=…&endpoint=…&warm=N&hibernate=yes]``."""
        template, _, query = spec.partition("?")
        try:
            settings = dict(urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
        except ValueError:
            raise ConfigError(f"provider {name!r}: cannot read {query!r}; write "
                              "ec2:TEMPLATE?region=eu-west-1&warm=2") from None
        known = ("region", "endpoint", "warm", "hibernate")
        if unknown := sorted(set(settings) - set(known)):
            raise ConfigError(f"provider {name!r}: unknown setting {', '.join(unknown)}; ec2 takes "
                              f"{', '.join(known)} (credentials come from the environment, a profile "
                              "or an instance role, never from here)")
        warm = settings.get("warm", "0")
        hibernate = settings.get("hibernate", "no").lower()
        if not warm.isdigit():
            raise ConfigError(f"provider {name!r}: warm={warm!r} is not a number of instances")
        if hibernate not in ("yes", "no", "true", "false", "1", "0"):
            raise ConfigError(f"provider {name!r}: hibernate={hibernate!r}: write yes or no")
        return cls(template, name=name, region=settings.get("region") or None,
                   endpoint_url=settings.get("endpoint") or None, warm_size=int(warm),
                   warm_hibernate=hibernate in ("yes", "true", "1"))

    # -- the provider ----------------------------------------------------------------------

    async def create(self, spec: MachineSpec, *, token: str) -> ProviderMachine:
        return await asyncio.to_thread(self._create, spec, token)

    async def start(self, machine_id: str, *, token: str) -> None:
        def act(inst: dict[str, Any], state: str) -> dict[str, str]:
            if state in ("shutting-down", "terminated"):
                raise self._cannot("start", machine_id, state)
            if state in ("pending", "running"):
                return {}
            self._call("start", machine_id, "start_instances", InstanceIds=[machine_id])
            return {T_SINCE: self._now(), T_STOPPED_AS: ""}

        await asyncio.to_thread(self._mutate, "start", machine_id, token, act)

    async def stop(self, machine_id: str, *, token: str, hibernate: bool = False) -> None:
        def act(inst: dict[str, Any], state: str) -> dict[str, str]:
            if state in ("shutting-down", "terminated"):
                raise self._cannot("stop", machine_id, state)
            if state in ("stopping", "stopped"):
                return {}
            # EC2 can hibernate only an instance launched with hibernation configured; say
            # so plainly rather than with EC2's error (moto does not report it: {} goes ahead)
            if hibernate and (inst.get("HibernationOptions") or {}).get("Configured") is False:
                raise ProviderError(f"{self.name}: cannot hibernate {machine_id}: it was not launched "
                                    "with hibernation configured (set HibernationOptions Configured=true "
                                    "in its launch template)", retryable=False)
            self._call("stop", machine_id, "stop_instances", InstanceIds=[machine_id], Hibernate=hibernate)
            return {T_SINCE: self._now(), T_STOPPED_AS: "hibernate" if hibernate else "stop"}

        await asyncio.to_thread(self._mutate, "stop", machine_id, token, act)

    async def reboot(self, machine_id: str, *, token: str) -> None:
        def act(inst: dict[str, Any], state: str) -> dict[str, str]:
            if state not in ("pending", "running"):
                raise self._cannot("reboot", machine_id, state)
            self._call("reboot", machine_id, "reboot_instances", InstanceIds=[machine_id])
            return {}

        await asyncio.to_thread(self._mutate, "reboot", machine_id, token, act)

    async def power_off(self, machine_id: str, *, token: str) -> None:
        def act(inst: dict[str, Any], state: str) -> dict[str, str]:
            if state in ("stopped", "shutting-down", "terminated"):
                return {}  # already without power: the fence holds
            # also when it is stopping: a forced stop ends a graceful one that hangs
            self._call("power_off", machine_id, "stop_instances", InstanceIds=[machine_id], Force=True)
            return {T_SINCE: self._now(), T_STOPPED_AS: "power-off"}

        await asyncio.to_thread(self._mutate, "power_off", machine_id, token, act)
        # the fence holds once the instance is down, not when EC2 accepted the order; a
        # repeat of the token (which does not act again) waits here all the same
        deadline = time.monotonic() + self.fence_timeout
        while True:
            state = (await asyncio.to_thread(self._instance, "power_off", machine_id))["State"]["Name"]
            if state in ("stopped", "shutting-down", "terminated"):
                return
            if time.monotonic() >= deadline:
                raise ProviderError(f"{self.name}: power_off of {machine_id}: EC2 still reports it "
                                    f"{state} {self.fence_timeout:g}s after the forced stop", retryable=True)
            await asyncio.sleep(self.poll)

    async def destroy(self, machine_id: str, *, token: str) -> None:
        def act(inst: dict[str, Any], state: str) -> dict[str, str] | None:
            if state in ("shutting-down", "terminated"):
                return None  # gone or going: nothing to do, and nothing to tag
            self._call("destroy", machine_id, "terminate_instances", InstanceIds=[machine_id])
            return {T_SINCE: self._now()}

        await asyncio.to_thread(self._mutate, "destroy", machine_id, token, act)

    async def tag(self, machine_id: str, tags: dict[str, str], *, token: str) -> None:
        _check_tags(self.name, tags)
        # the tags and the token in one CreateTags: both or neither
        await asyncio.to_thread(self._mutate, "tag", machine_id, token, lambda inst, state: dict(tags))

    async def get(self, machine_id: str) -> ProviderMachine:
        return self._view(await asyncio.to_thread(self._instance, "get", machine_id))

    async def list(self, *, pool: str | None = None) -> builtins.list[ProviderMachine]:
        return await asyncio.to_thread(self._list, pool)

    # -- the warm pool ---------------------------------------------------------------------

    async def fill_warm_pool(self, pool: str, count: int, *,
                             image: str | None = None) -> builtins.list[ProviderMachine]:
        """Bring ``pool``'s warm pool (of instances from ``image``, else the default
        template) towards ``count`` instances: launch what is missing, stop (or hibernate)
        those that have run their first boot for ``warm_boot`` seconds. Returns the warm
        instances — ``stopped`` ones are ready. It never shrinks a warm pool (destroy the
        extra instances), and converges: call it again until all are stopped."""
        template = self._template_of(image, f"fill_warm_pool of {pool}")
        return [self._view(i) for i in await asyncio.to_thread(self._fill, pool, count, template, None)]

    async def warm(self, pool: str, *, image: str | None = None) -> builtins.list[ProviderMachine]:
        """``pool``'s warm instances (from ``image``, else the default template): those
        ``stopped`` are ready for ``create`` to take."""
        template = self._template_of(image, f"warm of {pool}")
        return [self._view(i) for i in await asyncio.to_thread(self._warm_instances, "warm", pool, template)]

    # -- the machinery (blocking: each runs in a thread) -----------------------------------

    def _create(self, spec: MachineSpec, token: str) -> ProviderMachine:
        _check_tags(self.name, spec.tags)
        template = self._template_of(spec.image, f"create of {spec.name}")
        for key, instance_id, inst in self._token_uses("create", token):
            tags = _tags(inst)
            if key != T_TOKEN or (tags.get(T_NAME), tags.get(T_POOL)) != (spec.name, spec.pool):
                raise self._reused(token, _op_of(key), instance_id, "create", spec.name)
            self._remember(token, "create", instance_id)
            return self._view(inst)
        inst = self._claim_warm(spec, template, token) or self._launch(spec, template, token)
        self._remember(token, "create", inst["InstanceId"])
        self._pool_images[spec.pool] = template
        return self._view(inst)

    def _machine_tags(self, spec: MachineSpec, template: str, token: str) -> dict[str, str]:
        tags = {**spec.tags, T_PROVIDER: self.name, T_NAME: spec.name, T_POOL: spec.pool,
                T_IMAGE: template, T_TOKEN: _tag_token(token)}
        if spec.labels:
            tags[T_LABELS] = json.dumps(spec.labels, sort_keys=True, separators=(",", ":"))
            if len(tags[T_LABELS]) > 256:
                raise ProviderError(f"{self.name}: create of {spec.name}: its labels take more than "
                                    "the 256 characters of an EC2 tag value", retryable=False)
        return tags

    def _launch(self, spec: MachineSpec, template: str, token: str) -> dict[str, Any]:
        # nothing in this request may change between tries (no clock): EC2 compares a
        # repeated ClientToken's request with the first one
        tags = self._machine_tags(spec, template, token)
        answer = self._call("create", None, "run_instances", what=spec.name, template=template,
                            LaunchTemplate=_template(template), MinCount=1, MaxCount=1,
                            ClientToken=self._client_token(token),
                            TagSpecifications=[{"ResourceType": "instance", "Tags": _tag_list(tags)}])
        inst: dict[str, Any] = answer["Instances"][0]
        inst["Tags"] = _tag_list({**_tags(inst), **tags})  # the answer may lack them
        with self._lock:
            self._fresh[inst["InstanceId"]] = time.monotonic()
        log.info("provider %s: launched %s as %s (pool %s, template %s)", self.name, spec.name,
                 inst["InstanceId"], spec.pool, template, extra={"machine": spec.name})
        return inst

    def _claim_warm(self, spec: MachineSpec, template: str, token: str) -> dict[str, Any] | None:
        """A stopped warm instance of the pool, named, tagged and started; None if none."""
        with self._lock:  # two creates in this provider never take the same one
            ready = [i for i in self._warm_instances("create", spec.pool, template)
                     if i["State"]["Name"] == "stopped" and i["InstanceId"] not in self._fresh]
            if not ready:
                return None
            inst = min(ready, key=lambda i: (_epoch(i.get("LaunchTime")), i["InstanceId"]))
            instance_id = inst["InstanceId"]
            now = self._now()
            tags = {**self._machine_tags(spec, template, token), T_CLAIMED: now, T_SINCE: now,
                    T_STOPPED_AS: ""}
            self._call("create", instance_id, "create_tags", Resources=[instance_id], Tags=_tag_list(tags))
            self._fresh[instance_id] = time.monotonic()
        try:
            self._call("create", instance_id, "delete_tags", Resources=[instance_id], Tags=[{"Key": T_WARM}])
            self._call("create", instance_id, "start_instances", InstanceIds=[instance_id])
        except ProviderError:
            # back to the warm pool, so that the retry does not find a named, stopped machine
            # by its token; if even that fails, the pool controller's boot timeout ends it
            try:
                self._call("create", instance_id, "create_tags", Resources=[instance_id],
                           Tags=_tag_list({T_WARM: "true"}))
                self._call("create", instance_id, "delete_tags", Resources=[instance_id],
                           Tags=[{"Key": k} for k in tags if k not in (T_PROVIDER, T_POOL, T_IMAGE)])
                with self._lock:
                    self._fresh.pop(instance_id, None)
            except ProviderError as exc:
                log.warning("provider %s: could not return %s to the warm pool: %s", self.name,
                            instance_id, exc.message, extra={"machine": spec.name})
            raise
        log.info("provider %s: took warm instance %s as %s (pool %s)", self.name, instance_id,
                 spec.name, spec.pool, extra={"machine": spec.name})
        inst["Tags"] = _tag_list({k: v for k, v in {**_tags(inst), **tags}.items() if k != T_WARM})
        inst["State"] = {"Name": "pending"}
        return inst

    def _warm_instances(self, op: str, pool: str, template: str) -> builtins.list[dict[str, Any]]:
        return self._describe(op, {T_PROVIDER: self.name, T_POOL: pool, T_IMAGE: template, T_WARM: "true"},
                              states=ALIVE)

    def _fill(self, pool: str, count: int, template: str,
              warm: builtins.list[dict[str, Any]] | None) -> builtins.list[dict[str, Any]]:
        if warm is None:
            warm = self._warm_instances("warm", pool, template)
        if (missing := count - len(warm)) > 0:
            tags = {T_PROVIDER: self.name, T_POOL: pool, T_IMAGE: template, T_WARM: "true"}
            self._call("warm", None, "run_instances", what=f"the warm pool of {pool}", template=template,
                       LaunchTemplate=_template(template), MinCount=missing, MaxCount=missing,
                       TagSpecifications=[{"ResourceType": "instance", "Tags": _tag_list(tags)}])
            log.info("provider %s: launched %d warm instance(s) for pool %s", self.name, missing, pool)
            warm = self._warm_instances("warm", pool, template)
        now = self._now_float()
        booted = [i["InstanceId"] for i in warm if i["State"]["Name"] == "running"
                  and now - _epoch(i.get("LaunchTime")) >= self.warm_boot]
        if booted:
            self._call("warm", None, "stop_instances", InstanceIds=booted, Hibernate=self.warm_hibernate)
            self._call("warm", None, "create_tags", Resources=booted, Tags=_tag_list({
                T_SINCE: self._now(), T_STOPPED_AS: "hibernate" if self.warm_hibernate else "stop"}))
            warm = self._warm_instances("warm", pool, template)
        return warm

    def _list(self, pool: str | None) -> builtins.list[ProviderMachine]:
        found = self._describe("list", {T_PROVIDER: self.name, **({T_POOL: pool} if pool is not None else {})})
        machines = [i for i in found if _tags(i).get(T_WARM) != "true"]
        if pool is not None and self.warm_size:
            template = self._pool_images.get(pool, self.launch_template)
            warm = [i for i in found if _tags(i).get(T_WARM) == "true" and _tags(i).get(T_IMAGE) == template
                    and i["State"]["Name"] in ALIVE]
            try:  # upkeep: a failure here must not fail the listing
                self._fill(pool, self.warm_size, template, warm)
            except ProviderError as exc:
                log.warning("provider %s: cannot keep the warm pool of %s: %s", self.name, pool, exc.message)
        return [self._view(i) for i in machines]

    def _mutate(self, op: str, machine_id: str, token: str,
                act: Callable[[dict[str, Any], str], dict[str, str] | None]) -> None:
        """One change, at most once per token: ``act`` does it (or finds nothing to do) and
        returns the tags to record with the token — None: record nothing."""
        for key, instance_id, _ in self._token_uses(op, token):
            if key == T_LAST + op and instance_id == machine_id:
                self._remember(token, op, machine_id)
                return
            raise self._reused(token, _op_of(key), instance_id, op, machine_id)
        inst = self._instance(op, machine_id)
        tags = act(inst, inst["State"]["Name"])
        if tags is not None:
            # after the act: a record without the act would answer a retry "done"
            self._call(op, machine_id, "create_tags", Resources=[machine_id],
                       Tags=_tag_list({**tags, T_LAST + op: _tag_token(token)}))
        self._remember(token, op, machine_id)

    def _token_uses(self, op: str, token: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """Where this provider used ``token``: (tag key, instance id, the instance)."""
        with self._lock:
            recent = self._recent.get(token)
        if recent is not None:  # acted on moments ago: the tags may not show it yet
            used_op, instance_id = recent
            yield (T_TOKEN if used_op == "create" else T_LAST + used_op), instance_id, \
                self._instance(op, instance_id)
            return
        value = _tag_token(token)
        answer = self._call(op, None, "describe_tags", Filters=[
            {"Name": "resource-type", "Values": ["instance"]}, {"Name": "value", "Values": [value]}])
        keys = {t["ResourceId"]: t["Key"] for t in answer.get("Tags", [])
                if t.get("Value") == value and (t["Key"] == T_TOKEN or t["Key"].startswith(T_LAST))}
        if keys:  # a filter, not InstanceIds: one instance gone must not fail the lookup
            for inst in self._describe(op, {T_PROVIDER: self.name}, among=sorted(keys)):
                yield keys[inst["InstanceId"]], inst["InstanceId"], inst

    def _instance(self, op: str, machine_id: str) -> dict[str, Any]:
        try:
            found = self._describe(op, {}, ids=[machine_id], machine=machine_id)
        except MachineNotFound:
            with self._lock:
                fresh = time.monotonic() - self._fresh.get(machine_id, float("-inf")) < FRESH
            if fresh:  # launched here moments ago: EC2 has not caught up yet
                raise ProviderError(f"{self.name}: {op} of {machine_id}: EC2 does not show the "
                                    "instance yet", retryable=True) from None
            raise
        if not found:
            raise MachineNotFound(machine_id, f"{self.name}: no instance {machine_id!r} in "
                                              f"{self.client.meta.region_name}")
        if _tags(found[0]).get(T_PROVIDER) != self.name:
            raise MachineNotFound(machine_id, f"{self.name}: {machine_id} is not one of this provider's "
                                              f"machines (it has no tag {T_PROVIDER}={self.name})")
        return found[0]

    def _describe(self, op: str, tags: dict[str, str], *, ids: builtins.list[str] | None = None,
                  among: builtins.list[str] | None = None, states: tuple[str, ...] | None = None,
                  machine: str | None = None) -> builtins.list[dict[str, Any]]:
        """The instances with these tags (and ``ids``: an unknown one is an error; ``among``:
        it is not; ``states``: in one of them)."""
        filters = [{"Name": f"tag:{k}", "Values": [_literal(v)]} for k, v in tags.items()]
        if states:
            filters.append({"Name": "instance-state-name", "Values": list(states)})
        if among:
            filters.append({"Name": "instance-id", "Values": among})
        params: dict[str, Any] = {"Filters": filters}
        if ids:
            params["InstanceIds"] = ids
        else:
            params["MaxResults"] = 500
        found: builtins.list[dict[str, Any]] = []
        while True:
            page = self._call(op, machine, "describe_instances", **params)
            found += [i for r in page.get("Reservations", []) for i in r.get("Instances", [])]
            if not page.get("NextToken"):
                return found
            params["NextToken"] = page["NextToken"]

    def _call(self, op: str, machine: str | None, method: str, *, what: str | None = None,
              template: str | None = None, **params: Any) -> dict[str, Any]:
        """One EC2 call; botocore's errors become ours, with a message that says what to do."""
        from botocore.exceptions import BotoCoreError, ClientError
        from botocore.parsers import ResponseParserError

        where = f"{self.name}: {op}" + (f" of {what or machine}" if what or machine else "")
        try:
            answer: dict[str, Any] = getattr(self.client, method)(**params)
            return answer
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code, message = str(error.get("Code", "")), str(error.get("Message", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in NOT_FOUND and machine is not None:
                raise MachineNotFound(machine, f"{where}: {_clean(message) or 'no such instance'}") from exc
            hint = ""
            if code.startswith("InvalidLaunchTemplate") and template is not None:
                hint = (f" — no launch template {template!r} in {self.client.meta.region_name}: create "
                        "it, or correct the provider's launch template (or the pool's image)")
            elif code == "IdempotentParameterMismatch":
                hint = " — this token was used for another launch: a bug in the caller"
            elif code.startswith("Unauthorized") or code in ("AuthFailure", "InvalidClientTokenId"):
                hint = (" — the server's AWS identity may not do this, or its credentials are wrong "
                        "(docs/providers.md lists the permissions)")
            raise ProviderError(_clip(f"{where}: {code}: {_clean(message)}{hint}"),
                                retryable=code in RETRYABLE or status >= 500) from exc
        except (BotoCoreError, ResponseParserError) as exc:
            raise _botocore_error(where, exc) from exc

    def _view(self, inst: dict[str, Any]) -> ProviderMachine:
        tags = _tags(inst)
        ec2_state = inst["State"]["Name"]
        state = STATES.get(ec2_state, S.FAILED)
        launched = _epoch(inst.get("LaunchTime")) or self._now_float()
        # EC2 moves LaunchTime at every start: a volume's attachment says when it was made,
        # and a warm instance became this machine when it was claimed
        created = _number(tags.get(T_CLAIMED)) or _root_attached(inst) or launched
        # the latest of: our last order, and what EC2 says of the state it is in
        since = [_number(tags.get(T_SINCE)), launched if ec2_state in ("pending", "running")
                 else _reason_time(inst.get("StateTransitionReason") or "")]
        reason = inst.get("StateReason") or {}
        detail = "" if state in STATES.values() else f"EC2 reports the state {ec2_state!r}"
        if state in (S.STOPPING, S.STOPPED):
            stopped_as = tags.get(T_STOPPED_AS)
            if stopped_as == "hibernate" or reason.get("Code") == "Client.UserInitiatedHibernate":
                detail = "hibernated"
            elif stopped_as == "power-off":
                detail = "powered off (forced stop)"
            elif not stopped_as and reason.get("Code") not in (None, "", "Client.UserInitiatedShutdown"):
                detail = str(reason.get("Message", ""))
        elif state in (S.TERMINATING, S.TERMINATED) and reason.get("Code") not in (
                None, "", "Client.UserInitiatedShutdown"):
            detail = str(reason.get("Message", ""))  # e.g. a launch that failed for want of capacity
        if tags.get(T_WARM) == "true":
            detail = f"warm, {detail}" if detail else "warm"
        return ProviderMachine(
            id=inst["InstanceId"], name=tags.get(T_NAME, ""), pool=tags.get(T_POOL, ""), state=state,
            tags={k: v for k, v in tags.items() if not k.startswith(RESERVED)},
            created_at=created, state_since=max([t for t in since if t] or [launched]), detail=detail,
            address=inst.get("PrivateIpAddress") or inst.get("PublicIpAddress"))

    def _client_token(self, token: str) -> str:
        # up to 64 ASCII characters; the provider's name in it, so that two providers in one
        # account never share a launch
        return hashlib.sha256(f"{self.name}\n{token}".encode()).hexdigest()

    def _remember(self, token: str, op: str, machine_id: str) -> None:
        with self._lock:
            self._recent[token] = (op, machine_id)
            self._recent.move_to_end(token)
            while len(self._recent) > RECENT:
                self._recent.popitem(last=False)
            horizon = time.monotonic() - FRESH
            for instance_id in [i for i, at in self._fresh.items() if at < horizon]:
                del self._fresh[instance_id]

    def _reused(self, token: str, used_op: str, used_id: str, op: str, machine: str) -> ProviderError:
        """A token names one order; the same token on another is a caller's bug that would
        otherwise be answered "done" without acting."""
        return ProviderError(f"{self.name}: token {token!r} was used for {used_op} of {used_id}, "
                             f"not {op} of {machine}", retryable=False)

    def _cannot(self, op: str, machine_id: str, state: str) -> ProviderError:
        return ProviderError(f"{self.name}: cannot {op} {machine_id}, it is {STATES.get(state, state)}",
                             retryable=False)

    def _template_of(self, image: str | None, where: str) -> str:
        template = image or self.launch_template
        if _template(template) is None:
            raise ProviderError(f"{self.name}: {where}: the image {image!r} {NOT_A_TEMPLATE}", retryable=False)
        return template

    def _now_float(self) -> float:
        return float(self._clock())

    def _now(self) -> str:
        return f"{self._clock():.3f}"


def _template(image: str) -> dict[str, str] | None:
    """``NAME[:VERSION]`` or ``lt-…[:VERSION]`` as RunInstances' LaunchTemplate; None if it
    is neither."""
    ref, colon, version = image.partition(":")  # a template's name has no colon
    if not ref or (colon and not version):
        return None
    spec = {"LaunchTemplateId": ref} if _TEMPLATE_ID.match(ref) else {"LaunchTemplateName": ref}
    if version:
        spec["Version"] = version
    return spec


def _check_tags(provider: str, tags: dict[str, str]) -> None:
    if reserved := sorted(k for k in tags if k.startswith(RESERVED)):
        raise ProviderError(f"{provider}: tags {', '.join(reserved)}: keys beginning with "
                            f"{' or '.join(RESERVED)} are reserved", retryable=False)


def _tag_token(token: str) -> str:
    return token if _PLAIN.match(token) else "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def _op_of(key: str) -> str:
    return "create" if key == T_TOKEN else key.removeprefix(T_LAST)


def _tags(inst: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t.get("Value", "") for t in inst.get("Tags") or []}


def _tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def _literal(value: str) -> str:
    """A filter value matched as it is: EC2 reads * and ? as wildcards."""
    return value.replace("\\", "\\\\").replace("*", "\\*").replace("?", "\\?")


def _epoch(value: object) -> float:
    return value.timestamp() if isinstance(value, datetime) else 0.0


def _number(value: str | None) -> float:
    try:
        return float(value) if value else 0.0
    except ValueError:
        return 0.0


def _root_attached(inst: dict[str, Any]) -> float:
    for device in inst.get("BlockDeviceMappings") or []:
        if device.get("DeviceName") == inst.get("RootDeviceName"):
            return _epoch((device.get("Ebs") or {}).get("AttachTime"))
    return 0.0


def _reason_time(reason: str) -> float:
    """The time in EC2's "User initiated (2024-06-10 12:34:56 GMT)"; 0 if none."""
    found = _REASON_TIME.search(reason)
    if not found:
        return 0.0
    return datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()


def _clean(message: str) -> str:
    """EC2's message without what does not belong in a log: access key ids, and the
    encoded (and long) authorization failure blob."""
    message = _ENCODED.sub("Encoded authorization failure message: … (aws sts "
                           "decode-authorization-message decodes it)", message)
    return _ACCESS_KEY.sub("<access key id>", message)


def _clip(text: str) -> str:
    return text if len(text) <= MESSAGE_LIMIT else text[:MESSAGE_LIMIT - 1] + "…"


def _botocore_error(where: str, exc: Exception) -> ProviderError:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError, NoCredentialsError, PartialCredentialsError
    from botocore.parsers import ResponseParserError

    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return ProviderError(f"{where}: no usable AWS credentials: give the server some the usual "
                             "way (AWS_PROFILE, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in its "
                             "environment, or an instance role)", retryable=False)
    # the network, or an answer garbled on its way (a proxy's error page): try again
    retryable = isinstance(exc, BotoConnectionError | HTTPClientError | ResponseParserError)
    return ProviderError(_clip(f"{where}: {type(exc).__name__}: {_clean(str(exc))}"), retryable=retryable)
