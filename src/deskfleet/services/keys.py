"""The server's keyring against the database: every key that encrypted a stored secret must
be in it before the server serves, and a key file changed during a rotation is adopted only
once the database counts its newest key among the keys in use (docs/credentials.md)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..crypto import SecretBox, legacy_mac_key
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..store import Store
    from ..store.runner import StoreRunner

log = logging.getLogger(__name__)


class Keyring:
    def __init__(self, store: Store, db: StoreRunner, secrets: SecretBox) -> None:
        self.store = store
        self.db = db
        self.secrets = secrets

    def prepare(self) -> None:
        """Check the keys against the database (synchronous: the CLI runs it before serving)."""
        if not self.store.claim_key(self.secrets.fingerprints):
            missing = [f[:8] for f in self.store.keys_in_use() if f not in self.secrets.fingerprints]
            raise ConfigError(
                "this server's secret keys do not include every key that encrypted the secrets already "
                f"in the database (missing: {', '.join(missing)}); every replica needs the same keyring "
                "(--secret-key-file), and a key may leave it only after 'deskfleet keys rotate' "
                "re-encrypted everything (docs/credentials.md)"
            )
        # Request fingerprints (idempotency) use a key of their own, kept in the database, so
        # that rotating the encryption key leaves them valid.
        box = self.secrets
        token = self.store.fingerprint_key(lambda: box.encrypt_bytes(legacy_mac_key(box.keys[0])))
        box.set_mac_key(box.decrypt_bytes(token))

    async def refresh(self) -> None:
        """Re-read the key file if it changed (a rotation in progress): the newest key
        encrypts from now on — once the database counts it among the keys in use. A file
        that lost a key still in use is refused, and the keys read before stay."""
        try:
            fresh = self.secrets.changed_file()
        except ConfigError as exc:
            log.error("the secret key file changed but cannot be used (%s); still using the keys read before", exc)
            return
        if fresh is None:
            return
        if not await self.db(self.store.claim_key, fresh.fingerprints):
            log.error("the secret key file no longer holds every key that encrypted stored secrets; still "
                      "using the keys read before (a key may leave only after 'deskfleet keys rotate')")
            return
        self.secrets.adopt(fresh)
        log.warning("secret keys re-read: %d keys, encrypting with %s…", len(fresh.fingerprints),
                    fresh.key_fingerprint()[:8])
