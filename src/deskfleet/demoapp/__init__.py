"""DemoEHR: the demo application that real desktops run, with its app model and automations.

The real-desktop counterpart of :mod:`deskfleet.sim`: where the simulator models an
application, this *is* one — a Tk program (``python -m deskfleet.demoapp``, :mod:`.app`)
on a real X display, driven through its pixels, mouse and keyboard by
:class:`~deskfleet.desktop.driver.RealDesktop`. Its records live in a SQLite file shared
by every desktop of a demo (:mod:`.records`), so a test can count what automations did.

- :func:`demoapp_model` — how DemoEHR's screens are recognised (templates recorded from
  the real app, shipped as package data) and the playbooks that bring it to "home";
- :func:`demoapp_registry` — the demo automations (create, search and update a patient);
- :func:`credentials` — the demo accounts for a seed (passwords and TOTP seeds);
- :mod:`.capture` — re-records the templates from the running app.
"""

from __future__ import annotations

from .automations import create_patient, demoapp_registry, search_patient, update_patient
from .model import demoapp_model
from .records import Patient, Records, credentials

__all__ = [
    "Patient",
    "Records",
    "create_patient",
    "credentials",
    "demoapp_model",
    "demoapp_registry",
    "search_patient",
    "update_patient",
]
