"""Simulated desktops: machines running SimEHR, a small EHR-like app, with fault injection.

The fake that ships with the package (STYLE 4): unit tests, the demo and scale tests run
agents against :class:`SimDesktop` exactly as they would against a real display. A
desktop renders real screenshots (Pillow), takes mouse and keyboard input through the
:class:`~deskfleet.desktop.Desktop` protocol, and fails in the ways a :class:`FaultPlan`
says — reproducibly for a seed. Desktops share patient records through a
:class:`SimBackend` (one SQLite file, several processes). :func:`ehr_model` recognises
SimEHR's screens and brings it back to "home"; :func:`demo_registry` offers the demo
automations.
"""

from __future__ import annotations

from .app import SimApp
from .automations import create_patient, demo_registry, export_summary, lookup_patient
from .backend import Patient, SimAccount, SimBackend
from .desktop import SimDesktop
from .faults import FaultPlan
from .layout import Layout, View
from .model import ehr_model
from .render import Renderer, cache_info

__all__ = [
    "FaultPlan",
    "Layout",
    "Patient",
    "Renderer",
    "SimAccount",
    "SimApp",
    "SimBackend",
    "SimDesktop",
    "View",
    "cache_info",
    "create_patient",
    "demo_registry",
    "ehr_model",
    "export_summary",
    "lookup_patient",
]
