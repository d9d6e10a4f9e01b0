"""Checkpointed versions carry a MAC under a cloud key, so a version written by anyone else is refused.

A restarted aggregator resumes from the newest version in the state store and
then signs and ships what it aggregates from there: a Redis that somebody else
could write to would otherwise let them choose the next global model. Each
`VersionRecord` is committed with an HMAC-SHA256 over the federation, the
version number and the digests of the adapter, the optimizer state and the
metadata, under the cloud's `state_mac.key` (common/keys.py); a record whose
MAC does not verify is refused with `TamperedVersion`.
"""

from __future__ import annotations

import hashlib
import hmac

from edgefed.cloud.state.store import StateStoreError, VersionRecord


class TamperedVersion(StateStoreError):
    """A stored version's MAC does not verify: it was not written by this cloud (or was altered)."""


class VersionMac:
    def __init__(self, key: bytes, federation: str) -> None:
        self.key, self.federation = key, federation

    def sign(self, record: VersionRecord) -> bytes:
        return hmac.new(self.key, self._message(record), hashlib.sha256).digest()

    def verify(self, record: VersionRecord) -> None:
        if not record.mac or not hmac.compare_digest(record.mac, self.sign(record)):
            raise TamperedVersion(f"federation {self.federation!r}: version {record.version} in the state store fails "
                                  "its integrity check (written by someone without the cloud's state key, or altered); "
                                  "refusing to use it")

    def _message(self, record: VersionRecord) -> bytes:
        parts = [b"edgefed-version-v1", self.federation.encode(), str(record.version).encode(),
                 hashlib.sha256(record.adapter).digest(), hashlib.sha256(record.optimizer).digest(),
                 hashlib.sha256(record.meta_json().encode()).digest()]
        return b"\x00".join(parts)
