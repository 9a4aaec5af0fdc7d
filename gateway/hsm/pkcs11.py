"""PKCS#11 key store (SoftHSM2 in tests and the sandbox, a network HSM in production).

Threading model, and why: python-pkcs11 initialises the module without OS locking, and two
threads driving two sessions of SoftHSM segfaulted on the reference machine. Every PKCS#11 call
of the process therefore runs on ONE worker thread (a ``ThreadPoolExecutor(max_workers=1)``) and
never on the event loop. Throughput scales with worker processes, not threads (~1,300 RSA-2048
signatures/s per process with SoftHSM).

The executor is process-wide rather than per store on purpose: two ``Pkcs11KeyStore`` objects in
one process (tests, the CLI next to a running app object) would otherwise mean two threads in the
module, which is exactly the crash above. All mutable store state is touched only on that thread,
so it needs no locks; the event loop only reads ``_down_since``/``_last_attempt`` for fail-fast.

With ``hsm.signing_process`` (the default) this store runs in a child process per worker
instead (``gateway/hsm/signer_process.py``), which calls its synchronous methods on its only
thread; the worker itself then never loads the module.

The module (``pkcs11.lib(path)``) is a process singleton, and SoftHSM reads ``SOFTHSM2_CONF`` at
``C_Initialize``: one process can serve one SoftHSM configuration only.

Fault model (measured with SoftHSM 2.6 by moving the token directory away under an open
session): cached object handles raise ``ObjectHandleInvalid``, lookups raise ``NoSuchKey``,
``C_GetTokenInfo`` raises ``GeneralError``; the session never recovers by itself, and only
``C_Finalize`` + ``C_Initialize`` + a new session works once the directory is back. So on any
"token gone" error the store drops its session and cached handles, reports ``HsmUnavailable``,
and reconnects (re-initialising the module) at most once per ``reconnect_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fcntl
import functools
import logging
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11x

from gateway.errors import ConfigError, HsmUnavailable, KeyNotFound
from gateway.hsm.api import DigestAlgorithm, GeneratedKey, StoreKeyHandle
from gateway.hsm.encoding import check_key_request
from gateway.hsm.encoding import digest_info as _digest_info

__all__ = ["Pkcs11KeyStore"]

_log = logging.getLogger("gateway.hsm")

_T = TypeVar("_T")

#: Errors meaning the token, the session or an object handle is gone: drop everything, reconnect.
_GONE_ERRORS: tuple[type[Exception], ...] = (
    p11x.TokenNotPresent,
    p11x.TokenNotRecognised,
    p11x.NoSuchToken,
    p11x.DeviceRemoved,
    p11x.DeviceError,
    p11x.DeviceMemory,
    p11x.GeneralError,
    p11x.SessionClosed,
    p11x.SessionHandleInvalid,
    p11x.SessionCount,
    p11x.ObjectHandleInvalid,
    p11x.KeyHandleInvalid,
    p11x.UserNotLoggedIn,
)

_PIN_ERRORS: tuple[type[Exception], ...] = (
    p11x.PinIncorrect,
    p11x.PinLocked,
    p11x.PinExpired,
    p11x.PinInvalid,
    p11x.PinLenRange,
)

_UNAVAILABLE = "HSM token unavailable"


def _is_gone(exc: BaseException) -> bool:
    # python-pkcs11 has no class for CKR_CRYPTOKI_NOT_INITIALIZED (or other codes it does not
    # map): it raises a bare PKCS11Error. After a failed C_Initialize that is what every call
    # returns, so a bare PKCS11Error counts as "gone" too.
    return isinstance(exc, _GONE_ERRORS) or type(exc) is p11x.PKCS11Error


# --------------------------------------------------------------------------------------------
# Process-wide state: the one PKCS#11 worker thread and the loaded module(s).


@dataclass
class _Module:
    """A loaded PKCS#11 module and the SoftHSM conf it was initialised with."""

    path: str
    lib: Any  # pkcs11._pkcs11.lib
    conf: str | None
    pid: int
    #: Bumped at every re-initialisation: sessions opened under an older generation are dead
    #: (C_Finalize closes every session of the process), even those of another store.
    generation: int = 0


_state_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_executor_pid: int | None = None
_modules: dict[str, _Module] = {}


def _pkcs11_executor() -> ThreadPoolExecutor:
    """The process's single PKCS#11 thread (recreated in a forked child, where it is gone)."""
    global _executor, _executor_pid
    with _state_lock:
        if _executor is None or _executor_pid != os.getpid():
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pkcs11")
            _executor_pid = os.getpid()
        return _executor


@contextlib.contextmanager
def _store_lock(conf: str | None) -> Iterator[None]:
    """Connect (C_Initialize, find the token, log in) or probe the token while no other process
    sharing this SoftHSM configuration connects.

    SoftHSM's file store rewrites ``token.object`` on every ``C_Login``, and a ``C_Initialize``
    in another process that reads the store meanwhile does not list the token: NoSuchToken,
    "HSM token unavailable" until the next reconnect; ``C_GetTokenInfo`` on an open session
    fails the same way. Measured here: 4 processes connecting and probing in a loop failed 446
    of 800 attempts, and 0 of 800 with this lock. Two workers starting together hit it. An
    ``fcntl.flock`` on ``<conf>.lock`` (released when the file is closed, also by a crash)
    makes our processes take turns; without a SoftHSM configuration (a network HSM) there is
    nothing to lock.
    """
    if conf is None:
        yield
        return
    try:
        fd = os.open(f"{conf}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:  # e.g. a read-only configuration directory: connect unlocked
        _log.debug("no HSM connection lock next to %s: %s", conf, e)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _resolved_conf(softhsm_conf: Path | None) -> str | None:
    return str(softhsm_conf.expanduser().resolve()) if softhsm_conf is not None else None


def _check_conf(module: _Module, conf: str | None) -> None:
    if conf is not None and module.conf != conf:
        raise ConfigError(
            f"PKCS#11 module {module.path} is already initialised in this process with "
            f"SOFTHSM2_CONF={module.conf or '(unset)'}; cannot switch to {conf}. SoftHSM reads "
            "its configuration once per process: use one softhsm_conf per process."
        )


def _load_module(module_path: str, conf: str | None) -> _Module:
    """Load (or return) the module; runs on the PKCS#11 thread."""
    module = _modules.get(module_path)
    if module is not None:
        _check_conf(module, conf)
        return module
    if module_path in pkcs11._loaded:
        # Loaded by someone else in this process: the best evidence of its conf is the
        # environment it was initialised from, which nobody should have changed since.
        module = _Module(
            path=module_path,
            lib=pkcs11._loaded[module_path],
            conf=os.environ.get("SOFTHSM2_CONF"),
            pid=os.getpid(),
        )
        _check_conf(module, conf)
        _modules[module_path] = module
        return module
    if not os.path.isfile(module_path):
        raise ConfigError(f"PKCS#11 module not found: {module_path}")
    if conf is not None:
        if not os.path.isfile(conf):
            raise ConfigError(f"SoftHSM configuration not found: {conf}")
        os.environ["SOFTHSM2_CONF"] = conf
    lib = pkcs11.lib(module_path)  # C_Initialize; PKCS11Error propagates to the caller
    module = _Module(
        path=module_path, lib=lib, conf=os.environ.get("SOFTHSM2_CONF"), pid=os.getpid()
    )
    _modules[module_path] = module
    return module


def _reinitialize(module: _Module) -> None:
    """C_Finalize + C_Initialize: the only way SoftHSM drops its stale view of the token."""
    if module.conf is not None and os.environ.get("SOFTHSM2_CONF") != module.conf:
        _log.warning("SOFTHSM2_CONF changed in this process; restoring %s", module.conf)
        os.environ["SOFTHSM2_CONF"] = module.conf
    lib = module.lib
    module.generation += 1
    if lib.initialized:
        try:
            lib.finalize()
        except p11x.PKCS11Error as e:
            # C_Finalize fails while the token directory is gone; the library still counts as
            # finalised, and C_Initialize below is what matters.
            _log.debug("C_Finalize failed during HSM reconnect: %s", type(e).__name__)
            if lib.initialized:
                raise
    lib.initialize()
    module.pid = os.getpid()


# --------------------------------------------------------------------------------------------


def _key_id_bytes(key_id: str) -> bytes:
    try:
        raw = bytes.fromhex(key_id)
    except (ValueError, TypeError):
        raw = b""
    return raw


def _spki_der(modulus: bytes, exponent: bytes) -> bytes:
    public = rsa.RSAPublicNumbers(
        int.from_bytes(exponent, "big"), int.from_bytes(modulus, "big")
    ).public_key()
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


#: Jobs one work item of ``Pkcs11KeyStore.sign_digests`` signs before yielding the thread.
SIGN_WORKER_MAX_JOBS = 64


@dataclass(frozen=True, kw_only=True)
class _SignJob:
    key_id: str
    data: list[bytes]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[bytes]]
    context: contextvars.Context

    def settle(self, result: list[bytes] | None, error: BaseException | None) -> None:
        """Hand the outcome to the caller's loop (from the PKCS#11 thread)."""

        def settle_on_loop() -> None:
            if self.future.done():  # the caller went away
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                assert result is not None
                self.future.set_result(result)

        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits
            self.loop.call_soon_threadsafe(settle_on_loop)


class Pkcs11KeyStore:
    """KeyStore backed by a PKCS#11 token found by label and logged in with the user PIN."""

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
        self._module_path = module_path
        self._token_label = token_label
        self._pin = pin
        self._conf = _resolved_conf(softhsm_conf)
        self._retry_after = retry_after
        self._reconnect_interval = reconnect_interval
        # Touched on the PKCS#11 thread only (the loop reads the two floats for fail-fast).
        self._module: _Module | None = None
        self._session: Any = None  # pkcs11.Session
        self._generation = -1
        self._private_keys: dict[str, Any] = {}  # key_id -> pkcs11 PrivateKey
        self._handles: dict[str, StoreKeyHandle] = {}
        self._down_since: float | None = None
        self._last_attempt = float("-inf")
        self._closed = False
        # sign_digests: jobs waiting for the PKCS#11 thread, and whether a worker is on it.
        self._sign_lock = threading.Lock()
        self._sign_queue: deque[_SignJob] = deque()
        self._sign_worker_active = False

    def __repr__(self) -> str:
        return f"Pkcs11KeyStore(token_label={self._token_label!r}, module={self._module_path!r})"

    # ---- async API (event loop side) -------------------------------------------------------

    async def open(self) -> None:
        """Connect and log in now, so a misconfigured token fails at start-up, not first use."""
        await self._run(self._open_sync)

    async def close(self) -> None:
        await self._run(self._close_sync)

    async def check(self) -> None:
        """Probe the token with C_GetTokenInfo (the call SoftHSM fails once the token is gone)."""
        await self._call(self._probe_sync, retry=True)

    async def generate_rsa_key(self, *, label: str, bits: int = 2048) -> GeneratedKey:
        check_key_request(label, bits)
        return await self._call(
            functools.partial(self._generate_sync, label=label, bits=bits), retry=False
        )

    async def get_key(self, key_id: str) -> StoreKeyHandle:
        await self._call(functools.partial(self._private_key, key_id), retry=True)
        handle = self._handles.get(key_id)
        if handle is None:
            handle = self._handles.setdefault(key_id, StoreKeyHandle(self, key_id))
        return handle

    async def sign_digests(
        self, key_id: str, digests: Sequence[bytes], algorithm: DigestAlgorithm
    ) -> list[bytes]:
        """Look up ``key_id`` and sign ``digests`` on the PKCS#11 thread, in one hop.

        Saves ``get_key``'s hop, and most of this one: callers queue their job, and one work
        item on the PKCS#11 thread signs queued jobs back to back, handing each result to its
        caller's loop as soon as it is done; it returns to the executor when the queue is empty
        (or after ``SIGN_WORKER_MAX_JOBS`` jobs, so other PKCS#11 calls get their turn). The
        thread never idles waiting for the event loop to submit the next signature. Per job the
        semantics are those of ``_call(..., retry=True)``: fail fast while the token is down,
        reconnect once and retry on a "gone" error (PKCS#1 v1.5 is deterministic, re-signing
        is harmless), ``KeyNotFound`` for a missing key; ``ValueError`` for a digest of the
        wrong length is raised before anything is queued.
        """
        data = [_digest_info(d, algorithm) for d in digests]
        if not data:
            return []
        if self._down_since is not None and not self._reconnect_due():
            raise self._unavailable()
        loop = asyncio.get_running_loop()
        job = _SignJob(
            key_id=key_id,
            data=data,
            loop=loop,
            future=loop.create_future(),
            context=contextvars.copy_context(),  # log records keep the request id
        )
        with self._sign_lock:
            self._sign_queue.append(job)
            start = not self._sign_worker_active
            self._sign_worker_active = True
        if start:
            try:
                _pkcs11_executor().submit(self._sign_worker)
            except BaseException:
                with self._sign_lock:
                    self._sign_worker_active = False
                raise
        return await job.future

    def _sign_worker(self) -> None:
        """Sign queued jobs back to back (runs on the PKCS#11 thread)."""
        for _ in range(SIGN_WORKER_MAX_JOBS):
            with self._sign_lock:
                if not self._sign_queue:
                    self._sign_worker_active = False
                    return
                job = self._sign_queue.popleft()
            op = functools.partial(self._sign_sync, job.key_id, job.data)
            try:
                result = job.context.run(self._call_sync, op, True)
            except BaseException as e:  # noqa: BLE001 - the caller's error, delivered to it
                job.settle(None, e)
            else:
                job.settle(result, None)
        # Other PKCS#11 calls queued on the thread run first; then the rest of the queue.
        _pkcs11_executor().submit(self._sign_worker)

    async def destroy_key(self, key_id: str) -> None:
        """Delete a key pair; only for a key that never got a credential (failed creation)."""
        await self._call(functools.partial(self._destroy_sync, key_id), retry=False)

    async def public_key_der(self, key_id: str) -> bytes:
        return await self._call(functools.partial(self._public_key_der_sync, key_id), retry=True)

    async def key_attributes(self, key_id: str) -> dict[str, bool]:
        """SENSITIVE / EXTRACTABLE / NEVER_EXTRACTABLE / ALWAYS_SENSITIVE of the private key.

        The token's own word that the key never left it (the tests assert these).
        """
        return await self._call(functools.partial(self._attributes_sync, key_id), retry=True)

    # ---- blocking API (for a caller that owns its thread: the signing process) ----------
    # The same operations, errors and fault model as the async API, run on the caller's
    # thread; never call these from an event loop.

    def open_blocking(self) -> None:
        self._open_sync()

    def close_blocking(self) -> None:
        self._close_sync()

    def check_blocking(self) -> None:
        self._blocking(self._probe_sync, retry=True)

    def generate_rsa_key_blocking(self, *, label: str, bits: int = 2048) -> GeneratedKey:
        check_key_request(label, bits)
        return self._blocking(
            functools.partial(self._generate_sync, label=label, bits=bits), retry=False
        )

    def find_key_blocking(self, key_id: str) -> None:
        """Raise KeyNotFound unless the private key ``key_id`` is on the token."""
        self._blocking(functools.partial(self._private_key, key_id), retry=True)

    def sign_digests_blocking(
        self, key_id: str, digests: Sequence[bytes], algorithm: DigestAlgorithm
    ) -> list[bytes]:
        data = [_digest_info(d, algorithm) for d in digests]
        if not data:
            return []
        return self._blocking(functools.partial(self._sign_sync, key_id, data), retry=True)

    def destroy_key_blocking(self, key_id: str) -> None:
        self._blocking(functools.partial(self._destroy_sync, key_id), retry=False)

    def public_key_der_blocking(self, key_id: str) -> bytes:
        return self._blocking(functools.partial(self._public_key_der_sync, key_id), retry=True)

    def key_attributes_blocking(self, key_id: str) -> dict[str, bool]:
        return self._blocking(functools.partial(self._attributes_sync, key_id), retry=True)

    def _blocking(self, op: Callable[[Any], _T], *, retry: bool) -> _T:
        # The async API's fail-fast (``_call``), then the same retrying call.
        if self._down_since is not None and not self._reconnect_due():
            raise self._unavailable()
        return self._call_sync(op, retry)

    async def _run(self, fn: Callable[[], _T]) -> _T:
        loop = asyncio.get_running_loop()
        # Run in a copy of the caller's context so log records keep the request id.
        ctx = contextvars.copy_context()
        return await loop.run_in_executor(_pkcs11_executor(), ctx.run, fn)

    async def _call(self, op: Callable[[Any], _T], *, retry: bool) -> _T:
        # Fail fast on the loop while down and not yet due for a reconnect attempt, so an
        # outage does not queue thousands of requests behind the PKCS#11 thread.
        if self._down_since is not None and not self._reconnect_due():
            raise self._unavailable()
        return await self._run(functools.partial(self._call_sync, op, retry))

    # ---- PKCS#11 thread side ---------------------------------------------------------------

    def _unavailable(self) -> HsmUnavailable:
        return HsmUnavailable(_UNAVAILABLE, retry_after=self._retry_after)

    def _reconnect_due(self) -> bool:
        return time.monotonic() - self._last_attempt >= self._reconnect_interval

    def _call_sync(self, op: Callable[[Any], _T], retry: bool) -> _T:
        session = self._ensure_session()
        try:
            return op(session)
        except p11x.PKCS11Error as e:
            if not _is_gone(e):
                raise self._translate_other(e) from e
            self._mark_down(e)
            if not retry:
                raise self._unavailable() from e
            first_error = e
        # The handle or session was stale. Reconnect once right away: if the token is back
        # (e.g. the HSM restarted between two requests) the caller never notices.
        session = self._reconnect(reason=first_error)
        try:
            return op(session)
        except p11x.PKCS11Error as e:
            if not _is_gone(e):
                raise self._translate_other(e) from e
            self._mark_down(e)
            raise self._unavailable() from e

    def _translate_other(self, e: p11x.PKCS11Error) -> Exception:
        if isinstance(e, _PIN_ERRORS):
            return self._pin_refused(e)
        _log.error("HSM operation failed on token %r: %s", self._token_label, type(e).__name__)
        return HsmUnavailable("HSM operation failed", retry_after=self._retry_after)

    def _pin_refused(self, e: BaseException) -> HsmUnavailable:
        _log.error(
            "HSM token %r refused the PIN (%s); check the configured PIN",
            self._token_label,
            type(e).__name__,
        )
        return self._unavailable()

    def _ensure_session(self) -> Any:
        if self._closed:
            raise HsmUnavailable("HSM key store is closed", retry_after=self._retry_after)
        module = self._module
        if self._session is not None and module is not None:
            if module.generation == self._generation and module.pid == os.getpid():
                return self._session
            # Another store re-initialised the module (closing our session with it), or we
            # are in a forked child: reconnect without waiting for the interval.
            self._drop_session()
            return self._reconnect(reason=None)
        if self._down_since is not None and not self._reconnect_due():
            raise self._unavailable()
        return self._reconnect(reason=None)

    def _reconnect(self, *, reason: BaseException | None) -> Any:
        """(Re)initialise the module, find the token by label, open a session, log in."""
        self._last_attempt = time.monotonic()
        started = time.perf_counter()
        after_fault = reason is not None or self._down_since is not None
        # One WARNING per failure episode (start-up, or right after a fault); the periodic
        # retries while the token stays away log at DEBUG.
        level = logging.WARNING if reason is not None or self._down_since is None else logging.DEBUG
        try:
            session = self._connect(after_fault=after_fault)
        except HsmUnavailable:
            self._note_failed_attempt()
            raise
        except p11x.PKCS11Error as e:
            self._note_failed_attempt()
            if isinstance(e, _PIN_ERRORS):
                raise self._pin_refused(e) from e
            if isinstance(e, p11x.NoSuchToken):
                _log.log(level, "HSM token %r not found", self._token_label)
            elif isinstance(e, p11x.MultipleTokensReturned):
                _log.error("more than one HSM token is labelled %r", self._token_label)
            else:
                _log.log(
                    level,
                    "cannot connect to HSM token %r: %s",
                    self._token_label,
                    type(e).__name__,
                )
            raise self._unavailable() from e
        self._session = session
        self._down_since = None
        elapsed_ms = (time.perf_counter() - started) * 1000
        if after_fault:
            _log.warning("reconnected to HSM token %r in %.1f ms", self._token_label, elapsed_ms)
        else:
            _log.info("connected to HSM token %r in %.1f ms", self._token_label, elapsed_ms)
        return session

    def _connect(self, *, after_fault: bool) -> Any:
        with _store_lock(self._conf or os.environ.get("SOFTHSM2_CONF")):
            return self._connect_locked(after_fault=after_fault)

    def _connect_locked(self, *, after_fault: bool) -> Any:
        if self._module is None:
            self._module = _load_module(self._module_path, self._conf)  # may C_Initialize
        module = self._module
        if after_fault or not module.lib.initialized or module.pid != os.getpid():
            # SoftHSM keeps a stale view of a token that went away until C_Finalize and
            # C_Initialize; a forked child must initialise for itself anyway.
            _reinitialize(module)
        token = module.lib.get_token(token_label=self._token_label)
        try:
            session = token.open(rw=True, user_pin=self._pin)
        except p11x.UserAlreadyLoggedIn:
            # Login state is per application: another store of this process is logged in.
            session = token.open(rw=True)
        self._generation = module.generation
        return session

    def _note_failed_attempt(self) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()

    def _mark_down(self, e: BaseException) -> None:
        _log.warning(
            "HSM token %r unavailable (%s); dropping the session and %d cached key handle(s)",
            self._token_label,
            type(e).__name__,
            len(self._private_keys),
        )
        self._drop_session()
        if self._down_since is None:
            self._down_since = time.monotonic()
        # Allow the immediate reconnect-and-retry, then rate-limit further attempts.
        self._last_attempt = float("-inf")

    def _drop_session(self) -> None:
        session, self._session = self._session, None
        self._private_keys.clear()
        module = self._module
        if session is None or module is None:
            return
        if module.generation != self._generation or module.pid != os.getpid():
            # The session died with an earlier C_Finalize (or belongs to the parent process);
            # its handle number may already name another live session, so never close it.
            return
        try:
            session.close()
        except p11x.PKCS11Error as e:
            _log.debug("closing stale HSM session failed: %s", type(e).__name__)

    def _open_sync(self) -> None:
        if self._closed:
            self._closed = False
        if self._session is None:
            # open() always tries now, whatever the reconnect interval says.
            self._last_attempt = float("-inf")
        self._ensure_session()

    def _close_sync(self) -> None:
        self._drop_session()
        self._closed = True
        self._down_since = None

    def _probe_sync(self, session: Any) -> None:
        # C_GetTokenInfo re-reads token.object: the same race with another process's login.
        with _store_lock(self._conf or os.environ.get("SOFTHSM2_CONF")):
            info = session.token.slot.get_token()
        if info.label != self._token_label:
            raise p11x.TokenNotRecognised()

    def _private_key(self, key_id: str, session: Any) -> Any:
        key = self._private_keys.get(key_id)
        if key is not None:
            return key
        ckid = _key_id_bytes(key_id)
        if not ckid:
            raise KeyNotFound(f"signing key {key_id} not found on token {self._token_label}")
        try:
            key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=ckid)
        except p11x.NoSuchKey as e:
            # SoftHSM also answers NoSuchKey when the whole token has vanished; only a healthy
            # token makes this a missing key (the probe raises a "gone" error otherwise).
            self._probe_sync(session)
            raise KeyNotFound(f"signing key {key_id} not found on token {self._token_label}") from e
        except p11x.MultipleObjectsReturned as e:
            _log.error("token %r holds several private keys with id %s", self._token_label, key_id)
            raise KeyNotFound(
                f"signing key {key_id} is ambiguous on token {self._token_label}"
            ) from e
        self._private_keys[key_id] = key
        return key

    def _sign_sync(self, key_id: str, data: list[bytes], session: Any) -> list[bytes]:
        key = self._private_key(key_id, session)
        sign = key.sign
        mechanism = Mechanism.RSA_PKCS
        return [bytes(sign(item, mechanism=mechanism)) for item in data]

    def _generate_sync(self, session: Any, *, label: str, bits: int) -> GeneratedKey:
        ckid = secrets.token_bytes(16)
        public, private = session.generate_keypair(
            KeyType.RSA,
            bits,
            id=ckid,
            label=label,
            store=True,
            capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
            public_template={Attribute.TOKEN: True, Attribute.VERIFY: True},
            private_template={
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True,
                Attribute.DECRYPT: False,
                Attribute.UNWRAP: False,
                Attribute.DERIVE: False,
            },
        )
        key_id = ckid.hex()
        der = _spki_der(public[Attribute.MODULUS], public[Attribute.PUBLIC_EXPONENT])
        self._private_keys[key_id] = private
        _log.info(
            "generated RSA-%d key %s (label %r) on token %r", bits, key_id, label, self._token_label
        )
        return GeneratedKey(key_id=key_id, public_key_der=der, key_size=bits)

    def _destroy_sync(self, key_id: str, session: Any) -> None:
        ckid = _key_id_bytes(key_id)
        if not ckid:
            return
        self._private_keys.pop(key_id, None)
        for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            for obj in session.get_objects({Attribute.CLASS: cls, Attribute.ID: ckid}):
                obj.destroy()
        _log.info("destroyed key pair %s on token %r", key_id, self._token_label)

    def _public_key_der_sync(self, key_id: str, session: Any) -> bytes:
        ckid = _key_id_bytes(key_id)
        if ckid:
            try:
                public = session.get_key(object_class=ObjectClass.PUBLIC_KEY, id=ckid)
            except (p11x.NoSuchKey, p11x.MultipleObjectsReturned):
                public = None
            if public is not None:
                return _spki_der(public[Attribute.MODULUS], public[Attribute.PUBLIC_EXPONENT])
        # No public object (e.g. imported without one): the private key carries n and e.
        private = self._private_key(key_id, session)
        return _spki_der(private[Attribute.MODULUS], private[Attribute.PUBLIC_EXPONENT])

    def _attributes_sync(self, key_id: str, session: Any) -> dict[str, bool]:
        private = self._private_key(key_id, session)
        names = (
            Attribute.SENSITIVE,
            Attribute.EXTRACTABLE,
            Attribute.NEVER_EXTRACTABLE,
            Attribute.ALWAYS_SENSITIVE,
        )
        values = private.get_attributes(list(names))
        return {name.name: bool(values[name]) for name in names}
