"""Secrets at rest and in the open (invariant 6).

Input fields an automation declares secret (``SecretStr``) are encrypted with Fernet
(AES-128-CBC + HMAC-SHA256, from ``cryptography``) before they reach the store, decrypted
only to hand them to the agent that runs the attempt, and shown as ``"**********"``
everywhere else. Request fingerprints for idempotency use HMAC with the same key, so a
stored fingerprint cannot be used to guess a low-entropy secret offline.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
from cryptography.fernet import Fernet, InvalidToken

from .errors import ConfigError

REDACTED = "**********"
_PREFIX = "enc:v1:"


class SecretBox:
    def __init__(self, key: bytes) -> None:
        try:
            self._fernet = Fernet(key)
        except ValueError as exc:
            raise ConfigError(
                "the secret key is not a valid Fernet key (32 url-safe base64-encoded bytes); "
                "generate one with: python -c 'from cryptography.fernet import Fernet; "
                "print(Fernet.generate_key().decode())'"
            ) from exc
        self._mac_key = hashlib.sha256(b"deskfleet-fingerprint:" + key).digest()

    @classmethod
    def from_file(cls, path: Path) -> SecretBox:
        """Load the key, creating it (mode 0600) on first use."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(Fernet.generate_key())
        return cls(path.read_bytes().strip())

    def encrypt_fields(self, data: dict[str, Any], fields: Iterable[str]) -> dict[str, Any]:
        out = dict(data)
        for name in fields:
            if name in out and out[name] is not None:
                token = self._fernet.encrypt(orjson.dumps(out[name])).decode()
                out[name] = _PREFIX + token
        return out

    def decrypt_fields(self, data: dict[str, Any], fields: Iterable[str]) -> dict[str, Any]:
        out = dict(data)
        for name in fields:
            value = out.get(name)
            if isinstance(value, str) and value.startswith(_PREFIX):
                try:
                    out[name] = orjson.loads(self._fernet.decrypt(value[len(_PREFIX):].encode()))
                except InvalidToken as exc:
                    raise ConfigError(
                        "a stored secret cannot be decrypted with this server's key; "
                        "was the secret key file replaced?"
                    ) from exc
        return out

    def key_fingerprint(self) -> str:
        """Identifies the key without revealing it: replicas must all hold the same one."""
        return hmac.new(self._mac_key, b"deskfleet-key-check", "sha256").hexdigest()[:32]

    def fingerprint(self, body: Any) -> str:
        return hmac.new(self._mac_key, orjson.dumps(body, option=orjson.OPT_SORT_KEYS), "sha256").hexdigest()


def redact(data: dict[str, Any] | None, fields: Iterable[str]) -> dict[str, Any] | None:
    if data is None:
        return None
    out = dict(data)
    for name in fields:
        if name in out and out[name] is not None:
            out[name] = REDACTED
    return out


def hash_key(key: str) -> str:
    """Agent keys are stored as SHA-256: high-entropy random tokens need no slow hash."""
    return hashlib.sha256(key.encode()).hexdigest()


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
