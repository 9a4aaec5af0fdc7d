"""PKCS#11 in a signing subprocess: one child process per gateway worker owns the session.

Why: in one process the PKCS#11 thread competes for the GIL with the event loop and the SQLite
threads (python-pkcs11 releases and re-takes it around every ``C_Sign``), so a signature costs
the thread about twice its CPU time in wall time. The child has one thread and nothing else to
do; the worker never loads the PKCS#11 module. The process plumbing (protocol, lifetime,
restart) is ``hsm/child.py``, shared with the HPKI card process.

The child (``python -m gateway.hsm.signer_process``) runs an ordinary ``Pkcs11KeyStore`` and
calls it through the ``BlockingKeyStore`` protocol of ``hsm/api.py`` (``open_blocking``,
``sign_digests_blocking``, ...) on its main thread, so the fault model, the reconnect
behaviour, the error texts and the log lines are exactly those of the in-process store; SoftHSM
sees one session per worker, as before. Errors cross as tuples (``_encode_error``).

Lifetime: the child exits at EOF on its stdin, which the kernel delivers when the worker dies
however it dies (and ``PR_SET_PDEATHSIG`` kills it if the worker dies while it is blocked in
the HSM). If the child dies, its pending calls fail with ``HsmUnavailable`` and the next call
starts a new one (at most once per ``reconnect_interval``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError, HsmUnavailable, KeyNotFound
from gateway.hsm.api import BlockingKeyStore, DigestAlgorithm, GeneratedKey, StoreKeyHandle
from gateway.hsm.child import Child, ChildStore, Served, child_main
from gateway.hsm.encoding import check_key_request, digest_info

__all__ = ["SignerProcessKeyStore"]

_log = logging.getLogger("gateway.hsm")

_UNAVAILABLE = "HSM token unavailable"

#: Operations the child runs, by name.
_OPERATIONS = frozenset(
    {"open", "close", "check", "generate", "get_key", "sign", "destroy", "public_key", "attrs"}
)


def _encode_error(e: Exception) -> tuple[str, str, int]:
    if isinstance(e, KeyNotFound):
        return ("KeyNotFound", e.description, e.retry_after)
    if isinstance(e, HsmUnavailable):
        return ("HsmUnavailable", e.description, e.retry_after)
    if isinstance(e, ConfigError):
        return ("ConfigError", str(e), 0)
    return ("ValueError", str(e), 0)


def _decode_error(error: tuple[str, str, int]) -> Exception:
    kind, text, retry_after = error
    if kind == "KeyNotFound":
        return KeyNotFound(text, retry_after=retry_after)
    if kind == "HsmUnavailable":
        return HsmUnavailable(text, retry_after=retry_after)
    if kind == "ConfigError":
        return ConfigError(text)
    return ValueError(text)


class SignerProcessKeyStore(ChildStore):
    """KeyStore whose PKCS#11 work runs in a child process (``hsm.signing_process = true``).

    Same API, errors and texts as ``Pkcs11KeyStore``, which the child runs.
    """

    _module = "gateway.hsm.signer_process"
    _what = "HSM signing process"
    _log = _log

    def __init__(
        self,
        *,
        module_path: str,
        token_label: str,
        pin: str,
        softhsm_conf: Path | None = None,
        retry_after: int = 5,
        reconnect_interval: float = 1.0,
    ) -> None:
        super().__init__(
            {
                "module_path": module_path,
                "token_label": token_label,
                "pin": pin,
                "softhsm_conf": str(softhsm_conf) if softhsm_conf is not None else None,
                "retry_after": retry_after,
                "reconnect_interval": reconnect_interval,
            },
            reconnect_interval=reconnect_interval,
        )
        self._token_label = token_label
        self._retry_after = retry_after
        self._opened = False
        self._handles: dict[str, StoreKeyHandle] = {}

    def __repr__(self) -> str:
        return f"SignerProcessKeyStore(token_label={self._token_label!r})"

    # ---- KeyStore API ----------------------------------------------------------------------

    async def open(self) -> None:
        """Start the signing process; it connects and logs in now (as ``Pkcs11KeyStore.open``)."""
        self._closed = False
        self._last_spawn = float("-inf")  # open() always tries now
        try:
            await self._request("open", ())
        finally:
            self._opened = True  # a replacement process connects at once from now on

    async def close(self) -> None:
        self._opened = False
        await self._shutdown()

    async def check(self) -> None:
        await self._request("check", ())

    async def generate_rsa_key(self, *, label: str, bits: int = 2048) -> GeneratedKey:
        check_key_request(label, bits)
        key: GeneratedKey = await self._request("generate", (label, bits))
        return key

    async def get_key(self, key_id: str) -> StoreKeyHandle:
        await self._request("get_key", (key_id,))
        handle = self._handles.get(key_id)
        if handle is None:
            handle = self._handles.setdefault(key_id, StoreKeyHandle(self, key_id))
        return handle

    async def sign_digests(
        self, key_id: str, digests: Sequence[bytes], algorithm: DigestAlgorithm
    ) -> list[bytes]:
        """Look up ``key_id`` and sign ``digests`` in one message to the signing process."""
        for d in digests:  # a wrong length is refused here, before any message is sent
            digest_info(d, algorithm)
        if not digests:
            return []
        signatures: list[bytes] = await self._request("sign", (key_id, list(digests), algorithm))
        return signatures

    async def destroy_key(self, key_id: str) -> None:
        await self._request("destroy", (key_id,))

    async def public_key_der(self, key_id: str) -> bytes:
        der: bytes = await self._request("public_key", (key_id,))
        return der

    async def key_attributes(self, key_id: str) -> dict[str, bool]:
        attrs: dict[str, bool] = await self._request("attrs", (key_id,))
        return attrs

    # ---- ChildStore hooks ------------------------------------------------------------------

    def _unavailable(self) -> HsmUnavailable:
        return HsmUnavailable(_UNAVAILABLE, retry_after=self._retry_after)

    def _closed_error(self) -> HsmUnavailable:
        return HsmUnavailable("HSM key store is closed", retry_after=self._retry_after)

    def _decode_error(self, error: Any) -> Exception:
        return _decode_error(error)

    async def _started(self, child: Child) -> None:
        if self._opened:
            # A new process after a death: connect now, as the in-process store reconnects.
            await self._send(child, "open", ())


# --------------------------------------------------------------------------------------------
# Child side.


def _serve(config: dict[str, Any]) -> Served:
    from gateway.hsm.pkcs11 import Pkcs11KeyStore

    conf = config.pop("softhsm_conf")
    softhsm_conf = Path(conf) if conf is not None else None
    store: BlockingKeyStore = Pkcs11KeyStore(**config, softhsm_conf=softhsm_conf)
    return Served(
        _operations(store),
        reported=(HsmUnavailable, KeyNotFound, ConfigError, ValueError),
        encode_error=_encode_error,
        failed=("HsmUnavailable", "HSM operation failed", 5),
        close=store.close_blocking,
    )


def main() -> int:
    return child_main("HSM signing process", _serve)


def _operations(store: BlockingKeyStore) -> dict[str, Callable[..., Any]]:
    """The child's operations: the in-process store's blocking API, on this one thread."""
    ops: dict[str, Callable[..., Any]] = {
        "open": store.open_blocking,
        "close": store.close_blocking,
        "check": store.check_blocking,
        "generate": lambda label, bits: store.generate_rsa_key_blocking(label=label, bits=bits),
        "get_key": store.find_key_blocking,  # the key object stays here
        "sign": store.sign_digests_blocking,
        "destroy": store.destroy_key_blocking,
        "public_key": store.public_key_der_blocking,
        "attrs": store.key_attributes_blocking,
    }
    assert set(ops) == _OPERATIONS
    return ops


if __name__ == "__main__":
    sys.exit(main())
