"""Packs: the unit a user brings — their application's model, playbooks, probe and
automations, and how to start or find the application — loaded by any agent by path or
by name (the entry-point group ``deskfleet.packs``). DemoEHR and SimEHR are packs too.

- :mod:`.manifest` — ``pack.toml``, validated with one clear line per problem;
- :mod:`.loader` — finding and loading packs into an app model and automations;
- :mod:`.playbooks` — ``@playbook``, ``@probe``, ``@session_reader`` and the built-in playbooks;
- :mod:`.check` — ``deskfleet pack check``;
- :mod:`.scaffold` — ``deskfleet pack new``: a new pack that passes its own tests
  (its files in ``template/``, its model recorded by :mod:`.template_model`);
- :mod:`.trial` — ``deskfleet pack try`` and ``pack open``: one automation run locally, with
  no orchestrator (:func:`try_automation`), and the pack's app on a display of its own.

The names a pack uses are exported from :mod:`deskfleet` itself; docs/your-app.md tells
how to write one. The pack author's tools are here:

    from deskfleet.packs import new_pack, try_automation
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: name → the module of this package that defines it (imported on first use: a trial needs
#: the desktop stack, loading a pack does not)
_LAZY = {
    "new_pack": "scaffold",
    "NewPack": "scaffold",
    "try_automation": "trial",
    "local_accounts": "trial",
    "pack_machine": "trial",
    "TrialResult": "trial",
    "TrialStep": "trial",
}

__all__ = ["NewPack", "TrialResult", "TrialStep", "local_accounts", "new_pack", "pack_machine", "try_automation"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .scaffold import NewPack, new_pack
    from .trial import TrialResult, TrialStep, local_accounts, pack_machine, try_automation
