"""The dashboard: the fleet, its queues, runs and their timelines, failures grouped by
signature, human tasks and the audit log, served by the orchestrator under ``/ui/``.

No build step: server-rendered Jinja templates, htmx for the actions and partial reloads,
and server-sent events (``/ui/stream``) that tell an open page when the event log moved, so
it reloads the part it shows. htmx 2.0.11 and its SSE extension 2.2.4 are vendored in
``static/`` unmodified, from the npm registry, with their licences.

A person logs in with an API key. It is kept in an HttpOnly, SameSite=Strict cookie, so it
is checked on every request exactly as the API checks it: roles, tenant and the screenshot
permission apply, and a revoked key stops working. Actions are POSTs that htmx makes with
an ``HX-Request`` header. A cross-site form can neither send that header nor, SameSite, the
cookie. Every action and every screenshot viewed is in the audit log, as through the API.
"""

from .views import router, static_files

__all__ = ["router", "static_files"]
