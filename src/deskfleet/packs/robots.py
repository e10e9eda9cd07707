"""Robot Framework robots as automations: the ``[robot]`` section of ``pack.toml``.

A pack may offer robots people already have beside (or instead of) Python automations::

    [robot]
    suites = "robots"                  # every .robot file here with tasks is an automation
    timeout = 600

    [[robot.automations]]              # … or named one by one, with what discovery cannot say
    file = "robots/orders.robot"
    task = "Create Order"
    input = { type = "object", required = ["customer"], properties = { customer = { type = "string" } } }
    secrets = ["password"]

Each becomes an :class:`~deskfleet.sdk.Automation` like any other — named, versioned, with
an input schema the orchestrator validates at submit and secret fields it encrypts — so the
orchestrator, the scheduler and the agent know nothing of Robot Framework. Running one is
:mod:`.robotrun`'s: a ``python -m robot`` process per attempt. Names: ``<pack>.<task>`` for
an entry with a task, ``<pack>.<file>`` otherwise (a file's path below ``suites``, its
folders joined by dots), lower-cased, other characters than letters and digits made ``_``.

Robot Framework is an optional dependency (``pip install 'deskfleet[robot]'``): a pack
that declares robots does not load without it, and says so.
"""

from __future__ import annotations

import ast
import copy
import importlib.metadata
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, SecretStr, create_model, model_validator

from ..errors import ConfigError
from ..sdk import Automation, Context
from .manifest import Manifest, RobotAutomation
from .robotrun import RobotJob, RobotResult, run_robot

#: what to install for robots
EXTRA = "deskfleet[robot]"
REQUIREMENT = "robotframework>=7,<8"
SUFFIX = ".robot"
#: a section of tasks (or tests) — a .robot file without one is a resource file, not a robot
_TASKS_HEADER = re.compile(r"^\*+\s*(tasks?|test\s*cases?)\s*\**\s*$", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True, slots=True)
class RobotSpec:
    """One robot as the pack declares it, its defaults filled in."""

    name: str
    path: Path  # the .robot file or suite directory
    rel: str  # the same, as the pack names it
    task: str
    version: str
    description: str
    schema: dict[str, Any]
    secrets: tuple[str, ...]
    idempotent: bool
    required_state: str
    timeout: float | None
    stop_grace: float

    def job(self, pack_dir: Path) -> RobotJob:
        return RobotJob(self.name, self.path, pack_dir, self.task, self.timeout, self.stop_grace)


def robot_framework_problem() -> str | None:
    """Why robots cannot run in this Python, or None if they can."""
    try:
        found = importlib.util.find_spec("robot")
    except (ImportError, ValueError):  # ValueError: a module of that name without a spec
        found = None
    if found is None:
        return "Robot Framework is not installed"
    try:
        version = importlib.metadata.version("robotframework")
    except importlib.metadata.PackageNotFoundError:
        return None  # importable from a source tree: trust it
    if not version.startswith("7."):
        return f"Robot Framework {version} is installed; deskfleet runs {REQUIREMENT}"
    return None


def declared(manifest: Manifest, pack_dir: Path, where: str) -> list[RobotSpec]:
    """The robots ``manifest`` declares, found in ``pack_dir``; PackError-worthy problems
    as ConfigError, one line each."""
    section = manifest.robot
    pack = manifest.pack.name
    specs: list[RobotSpec] = []
    problems: list[str] = []
    named = set()
    for i, entry in enumerate(section.automations):
        path = pack_dir / entry.file
        named.add(path.resolve())
        key = f"[robot] automations.{i}"
        if not path.exists():
            problems.append(f"{key}: file {entry.file!r}: no such file or directory in the pack")
            continue
        if path.is_file() and path.suffix != SUFFIX:
            problems.append(f"{key}: file {entry.file!r} is not a {SUFFIX} file (or a directory of them)")
            continue
        try:
            schema, secrets = _schema(entry, pack_dir)
        except ConfigError as exc:
            problems.append(f"{key}: {exc}")
            continue
        default = f"{pack}.{slug(entry.task or _stem(entry.file))}"
        specs.append(_spec(manifest, entry.name or default, path, entry.file, entry, schema, secrets))
    if section.suites:
        root = pack_dir / section.suites
        if not root.is_dir():
            problems.append(f"[robot] suites = {section.suites!r}: no such directory in the pack")
        else:
            for path in sorted(root.rglob(f"*{SUFFIX}")):
                rel = path.relative_to(root)
                if path.resolve() in named or any(p.startswith((".", "_")) for p in rel.parts) \
                        or not _has_tasks(path):
                    continue
                name = f"{pack}." + ".".join(slug(p) for p in (*rel.parts[:-1], rel.stem))
                schema, secrets = _default_schema(name), ()
                specs.append(_spec(manifest, name, path, path.relative_to(pack_dir).as_posix(), None,
                                   schema, secrets))
    if problems:
        raise ConfigError("\n".join(f"{where}: {p}" for p in problems))
    return specs


def _spec(manifest: Manifest, name: str, path: Path, rel: str, entry: RobotAutomation | None,
          schema: dict[str, Any], secrets: tuple[str, ...]) -> RobotSpec:
    section = manifest.robot
    task = entry.task if entry else ""
    what = f"{rel} ({task})" if task else rel
    return RobotSpec(
        name=name, path=path, rel=rel, task=task,
        version=(entry.version if entry and entry.version else section.version),
        description=(entry.description if entry and entry.description else f"Robot Framework robot {what}"),
        schema=schema, secrets=secrets,
        idempotent=section.idempotent if entry is None or entry.idempotent is None else entry.idempotent,
        required_state=(entry.required_state if entry and entry.required_state else section.required_state),
        timeout=entry.timeout if entry and entry.timeout is not None else section.timeout,
        stop_grace=section.stop_grace,
    )


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "robot"


def _stem(file: str) -> str:
    name = file.rstrip("/").rsplit("/", 1)[-1]
    return name.removesuffix(SUFFIX)


def _has_tasks(path: Path) -> bool:
    try:
        return bool(_TASKS_HEADER.search(path.read_text(encoding="utf-8", errors="replace")))
    except OSError:
        return False


def _default_schema(name: str) -> dict[str, Any]:
    return {"title": f"{name} input", "type": "object",
            "description": "each key becomes a robot variable: ${key} (a list also @{key}, an object &{key})"}


def _schema(entry: RobotAutomation, pack_dir: Path) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The entry's input schema (secret fields marked as pydantic marks ``SecretStr``) and
    its secret fields: those it names and those its schema marks (``format: password``)."""
    raw: Any = entry.input
    if raw is None:
        schema: dict[str, Any] = _default_schema(entry.name or entry.file)
    elif isinstance(raw, str):
        path = pack_dir / raw
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"input = {raw!r}: cannot read it: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ConfigError(f"input = {raw!r}: not JSON: {exc}") from None
    else:
        schema = copy.deepcopy(raw)
    if not isinstance(schema, dict):
        raise ConfigError("input: a JSON schema is an object")
    schema.setdefault("type", "object")
    if schema["type"] != "object":
        raise ConfigError(f"input: a robot's input is an object (its keys become variables), not {schema['type']!r}")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ConfigError(f"input: not a valid JSON schema: {exc.message}") from None
    props = schema.setdefault("properties", {})
    marked = [k for k, v in props.items() if isinstance(v, dict) and (v.get("format") == "password")]
    secrets = tuple(dict.fromkeys([*entry.secrets, *marked]))
    for s in secrets:
        prop = props.setdefault(s, {"type": "string"})
        if prop.get("type", "string") != "string":
            raise ConfigError(f"secrets: {s!r} is a secret, so a string, but the schema says {prop['type']!r}")
        prop.update({"type": "string", "format": "password", "writeOnly": True})
    return schema, secrets


# -- automations -----------------------------------------------------------------------------


class RobotInput(BaseModel):
    """A robot's input: any JSON object its schema accepts; its secret fields as ``SecretStr``."""

    model_config = ConfigDict(extra="allow")
    robot_schema: ClassVar[dict[str, Any]] = {"type": "object"}
    robot_secrets: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _matches_schema(cls, data: Any) -> Any:
        validator = jsonschema.Draft202012Validator(cls.robot_schema,
                                                    format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        problems = []
        for e in sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))[:5]:
            where = ".".join(str(p) for p in e.absolute_path) or "input"
            secret = any(str(p) in cls.robot_secrets for p in e.absolute_path)
            problems.append(f"{where}: {'invalid value (not shown: the field is secret)' if secret else e.message}")
        if problems:
            raise ValueError("; ".join(problems))
        return data

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return copy.deepcopy(cls.robot_schema)

    def variables(self) -> tuple[dict[str, Any], list[str]]:
        """The robot's variables (secrets in clear: they go to its private variable file) and
        the secret values, to keep out of everything shown."""
        values = self.model_dump(by_alias=True, exclude_unset=True)
        secrets = []
        for key, value in values.items():
            if isinstance(value, SecretStr):
                values[key] = value.get_secret_value()
                secrets.append(values[key])
        return values, secrets


def input_model(spec: RobotSpec) -> type[RobotInput]:
    required = set(spec.schema.get("required", []))
    fields: dict[str, Any] = {}
    for i, name in enumerate(spec.secrets):
        if name in required:
            fields[f"secret_{i}"] = (SecretStr, Field(alias=name))
        else:
            fields[f"secret_{i}"] = (SecretStr | None, Field(default=None, alias=name))
    model = create_model(f"RobotInput_{slug(spec.name)}", __base__=RobotInput, **fields)
    model.robot_schema = spec.schema
    model.robot_secrets = spec.secrets
    return model


def make_automation(spec: RobotSpec, pack_dir: Path) -> Automation[Any, Any]:
    job = spec.job(pack_dir)

    async def run_the_robot(ctx: Context, data: RobotInput) -> RobotResult:
        variables, secrets = data.variables()
        return await run_robot(job, ctx, variables, secrets)

    return Automation(name=spec.name, version=spec.version, func=run_the_robot, input_model=input_model(spec),
                      output_model=RobotResult, idempotent=spec.idempotent, required_state=spec.required_state,
                      description=spec.description)


def robot_automations(manifest: Manifest, pack_dir: Path | None, where: str) -> list[Automation[Any, Any]]:
    """The automations of the robots ``manifest`` declares (none if it declares none);
    ConfigError, one line per problem, for robots that cannot run here."""
    if not manifest.robot.declared:
        return []
    if pack_dir is None:
        raise ConfigError(f"{where}: [robot]: robots run from the pack's directory on disk, and this pack has none")
    problem = robot_framework_problem()
    if problem is not None:
        raise ConfigError(f"{where}: the pack declares Robot Framework robots ([robot] in pack.toml), but {problem} "
                          f"in this Python: pip install '{EXTRA}' (or add \"{REQUIREMENT}\" to [pack] requires)")
    return [make_automation(spec, pack_dir) for spec in declared(manifest, pack_dir, where)]


# -- pack check --------------------------------------------------------------------------------


def inspect(spec: RobotSpec) -> list[str]:
    """What Robot Framework's parser finds wrong with ``spec``'s files, and a task it names
    that they do not have; nothing is run."""
    from robot.api import get_model
    from robot.api.parsing import TestCase

    files = [spec.path] if spec.path.is_file() else sorted(spec.path.rglob(f"*{SUFFIX}"))
    problems: list[str] = []
    tasks: list[str] = []
    base = spec.path if spec.path.is_dir() else spec.path.parent
    for file in files:
        rel = (Path(spec.rel) / file.relative_to(base)).as_posix() if spec.path.is_dir() else spec.rel
        try:
            model = get_model(str(file))
        except Exception as exc:  # unreadable
            problems.append(f"{rel}: cannot be parsed: {exc}")
            continue
        for node in ast.walk(model):
            if type(node).__name__ == "InvalidSection":
                problems.append(f"{rel}, line {getattr(node, 'lineno', '?')}: unrecognized section header")
            for error in getattr(node, "errors", ()) or ():
                problems.append(f"{rel}, line {getattr(node, 'lineno', '?')}: {error}")
            if isinstance(node, TestCase):
                tasks.append(node.name)
    if not tasks:
        problems.append(f"{spec.rel}: has no tasks (a *** Tasks *** section with at least one task)")
    elif spec.task and not any(_same(spec.task, t) for t in tasks):
        problems.append(f"{spec.rel}: no task {spec.task!r} (its tasks: {', '.join(repr(t) for t in tasks)})")
    return [f"robot {spec.name}: {p}" for p in problems]


def _same(a: str, b: str) -> bool:
    """Robot's own comparison of names: case, spaces and underscores do not count."""
    def norm(s: str) -> str:
        return re.sub(r"[\s_]", "", s).lower()

    return norm(a) == norm(b)

