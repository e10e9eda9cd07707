"""Secrets at rest and in the open (invariant 6).

What is encrypted: input fields an automation declares secret (``SecretStr``), and the
vault's account passwords and TOTP seeds. They are encrypted with Fernet (AES-128-CBC +
HMAC-SHA256, from ``cryptography``) before they reach the store, decrypted only to hand
them to the agent that needs them (or, for a TOTP seed, to compute a code), and shown as
``"**********"`` everywhere else.

The key file is a *keyring*: one Fernet key per line, newest first. The newest encrypts;
every key decrypts (``MultiFernet``). Rotation without downtime is therefore: put a new
key first (the servers re-read the file within a second), re-encrypt what is stored with
it (``deskfleet keys rotate``), then drop the old key. Each key is known by a
*fingerprint* (an HMAC of a constant under a key derived from it), so the database can
record which keys encrypted its secrets without holding any of them.

Request fingerprints for idempotency use HMAC with a key of their own (the *fingerprint
key*), so a stored fingerprint cannot be used to guess a low-entropy secret offline — and
so that rotating the encryption key does not change them: an idempotency key sent again
after a rotation still finds its run. The fingerprint key is kept in the database,
encrypted like any secret (see ``services.keys.Keyring.prepare``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeGuard

import orjson
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from .errors import ConfigError

REDACTED = "**********"
_PREFIX = "enc:v1:"
_GENERATE = ("generate one with: python -c 'from cryptography.fernet import Fernet; "
             "print(Fernet.generate_key().decode())'")


def new_key() -> bytes:
    return Fernet.generate_key()


def legacy_mac_key(key: bytes) -> bytes:
    """The fingerprint key of installations made before keyrings: derived from their key,
    so that the fingerprints they stored stay valid."""
    return hashlib.sha256(b"deskfleet-fingerprint:" + key).digest()


def key_fingerprint(key: bytes) -> str:
    """Identifies a key without revealing it (the same value the single-key releases stored)."""
    return hmac.new(legacy_mac_key(key), b"deskfleet-key-check", "sha256").hexdigest()[:32]


def parse_keyring(text: str, where: str = "the secret key file") -> list[bytes]:
    """Keys, newest first: one per line; blank lines and ``#`` comments are ignored."""
    keys: list[bytes] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key = line.encode()
        try:
            Fernet(key)
        except ValueError:
            raise ConfigError(
                f"line {n} of {where} is not a valid Fernet key (32 url-safe base64-encoded bytes); "
                + _GENERATE
            ) from None
        if key not in keys:
            keys.append(key)
    if not keys:
        raise ConfigError(f"{where} holds no key; " + _GENERATE)
    return keys


def write_keyring(path: Path, keys: Sequence[bytes]) -> None:
    """Replace the key file at once (a reader sees the old file or the new one), mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(b"# deskfleet secret keys, newest first: the first encrypts, every one decrypts\n")
        f.write(b"".join(k + b"\n" for k in keys))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class SecretBox:
    """Encrypts with the newest key of a keyring, decrypts with any of them."""

    def __init__(self, keys: bytes | Sequence[bytes], *, path: Path | None = None) -> None:
        ring = [keys] if isinstance(keys, bytes) else list(keys)
        if not ring:
            raise ConfigError("no secret key given; " + _GENERATE)
        try:
            fernets = [Fernet(k) for k in ring]
        except ValueError as exc:
            raise ConfigError(
                "the secret key is not a valid Fernet key (32 url-safe base64-encoded bytes); " + _GENERATE
            ) from exc
        self._keys = ring
        self._fernet = MultiFernet(fernets)
        self._newest = fernets[0]
        self._fingerprints = [key_fingerprint(k) for k in ring]
        self._mac_key = legacy_mac_key(ring[0])
        self.path = path
        self._stamp = _stamp(path) if path is not None else None

    @classmethod
    def from_file(cls, path: Path) -> SecretBox:
        """Load the keyring, creating it (one new key, mode 0600) on first use."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass  # another replica created it a moment ago
            else:
                with os.fdopen(fd, "wb") as f:
                    f.write(new_key() + b"\n")
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read the secret key file {path}: {exc.strerror}") from exc
        return cls(parse_keyring(text, str(path)), path=path)

    # -- the keyring ------------------------------------------------------------------------
    @property
    def keys(self) -> list[bytes]:
        return list(self._keys)

    @property
    def fingerprints(self) -> list[str]:
        """Every key's fingerprint, newest (the one that encrypts) first."""
        return list(self._fingerprints)

    def key_fingerprint(self) -> str:
        """The fingerprint of the key that encrypts."""
        return self._fingerprints[0]

    def changed_file(self) -> SecretBox | None:
        """The keyring as the file now holds it, if the file changed since it was read (a
        rotation in progress); None if unchanged. Raises ConfigError if it cannot be used."""
        if self.path is None:
            return None
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return None
        self._stamp = stamp  # a file that cannot be used is reported once, not at every look
        box = SecretBox.from_file(self.path)
        box._mac_key = self._mac_key
        return box if box._keys != self._keys else None

    def adopt(self, other: SecretBox) -> None:
        """Use another keyring from now on (the fingerprint key stays)."""
        self._keys, self._fernet, self._newest = other._keys, other._fernet, other._newest
        self._fingerprints, self._stamp = other._fingerprints, other._stamp

    # -- fingerprints of requests -------------------------------------------------------------
    def set_mac_key(self, key: bytes) -> None:
        self._mac_key = key

    def fingerprint(self, body: Any) -> str:
        return hmac.new(self._mac_key, orjson.dumps(body, option=orjson.OPT_SORT_KEYS), "sha256").hexdigest()

    # -- values ---------------------------------------------------------------------------------
    def encrypt(self, value: Any) -> str:
        """Any JSON value as ``enc:v1:<token>``."""
        return _PREFIX + self._fernet.encrypt(orjson.dumps(value)).decode()

    def decrypt(self, token: str) -> Any:
        if not (isinstance(token, str) and token.startswith(_PREFIX)):
            raise ValueError("not an encrypted value")
        try:
            return orjson.loads(self._fernet.decrypt(token[len(_PREFIX):].encode()))
        except InvalidToken as exc:
            raise ConfigError(
                "a stored secret cannot be decrypted with this server's keys; was the secret key "
                "file replaced, or an old key removed before the secrets were re-encrypted?"
            ) from exc

    def encrypt_bytes(self, data: bytes) -> str:
        return _PREFIX + self._fernet.encrypt(data).decode()

    def decrypt_bytes(self, token: str) -> bytes:
        try:
            return self._fernet.decrypt(token.removeprefix(_PREFIX).encode())
        except InvalidToken as exc:
            raise ConfigError("a stored secret cannot be decrypted with this server's keys") from exc

    def rewrap(self, token: str) -> str | None:
        """``token`` encrypted with the newest key, or None if it already is."""
        raw = token.removeprefix(_PREFIX).encode()
        try:
            self._newest.decrypt(raw)
            return None
        except InvalidToken:
            pass
        try:
            return _PREFIX + self._fernet.rotate(raw).decode()
        except InvalidToken as exc:
            raise ConfigError("a stored secret cannot be decrypted with any key of the keyring") from exc

    # -- bytes at rest (artifacts: screenshots and files) -----------------------------------------
    # A Fernet token is base64 text; kept as its raw bytes, a screenshot costs a quarter less.
    def seal(self, data: bytes) -> bytes:
        """``data`` encrypted with the newest key: the raw bytes of a Fernet token."""
        return base64.urlsafe_b64decode(self._fernet.encrypt(data))

    def unseal(self, blob: bytes) -> bytes:
        """What :meth:`seal` encrypted, with whichever key of the keyring did it."""
        try:
            return self._fernet.decrypt(base64.urlsafe_b64encode(blob))
        except InvalidToken as exc:
            raise ConfigError(
                "a stored artifact cannot be decrypted with this server's keys; was the secret key "
                "file replaced, or an old key removed before the artifacts were re-encrypted?"
            ) from exc

    def reseal(self, blob: bytes) -> bytes:
        """A sealed ``blob`` encrypted again with the newest key."""
        try:
            return base64.urlsafe_b64decode(self._fernet.rotate(base64.urlsafe_b64encode(blob)))
        except InvalidToken as exc:
            raise ConfigError("a stored artifact cannot be decrypted with any key of the keyring") from exc

    def encrypt_fields(self, data: dict[str, Any], fields: Iterable[str]) -> dict[str, Any]:
        out = dict(data)
        for name in fields:
            if name in out and out[name] is not None:
                out[name] = self.encrypt(out[name])
        return out

    def decrypt_fields(self, data: dict[str, Any], fields: Iterable[str]) -> dict[str, Any]:
        out = dict(data)
        for name in fields:
            value = out.get(name)
            if is_encrypted(value):
                out[name] = self.decrypt(value)
        return out


def is_encrypted(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and value.startswith(_PREFIX)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


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
