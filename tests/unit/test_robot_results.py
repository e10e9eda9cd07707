"""Robot packs without running a robot: how a robot's exit code and tasks map to the
attempt's ending, ``[robot]`` in pack.toml, and a robot's input model (its schema, its
secrets). The real robots run in tests/integration/test_robot_packs.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deskfleet import AutomationError, BusinessError, ConfigError, DesktopError
from deskfleet.packs.manifest import parse_manifest
from deskfleet.packs.robotrun import RobotTask, Scrubber, exact, outcome
from deskfleet.packs.robots import RobotSpec, input_model, make_automation, slug

MANIFEST = """
[pack]
name = "acme"
version = "1"

[states]
ready = ["home"]
"""


def task(name: str, status: str = "PASS", message: str = "", tags: tuple[str, ...] = ()) -> RobotTask:
    return RobotTask(name=name, status=status, message=message, elapsed=0.5, tags=list(tags))


def test_exit_code_0_is_the_result_with_each_task_and_the_outputs() -> None:
    result = outcome("acme.x", 0, [task("A"), task("B", "SKIP")], [], {"id": 7})
    assert result.status == "PASS" and [t.status for t in result.tasks] == ["PASS", "SKIP"]
    assert result.outputs == {"id": 7} and result.elapsed == 1.0
    assert outcome("acme.x", 0, [task("A", "SKIP")], [], {}).status == "SKIP"


@pytest.mark.parametrize(("failed", "business"), [
    ([task("A", "FAIL", "BUSINESS: no such customer")], True),
    ([task("A", "FAIL", "business:  no such customer")], True),
    ([task("A", "FAIL", "no such customer", tags=("Business Error",))], True),
    ([task("A", "FAIL", "the window never came")], False),
    # one failure that is not a business one makes the whole a system error: a retry may pass
    ([task("A", "FAIL", "BUSINESS: no such customer"), task("B", "FAIL", "the window never came")], False),
])
def test_failed_tasks_are_business_errors_only_when_every_one_says_so(failed: list[RobotTask], business: bool) -> None:
    with pytest.raises(DesktopError if not business else BusinessError) as caught:
        outcome("acme.x", len(failed), [task("ok"), *failed], [], {})
    assert isinstance(caught.value, BusinessError) is business
    if len(failed) == 1:
        assert str(caught.value) == f"robot acme.x: task 'A': {'no such customer' if business else failed[0].message}"
    else:
        assert str(caught.value).startswith("robot acme.x: 2 of 3 tasks failed: 'A': BUSINESS: no such customer; 'B'")


@pytest.mark.parametrize(("rc", "error", "text"), [
    (252, BusinessError, r"refused its data or options \(exit code 252; not retried.*: Suite 'X' contains no tasks"),
    (253, AutomationError, r"was stopped from outside \(exit code 253\)"),
    (255, AutomationError, r"failed with exit code 255 \(an unexpected error inside Robot Framework\)"),
    (-9, AutomationError, r"was killed by signal SIGKILL"),
    (3, AutomationError, r"failed with exit code 3"),  # failures, but no output.xml to say which
])
def test_exit_codes_without_failed_tasks(rc: int, error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text) as caught:
        outcome("acme.x", rc, [], ["Suite 'X' contains no tasks matching name 'Y'."], {})
    assert (type(caught.value) is BusinessError) is (error is BusinessError)


def test_secrets_are_scrubbed_from_failures_and_short_values_are_left_alone() -> None:
    scrub = Scrubber(["s3cret-pw", "ab"])
    with pytest.raises(DesktopError) as caught:
        outcome("acme.x", 1, [task("A", "FAIL", "typed s3cret-pw into ab")], [], {}, scrub)
    assert str(caught.value) == "robot acme.x: task 'A': typed *** into ab"
    assert scrub.value({"k": ["s3cret-pw", 1], "s3cret-pw": None}) == {"k": ["***", 1], "***": None}


def test_a_task_pattern_matches_the_name_only() -> None:
    assert exact("Create Order") == "Create Order"
    assert exact("Pay [EUR] *now*?") == "Pay [[]EUR[]] [*]now[*][?]"


def test_robot_names_are_slugs() -> None:
    assert slug("Create Order") == "create_order" and slug("Ünïcode / Task 2") == "n_code_task_2"
    assert slug("***") == "robot"


@pytest.mark.parametrize(("section", "message"), [
    ('[robot]\nsuites = "/etc"\n', r"\[robot\] suites: Value|\[robot\] suites: '/etc': give a path inside the pack"),
    ('[[robot.automations]]\nfile = "../x.robot"\n', r"\[robot\] automations.0.file: '../x.robot': give a path inside"),
    ('[[robot.automations]]\ntask = "A"\n', r"\[robot\] automations.0.file: missing"),
    ('[[robot.automations]]\nfile = "a.robot"\ncolour = 1\n', r"\[robot\] automations.0.colour: unknown key"),
    ('[[robot.automations]]\nfile = "a.robot"\ntimeout = 0\n', r"\[robot\] automations.0.timeout: .*greater than 0"),
])
def test_the_robot_section_is_validated_with_one_line_per_problem(section: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_manifest(MANIFEST + section, "pack.toml")


def test_the_robot_section_defaults() -> None:
    m = parse_manifest(MANIFEST + '[robot]\nsuites = "robots"\n', "pack.toml")
    assert m.robot.declared and m.robot.required_state == "ready" and m.robot.timeout is None
    assert not parse_manifest(MANIFEST, "pack.toml").robot.declared


def spec(schema: dict[str, Any], secrets: tuple[str, ...] = ()) -> RobotSpec:
    return RobotSpec(name="acme.x", path=Path("x.robot"), rel="x.robot", task="", version="1", description="",
                     schema=schema, secrets=secrets, idempotent=False, required_state="ready", timeout=None,
                     stop_grace=1.0)


def test_the_input_model_checks_the_schema_and_keeps_secrets_as_secrets() -> None:
    schema: dict[str, Any] = {"type": "object", "required": ["customer", "password"],
              "properties": {"customer": {"type": "string"}, "count": {"type": "integer"},
                             "password": {"type": "string", "format": "password", "writeOnly": True}}}
    model = input_model(spec(schema, ("password",)))
    data = model.model_validate({"customer": "Ann", "count": 2, "tags": ["a"], "password": "pw-123"})
    assert repr(data).count("pw-123") == 0
    values, secrets = data.variables()
    assert values == {"customer": "Ann", "count": 2, "tags": ["a"], "password": "pw-123"} and secrets == ["pw-123"]
    assert model.model_json_schema() == schema
    # as the agent parses it: the problems said, the input never quoted
    automation = make_automation(spec(schema, ("password",)), Path("."))
    with pytest.raises(BusinessError, match=r"input rejected by acme.x@1: .*count: 'two' is not of type 'integer'") as caught:
        automation.parse_input({"customer": "Ann", "count": "two", "password": 5432})
    assert "password: invalid value (not shown: the field is secret)" in str(caught.value)
    assert "5432" not in str(caught.value)


def test_a_business_failure_of_the_suite_setup_is_every_tasks() -> None:
    failed = [task(n, "FAIL", "Parent suite setup failed:\nBUSINESS: the branch is closed today") for n in "AB"]
    with pytest.raises(BusinessError, match=r"2 of 2 tasks failed: 'A': the branch is closed today; 'B': the branch"):
        outcome("acme.x", 2, failed, [], {})
