"""The store runner is typed end to end (issue 11): ``db(store.op, *args, **kwargs)`` and
``db.write(…)`` carry the operation's parameters (``ParamSpec``), so a wrong argument to a
store call is a type error, not a surprise on a worker thread.

The proof runs mypy on two small snippets: calls written right (no error, and the results
keep the operations' types), and calls wrong each way (a wrong type, a missing argument,
an unknown keyword, a result taken for what it is not), each reported on its line.
``--follow-imports=silent`` reads the package for its types without reporting on it, and
``--no-site-packages`` leaves the libraries out (Any here), so this takes seconds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import deskfleet

SRC = Path(deskfleet.__file__).parent.parent

HEADER = """\
from deskfleet.models import RunSpec
from deskfleet.store.base import Store
from deskfleet.store.runner import StoreRunner


async def use(db: StoreRunner, store: Store, spec: RunSpec) -> None:
"""

RIGHT = [
    'run = await db(store.get_run, "r-1")',
    "reveal_type(run)",
    'created = await db.write(store.submit, spec, request_hash="h", now=1.0)',
    "reveal_type(created)",
    "await db(store.list_runs, limit=10, before=None)",
]

WRONG = {  # a wrong call → what mypy says of it
    "await db(store.get_run, 42)":
        'Argument 2 to "__call__" of "StoreRunner" has incompatible type "int"; expected "str"',
    "await db.write(store.submit, spec, now=1.0)": 'Missing named argument "request_hash"',
    "await db(store.list_runs, limt=10)": 'Unexpected keyword argument "limt"',
    'n: int = await db(store.get_run, "r-1")':
        'Argument 1 to "__call__" of "StoreRunner" has incompatible type "Callable[[str], Run | None]"; '
        'expected "Callable[[str], int]"',
}


def mypy(tmp_path: Path, lines: list[str]) -> tuple[int, list[str]]:
    """mypy's exit code and its lines, each as ``<line of the body>: <message>``."""
    snippet = tmp_path / "snippet.py"
    snippet.write_text(HEADER + "".join(f"    {line}\n" for line in lines), encoding="utf-8")
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\nstrict = True\nignore_missing_imports = True\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), "--follow-imports=silent",
         "--cache-dir", str(tmp_path / ".mypy_cache"), "--no-error-summary", "--hide-error-context",
         "--no-pretty", "--no-site-packages", str(snippet)],
        capture_output=True, text=True, cwd=tmp_path, env={"MYPYPATH": str(SRC)}, timeout=120,
    )
    first = HEADER.count("\n") + 1
    said = []
    for out in (done.stdout + done.stderr).splitlines():
        where, _, message = out.partition(": ")
        if where.startswith("snippet.py:"):
            said.append(f"{int(where.split(':')[1]) - first}: {message}")
        else:
            said.append(out)
    return done.returncode, said


def test_right_calls_check_and_keep_the_operations_types(tmp_path: Path) -> None:
    code, said = mypy(tmp_path, RIGHT)
    assert code == 0, said
    assert said == [
        '1: note: Revealed type is "deskfleet.models.Run | None"',
        '3: note: Revealed type is "tuple[deskfleet.models.Run, bool]"',
    ]


def test_each_wrong_call_is_a_type_error(tmp_path: Path) -> None:
    calls = list(WRONG)
    code, said = mypy(tmp_path, calls)
    assert code == 1, said
    for i, call in enumerate(calls):
        assert any(s.startswith(f"{i}: error: {WRONG[call]}") for s in said), (call, said)
