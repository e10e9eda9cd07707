"""Identifiers: time-ordered, URL-safe, prefixed by what they name (``run_01JD…``).

ULID layout (48-bit milliseconds + 80 random bits, Crockford base32) so that ids sort by
creation time in indexes and listings.
"""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_id(prefix: str) -> str:
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return f"{prefix}_{''.join(reversed(chars))}"
