"""Key backend protocol: what signing code may ask of a key, wherever it lives.

``sign/`` and ``api/`` depend on these protocols only; ``Pkcs11KeyStore`` (HSM) and, later,
the PC/SC card store implement them. Nothing here knows about documents or HTTP.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class DigestAlgorithm(enum.Enum):
    """Digest algorithms accepted for RSA PKCS#1 v1.5 signatures, keyed by their OIDs."""

    SHA256 = "2.16.840.1.101.3.4.2.1"
    SHA384 = "2.16.840.1.101.3.4.2.2"
    SHA512 = "2.16.840.1.101.3.4.2.3"

    @property
    def digest_size(self) -> int:
        return {"SHA256": 32, "SHA384": 48, "SHA512": 64}[self.name]

    @property
    def hashlib_name(self) -> str:
        return self.name.lower()

    @classmethod
    def from_oid(cls, oid: str) -> DigestAlgorithm:
        for member in cls:
            if member.value == oid:
                return member
        valid = ", ".join(f"{m.value} ({m.name})" for m in cls)
        raise ValueError(f"unsupported hash algorithm OID {oid!r}; valid: {valid}")


@dataclass(frozen=True, kw_only=True)
class GeneratedKey:
    """A key pair just generated inside the key store."""

    key_id: str  # hex of CKA_ID; stable reference stored in the credential row
    public_key_der: bytes  # SubjectPublicKeyInfo DER
    key_size: int


@runtime_checkable
class KeyHandle(Protocol):
    """A private key that can sign but never be read."""

    @property
    def key_id(self) -> str: ...

    async def sign_digest(self, digest: bytes, algorithm: DigestAlgorithm) -> bytes:
        """RSA PKCS#1 v1.5 signature over DigestInfo(algorithm, digest)."""
        ...

    async def sign_digests(
        self, digests: Sequence[bytes], algorithm: DigestAlgorithm
    ) -> list[bytes]:
        """Sign a batch; every digest is validated before anything is signed."""
        ...


@runtime_checkable
class KeyStore(Protocol):
    """A store of signing keys (an HSM token)."""

    async def open(self) -> None:
        """Connect and log in; raises HsmUnavailable if the token cannot be reached."""
        ...

    async def close(self) -> None: ...

    async def generate_rsa_key(self, *, label: str, bits: int = 2048) -> GeneratedKey:
        """Generate a non-extractable, sensitive signing key pair on the token."""
        ...

    async def get_key(self, key_id: str) -> KeyHandle:
        """A handle to an existing private key; raises KeyNotFound when absent."""
        ...

    async def sign_digests(
        self, key_id: str, digests: Sequence[bytes], algorithm: DigestAlgorithm
    ) -> list[bytes]:
        """Look up ``key_id`` and sign ``digests`` (RSA PKCS#1 v1.5) in one call.

        ValueError for a digest of the wrong length, before anything is signed; KeyNotFound
        for a missing key; HsmUnavailable while the store cannot be reached.
        """
        ...

    async def key_attributes(self, key_id: str) -> dict[str, bool]:
        """The store's own word on the private key: SENSITIVE, EXTRACTABLE,
        NEVER_EXTRACTABLE, ALWAYS_SENSITIVE."""
        ...

    async def destroy_key(self, key_id: str) -> None:
        """Delete a key pair that no credential refers to (clean-up of a failed creation)."""
        ...

    async def public_key_der(self, key_id: str) -> bytes:
        """SubjectPublicKeyInfo DER of the key pair ``key_id``."""
        ...

    async def check(self) -> None:
        """Probe the token; raises HsmUnavailable when it is not usable."""
        ...


class BlockingKeyStore(Protocol):
    """The same operations as :class:`KeyStore`, called synchronously on the caller's thread.

    The signing process (``hsm/signer_process.py``) drives its store through this protocol from
    its one thread: going through the async :class:`KeyStore` there would add an event-loop and
    a thread hop to every signature in the process that exists to avoid them.
    """

    def open_blocking(self) -> None: ...

    def close_blocking(self) -> None: ...

    def check_blocking(self) -> None: ...

    def generate_rsa_key_blocking(self, *, label: str, bits: int = 2048) -> GeneratedKey: ...

    def find_key_blocking(self, key_id: str) -> None:
        """Raise KeyNotFound unless ``key_id`` names a private key in the store."""
        ...

    def sign_digests_blocking(
        self, key_id: str, digests: Sequence[bytes], algorithm: DigestAlgorithm
    ) -> list[bytes]: ...

    def destroy_key_blocking(self, key_id: str) -> None: ...

    def public_key_der_blocking(self, key_id: str) -> bytes: ...

    def key_attributes_blocking(self, key_id: str) -> dict[str, bool]: ...


class StoreKeyHandle:
    """A key referenced by id, signing through its store's ``sign_digests``.

    Every store hands out this one handle: holding only the id lets a store swap the
    underlying object (a PKCS#11 reconnect, a new signing process) without invalidating
    handles that callers keep.
    """

    __slots__ = ("_key_id", "_store")

    def __init__(self, store: KeyStore, key_id: str) -> None:
        self._store = store
        self._key_id = key_id

    @property
    def key_id(self) -> str:
        return self._key_id

    async def sign_digest(self, digest: bytes, algorithm: DigestAlgorithm) -> bytes:
        """Sign one digest; ValueError for a digest of the wrong length (a client error)."""
        signatures = await self._store.sign_digests(self._key_id, [digest], algorithm)
        return signatures[0]

    async def sign_digests(
        self, digests: Sequence[bytes], algorithm: DigestAlgorithm
    ) -> list[bytes]:
        return await self._store.sign_digests(self._key_id, digests, algorithm)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key_id={self._key_id!r})"
