"""Packs: the unit a user brings — their application's model, playbooks, probe and
automations, and how to start or find the application — loaded by any agent by path or
by name (the entry-point group ``deskfleet.packs``). DemoEHR and SimEHR are packs too.

- :mod:`.manifest` — ``pack.toml``, validated with one clear line per problem;
- :mod:`.loader` — finding and loading packs into an app model and automations;
- :mod:`.playbooks` — ``@playbook``, ``@probe``, ``@session_reader`` and the built-in playbooks;
- :mod:`.check` — ``deskfleet pack check``.

The names a pack uses are exported from :mod:`deskfleet` itself; docs/your-app.md tells
how to write one.
"""
