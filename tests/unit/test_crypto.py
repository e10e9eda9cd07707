"""The keyring (``crypto.SecretBox``): the newest key encrypts, every key decrypts; the file
is re-read when it changes; fingerprints of keys and of requests survive a rotation."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from cryptography.fernet import Fernet

from deskfleet.crypto import (
    SecretBox,
    is_encrypted,
    key_fingerprint,
    legacy_mac_key,
    parse_keyring,
    write_keyring,
)
from deskfleet.errors import ConfigError


def test_the_newest_key_encrypts_and_every_key_decrypts():
    k1, k2 = Fernet.generate_key(), Fernet.generate_key()
    old, ring = SecretBox(k1), SecretBox([k2, k1])
    token = old.encrypt({"a": 1})
    assert is_encrypted(token) and ring.decrypt(token) == {"a": 1}
    fresh = ring.encrypt("x")
    assert SecretBox(k2).decrypt(fresh) == "x"
    with pytest.raises(ConfigError, match="cannot be decrypted"):
        old.decrypt(fresh)
    assert ring.rewrap(fresh) is None, "already under the newest key"
    moved = ring.rewrap(token)
    assert moved is not None and SecretBox(k2).decrypt(moved) == {"a": 1}
    assert ring.fingerprints == [key_fingerprint(k2), key_fingerprint(k1)]


def test_key_fingerprints_are_the_ones_single_key_releases_stored():
    key = Fernet.generate_key()
    mac = hashlib.sha256(b"deskfleet-fingerprint:" + key).digest()
    assert key_fingerprint(key) == hmac.new(mac, b"deskfleet-key-check", "sha256").hexdigest()[:32]
    assert legacy_mac_key(key) == mac


def test_request_fingerprints_do_not_change_with_the_keys():
    k1, k2 = Fernet.generate_key(), Fernet.generate_key()
    before, after = SecretBox(k1), SecretBox([k2, k1])
    after.set_mac_key(legacy_mac_key(k1))  # what the orchestrator reads back from the database
    body = {"automation": "a", "input": {"pw": "hunter2"}}
    assert before.fingerprint(body) == after.fingerprint(body)


def test_a_keyring_file_with_comments_and_a_bad_line(tmp_path):
    k1, k2 = Fernet.generate_key(), Fernet.generate_key()
    assert parse_keyring(f"# newest first\n\n{k2.decode()}\n{k1.decode()}\n{k2.decode()}\n") == [k2, k1]
    with pytest.raises(ConfigError, match="line 2 of") as err:
        parse_keyring(f"{k1.decode()}\nnot-a-key-but-a-secret-like-thing\n")
    assert "secret-like" not in str(err.value), "the bad line is not repeated"
    with pytest.raises(ConfigError, match="holds no key"):
        parse_keyring("# nothing\n")


def test_the_key_file_is_created_private_and_re_read_when_it_changes(tmp_path):
    path = tmp_path / "secret.key"
    box = SecretBox.from_file(path)
    assert path.stat().st_mode & 0o077 == 0
    assert box.changed_file() is None
    token = box.encrypt("kept")
    new = Fernet.generate_key()
    write_keyring(path, [new, *box.keys])
    assert path.stat().st_mode & 0o077 == 0
    fresh = box.changed_file()
    assert fresh is not None and fresh.key_fingerprint() == key_fingerprint(new)
    box.adopt(fresh)
    assert box.decrypt(token) == "kept" and SecretBox(new).decrypt(box.encrypt("y")) == "y"
    assert box.changed_file() is None
    path.write_text("garbage\n")
    os.utime(path, ns=(1, 1))
    with pytest.raises(ConfigError):
        box.changed_file()
    assert box.changed_file() is None, "a broken file is reported once, not at every look"
