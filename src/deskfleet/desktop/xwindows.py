"""What the X window system says about the windows on a display, beside their pixels.

A screenshot cannot tell a dialog nobody modelled from the list under it, nor a hung
application from a live one showing the same frame. The X server can: which top-level
windows are up, in what stacking order, whose they are (the server's own client ids, not a
property a toolkit may leave unset), which are dialogs of which (``WM_TRANSIENT_FOR``), and
whether a client still answers the window manager's ping (``_NET_WM_PING``: Qt and GTK
answer from their event loop, so a stopped or busy app does not).

Every function takes an open python-xlib ``Display`` and does not keep it; the callers (the
hosts of :mod:`.xvfb` and :mod:`.local`) hold one connection each, under a lock.
"""

from __future__ import annotations

import time
from typing import Any

from .base import Region, Window


def windows(x: Any) -> list[Window]:
    """The viewable top-level windows of display connection ``x``, bottom to top. Under a
    reparenting window manager a client window sits in the manager's frame: the client is
    listed (its title, its pid), at the frame's place in the stacking order."""
    import Xlib.error
    import Xlib.X

    root = x.screen().root
    out: list[Window] = []
    try:
        children = root.query_tree().children
    except Xlib.error.XError:
        return out
    for window in children:  # bottom-to-top stacking order
        try:
            attrs = window.get_attributes()
            if attrs.map_state != Xlib.X.IsViewable:
                continue
            client = window
            if not attrs.override_redirect and _title(x, window) == "":
                for inner in window.query_tree().children:  # a frame: the titled client inside
                    if inner.get_attributes().map_state == Xlib.X.IsViewable and _title(x, inner):
                        client = inner
                        break
            out.append(_describe(x, client, bool(attrs.override_redirect)))
        except Xlib.error.XError:
            continue  # it went away between the listing and the question
    return out


def _describe(x: Any, window: Any, popup: bool) -> Window:
    root = x.screen().root
    geometry = window.get_geometry()
    at = root.translate_coords(window, 0, 0)
    protocols = window.get_wm_protocols() or []
    return Window(
        id=int(window.id), title=_title(x, window),
        rect=Region(int(at.x), int(at.y), int(geometry.width), int(geometry.height)),
        pid=_owner(x, window), dialog_of=_transient_for(window), popup=popup,
        protocols=frozenset(x.get_atom_name(p) for p in protocols),
    )


def ping(x: Any, window: int, *, timeout: float = 0.5) -> float | None:
    """Send ``_NET_WM_PING`` to ``window`` and wait for its client's answer, as a window
    manager does to find a hung application. Returns the round trip in seconds, or None if
    no answer came within ``timeout``. Only for windows whose ``protocols`` name
    ``_NET_WM_PING`` (a client that does not speak it never answers).

    ``x`` must be a connection of its own: it selects structure events on the root window
    (where the answer is sent), which it then drains and ignores."""
    import Xlib.X
    from Xlib import protocol

    root = x.screen().root
    root.change_attributes(event_mask=Xlib.X.StructureNotifyMask | Xlib.X.SubstructureNotifyMask)
    while x.pending_events():
        x.next_event()
    wm_protocols, net_wm_ping = x.intern_atom("WM_PROTOCOLS"), x.intern_atom("_NET_WM_PING")
    stamp = int(time.monotonic() * 1000) & 0xFFFFFFFF or 1
    target = x.create_resource_object("window", window)
    event = protocol.event.ClientMessage(window=target, client_type=wm_protocols,
                                         data=(32, [net_wm_ping, stamp, window, 0, 0]))
    started = time.monotonic()
    target.send_event(event, event_mask=0)
    x.flush()
    deadline = started + timeout
    while True:
        while x.pending_events():
            got = x.next_event()
            if (got.type == Xlib.X.ClientMessage and got.client_type == wm_protocols
                    and got.data[1][0] == net_wm_ping and got.data[1][1] == stamp):
                return time.monotonic() - started
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.002)


def ask_to_close(x: Any, window: int) -> None:
    """Send ``window`` a ``WM_DELETE_WINDOW`` client message: what a window manager sends when
    its close button is clicked (a dialog takes it as Cancel)."""
    from Xlib import protocol

    wm_protocols, delete = x.intern_atom("WM_PROTOCOLS"), x.intern_atom("WM_DELETE_WINDOW")
    target = x.create_resource_object("window", window)
    target.send_event(protocol.event.ClientMessage(window=target, client_type=wm_protocols,
                                                   data=(32, [delete, 0, 0, 0, 0])), event_mask=0)
    x.sync()


def _transient_for(window: Any) -> int | None:
    import Xlib.Xatom

    prop = window.get_full_property(Xlib.Xatom.WM_TRANSIENT_FOR, Xlib.Xatom.WINDOW)
    if prop is None or not len(prop.value):
        return None
    return int(prop.value[0])


def _title(x: Any, window: Any) -> str:
    """A window's title: _NET_WM_NAME (UTF-8) if set, else WM_NAME."""
    net_name, utf8 = x.intern_atom("_NET_WM_NAME"), x.intern_atom("UTF8_STRING")
    prop = window.get_full_property(net_name, utf8)
    if prop is not None and prop.value:
        value = prop.value
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    name = window.get_wm_name()
    if isinstance(name, bytes):
        return name.decode("latin-1")
    return name or ""


def _owner(x: Any, window: Any) -> int | None:
    """The pid of the client that created ``window``, from the server (X-Resource)."""
    from Xlib.ext import res

    reply = x.res_query_client_ids([{"client": window.id, "mask": res.LocalClientPIDMask}])
    for client in reply.ids:
        if client.value:
            return int(client.value[0])
    return None
