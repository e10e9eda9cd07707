"""``pack.toml``: what a pack says about itself, validated with one clear line per problem.

    [pack]
    name = "acme-erp"                # unique among the packs an agent loads
    version = "1.0.0"
    description = "Acme ERP (Qt): orders and customers"
    module = "acme_erp"              # playbooks, probe and automations (a .py file or a package)
    model = "model"                  # the app model directory (deskfleet model capture writes it)
    requires = ["requests>=2.31"]    # Python packages an agent installs beside the pack (pip), if any

    [app]                            # how to start, find and stop the application
    command = ["acme-erp", "--profile", "{data}/profile"]
    env = { QT_QPA_PLATFORM = "xcb" }
    screen = [1024, 768]             # the screen size the app (and its model) expects
    process = "acme-erp"             # find it already running: a regex on its command line
    window = "^Acme ERP"             # … or on the title of one of its top-level windows
    start_timeout = 30
    stop_grace = 3

    [states]                         # what pre-flight does on each screen state of the model
    ready = ["orders"]
    signed_out = ["login"]           # screens that mean nobody is logged in
    recover = { login = "login", error = "dismiss", order_form = "cancel_form" }
    unknown = "wait"                 # a screen no state matches (default: the built-in "wait")
    unresponsive = "restart_app"     # a ready screen on an app that does not respond
    no_screen = "restart_desktop"    # the screen cannot be captured at all
    covered = "uncover"              # a window the model does not account for lies over the app
    logout = "logout"                # ends the session, to log in as another account
    settle = 0.3                     # seconds a state must hold before pre-flight acts on it

    [accounts]
    login = true                     # reaching "ready" takes an account of this pack from the vault

    [session]
    idle_timeout = 900               # the app logs out after this many idle seconds
    keepalive = "keepalive"          # a playbook an idle machine runs before that happens
    keepalive_margin = 60            # … this many seconds before

    [robot]                          # Robot Framework robots as automations (docs/robot-framework.md)
    suites = "robots"                # each .robot file in this directory is an automation
    timeout = 600                    # seconds a robot may run before its processes are killed

    [[robot.automations]]            # … or one entry per automation, for what discovery cannot say
    file = "robots/orders.robot"
    task = "Create Order"            # one task of the file (default: all of them)
    name = "acme.create_order"       # default: the pack's name, a dot, the task's (or file's) name
    input = { type = "object", required = ["customer"], properties = { customer = { type = "string" } } }
    secrets = ["password"]           # input fields that are secrets: encrypted at rest, never shown

Command placeholders: ``{python}`` (this Python), ``{pack}`` (the pack's directory),
``{data}`` (the agent's data directory for this app, created), ``{machine}`` (the machine's
name), ``{display}`` (its X display, or empty); ``stop_command`` may also use ``{pid}``.
"""

from __future__ import annotations

import re
import tomllib
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from ..errors import ConfigError

NAME = r"^[a-z0-9][a-z0-9._-]*$"
#: placeholders a command, its environment and working directory may use
PLACEHOLDERS = ("python", "pack", "data", "machine", "display")
Seconds = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PackSection(_Section):
    name: str = Field(pattern=NAME, max_length=64)
    version: str = Field(min_length=1, max_length=64)
    description: str = ""
    module: str = Field(default="", description="the Python module of playbooks and automations")
    model: str = "model"
    #: Python requirements (pip's syntax) an agent installs into the pack version's own
    #: environment when the pack is rolled out to it (docs/packs-rollout.md)
    requires: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(default_factory=list, max_length=100)


class AppSection(_Section):
    command: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str = ""
    screen: tuple[Annotated[int, Field(ge=64, le=16384)], Annotated[int, Field(ge=64, le=16384)]] | None = None
    process: str = ""
    window: str = ""
    start_timeout: Seconds = 30.0
    stop_grace: Seconds = 3.0
    stop_command: list[str] = Field(default_factory=list)

    @field_validator("process", "window")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @field_validator("command", "stop_command")
    @classmethod
    def _placeholders(cls, value: list[str], info: ValidationInfo) -> list[str]:
        known = (*PLACEHOLDERS, "pid") if info.field_name == "stop_command" else PLACEHOLDERS
        for part in value:
            for name in re.findall(r"\{([^{}]*)\}", part):
                if name not in known:
                    raise ValueError(f"unknown placeholder {{{name}}} in {part!r} "
                                     f"(known: {', '.join('{' + p + '}' for p in known)})")
        return value


class StatesSection(_Section):
    ready: list[str] = Field(min_length=1)
    signed_out: list[str] = Field(default_factory=list)
    recover: dict[str, str] = Field(default_factory=dict)
    unknown: str = "wait"
    unresponsive: str = "restart_app"
    no_screen: str = "restart_desktop"
    covered: str = "uncover"
    wrong_screen: str = ""
    logout: str = ""
    settle: Annotated[float, Field(ge=0, le=30)] = 0.3
    settle_frames: Annotated[int, Field(ge=1, le=50)] = 2


class AccountsSection(_Section):
    login: bool = False
    #: with accounts kept by the agent itself (embedders, tests): the one to log in as when a
    #: run names none. Agents of a fleet get their account from the orchestrator's vault.
    default: str = ""


class SessionSection(_Section):
    idle_timeout: Seconds | None = None
    keepalive: str = ""
    keepalive_margin: Seconds = 30.0
    #: the app counts pointer motion as activity (its idle clock restarts on a mere move), not
    #: only clicks and keys: the machine's session note then lapses as late as the app's does
    pointer_counts: bool = False


class HooksSection(_Section):
    """``module:callable`` references for what only some packs have."""

    sim: str = Field(default="", description="makes simulated desktops of the app (--desktop sim)")
    demo: str = Field(default="", description="the pack's demo: workload, faults, effect checks")
    accounts: str = Field(default="", description="the demo's and tests' accounts: (seed) -> {name: Credential}")
    update: str = Field(default="", description=(
        "the machine's OS update, run by its agent for a rolling maintenance with update 'pack': "
        "(UpdateContext) -> None, async or not; raises to fail"))

    @field_validator("sim", "demo", "accounts", "update")
    @classmethod
    def _reference(cls, value: str) -> str:
        if value and not re.fullmatch(r"([A-Za-z_][\w.]*)?:[A-Za-z_]\w*", value):
            raise ValueError(f"{value!r} is not module:callable (or :callable, in the pack's module)")
        return value


def _inside_pack(value: str) -> str:
    if value.startswith(("/", "\\")) or ".." in value.replace("\\", "/").split("/") or ":" in value[:2]:
        raise ValueError(f"{value!r}: give a path inside the pack, relative to its directory")
    return value


class RobotAutomation(_Section):
    """One Robot Framework robot offered as an automation: a file (or a directory of suite
    files), optionally one task of it."""

    file: str = Field(min_length=1, description="a .robot file, or a directory of them, in the pack")
    task: str = Field(default="", description="the one task (or test) to run; default: all of them")
    name: str = Field(default="", pattern=r"^$|^[A-Za-z0-9][A-Za-z0-9._:/-]*$", max_length=200)
    version: str = Field(default="", max_length=64, description="default: [robot] version")
    description: str = ""
    #: the input's JSON schema: a table here, or the path of a .json file in the pack;
    #: default: any object (each top-level key becomes a robot variable)
    input: dict[str, Any] | str | None = None
    secrets: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(default_factory=list)
    idempotent: bool | None = None
    required_state: str = ""
    timeout: Seconds | None = None

    @field_validator("file")
    @classmethod
    def _file_inside(cls, value: str) -> str:
        return _inside_pack(value)

    @field_validator("input")
    @classmethod
    def _schema_inside(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | str | None:
        return _inside_pack(value) if isinstance(value, str) else value


class RobotSection(_Section):
    """Robot Framework robots the pack offers as automations; the keys outside
    ``automations`` are the defaults of every robot."""

    suites: str = Field(default="", description="a directory whose .robot files are each an automation")
    automations: list[RobotAutomation] = Field(default_factory=list, max_length=500)
    version: str = Field(default="1", min_length=1, max_length=64)
    idempotent: bool = False
    required_state: str = "ready"
    timeout: Seconds | None = None
    #: seconds between asking a stopped robot to stop (its teardowns run) and killing its processes
    stop_grace: Seconds = 3.0

    @field_validator("suites")
    @classmethod
    def _suites_inside(cls, value: str) -> str:
        return _inside_pack(value) if value else value

    @property
    def declared(self) -> bool:
        return bool(self.suites or self.automations)


class Manifest(_Section):
    pack: PackSection
    app: AppSection = Field(default_factory=AppSection)
    states: StatesSection
    accounts: AccountsSection = Field(default_factory=AccountsSection)
    session: SessionSection = Field(default_factory=SessionSection)
    hooks: HooksSection = Field(default_factory=HooksSection)
    robot: RobotSection = Field(default_factory=RobotSection)


def parse_manifest(text: str, where: str) -> Manifest:
    """The manifest in ``text`` (read from ``where``); ConfigError with every problem, one per line."""
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("\n".join(f"{where}: {problem}" for problem in _problems(exc))) from None


def _problems(exc: ValidationError) -> list[str]:
    out = []
    for error in exc.errors(include_url=False):
        loc = [str(p) for p in error["loc"]]
        where = f"[{loc[0]}]" + (f" {'.'.join(loc[1:])}" if len(loc) > 1 else "") if loc else "the file"
        kind = error["type"]
        if kind == "missing":
            out.append(f"{where}: missing (required)")
        elif kind == "extra_forbidden":
            doc = "docs/robot-framework.md" if loc and loc[0] == "robot" else "docs/your-app.md"
            out.append(f"{where}: unknown key (a typo? see the keys in {doc})")
        elif kind == "string_pattern_mismatch" and error.get("ctx", {}).get("pattern") == NAME:
            out.append(f"{where}: {error.get('input')!r} is not a name: lower-case letters, digits, '.', '_' "
                       "and '-', starting with a letter or digit")
        else:
            msg = str(error["msg"]).removeprefix("Value error, ")
            out.append(f"{where}: {msg}")
    return out
