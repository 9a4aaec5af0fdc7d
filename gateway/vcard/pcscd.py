"""A private pcscd with vpcd readers, for tests and ``hpki-gateway sandbox cards up``.

pcscd always binds its compiled-in socket ``/run/pcscd/pcscd.comm``; only clients read
``PCSCLITE_CSOCK_NAME``. So each instance runs in its own mount namespace (``unshare -m``)
where a private tmpfs covers ``/run`` (no host USB reader, no host pcscd state) and a directory
of ours is bound onto ``/run/pcscd``: clients outside use ``<dir>/run/pcscd.comm``.

vpcd listens for cards on TCP 35963/35964 of *every* interface, so pcscd also gets its own
network namespace (``unshare -n``, loopback only): nothing outside can reach its port, and two
instances never clash. Cards reach that port by joining the namespace (``setns``) for the
moment they connect (:meth:`Pcscd.connector`). Needs root (or CAP_SYS_ADMIN) for the
namespaces. pcscd is never given ``--apdu``: APDUs carry the PIN, so they are never logged.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.vcard.vpcd import VirtualReader

VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
#: vpcd's first port (slot 0; slot 1 is the next one), inside the private network namespace.
VPCD_PORT = 35963
VPCD_SLOTS = 2
READER_NAME = "Virtual PCD"
_CLONE_NEWNET = 0x40000000
_UNSHARE = ["unshare", "--mount", "--net", "--propagation", "private", "--"]


class PcscdUnavailable(RuntimeError):
    """pcscd, vpcd or the namespaces are missing: say what to install."""


def check_requirements() -> None:
    missing = [t for t in ("pcscd", "unshare", "ip") if shutil.which(t) is None]
    if missing:
        raise PcscdUnavailable(
            f"{', '.join(missing)} not found: install the Debian packages pcscd, util-linux, "
            "iproute2 (scripts/bootstrap.sh)"
        )
    if not VPCD_DRIVER.exists():
        raise PcscdUnavailable(
            f"{VPCD_DRIVER} not found: install the Debian package vsmartcard-vpcd "
            "(scripts/bootstrap.sh)"
        )


def reader_names() -> list[str]:
    """What PC/SC clients see: pcsc-lite names slots '<FRIENDLYNAME> 00 <slot>'."""
    return [f"{READER_NAME} 00 {slot:02d}" for slot in range(VPCD_SLOTS)]


@dataclass
class Pcscd:
    """A running private pcscd (see the module doc)."""

    dir: Path
    pid: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        """The value for ``PCSCLITE_CSOCK_NAME``."""
        return self.dir / "run" / "pcscd.comm"

    @property
    def reader_names(self) -> list[str]:
        return reader_names()

    def connector(self, slot: int) -> Callable[[], socket.socket]:
        """Open a TCP connection to vpcd's port for ``slot`` inside pcscd's network namespace."""
        if not 0 <= slot < VPCD_SLOTS:
            raise ValueError(f"vpcd has slots 0..{VPCD_SLOTS - 1}")
        return lambda: connect_in_netns(self.pid, VPCD_PORT + slot)

    def reader(self, slot: int) -> VirtualReader:
        return VirtualReader(name=self.reader_names[slot], connect=self.connector(slot))

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return _is_pcscd(self.pid)

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout)
            return
        if not _is_pcscd(self.pid):
            return
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _is_pcscd(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _is_pcscd(self.pid):
            os.kill(self.pid, signal.SIGKILL)


def _is_pcscd(pid: int) -> bool:
    """True if ``pid`` is still a pcscd (a recycled pid of another program is left alone)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"pcscd" in cmdline.split(b"\0", 1)[0]


def start_pcscd(base: Path, *, detach: bool = False, timeout: float = 15.0) -> Pcscd:
    """Start pcscd with vpcd readers; ``base`` gets ``run/`` (its socket), ``conf/``, the log.

    ``detach``: in its own session, outliving the caller (``sandbox cards up``).
    """
    check_requirements()
    run, conf = base / "run", base / "conf"
    run.mkdir(parents=True, exist_ok=True)
    conf.mkdir(parents=True, exist_ok=True)
    os.chmod(run, 0o755)  # noqa: S103 - holds pcscd's socket, which clients must reach
    (conf / "vpcd").write_text(
        f'FRIENDLYNAME "{READER_NAME}"\n'
        f"DEVICENAME   /dev/null:{VPCD_PORT}\n"
        f"LIBPATH      {VPCD_DRIVER}\n"
        f"CHANNELID    {VPCD_PORT}\n"
    )
    for stale in ("pcscd.comm", "pcscd.pid"):
        with contextlib.suppress(FileNotFoundError):
            (run / stale).unlink()
    script = (
        "ip link set lo up && mount -t tmpfs -o mode=0755 tmpfs /run && mkdir /run/pcscd && "
        'mount --bind "$1" /run/pcscd && '
        'exec pcscd --foreground --${PCSCD_LOG_LEVEL:-error} -c "$2"'
    )
    log = (base / "pcscd.log").open("ab")
    try:
        proc = subprocess.Popen(
            [*_UNSHARE, "sh", "-c", script, "sh", str(run), str(conf / "vpcd")],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
        )
    finally:
        log.close()
    inst = Pcscd(dir=base, pid=proc.pid, process=None if detach else proc)
    deadline = time.monotonic() + timeout
    while not inst.socket_path.exists():
        if proc.poll() is not None:
            tail = (base / "pcscd.log").read_text(errors="replace")[-2000:]
            raise PcscdUnavailable(f"pcscd exited with {proc.returncode}: {tail}")
        if time.monotonic() > deadline:
            proc.kill()
            raise PcscdUnavailable("pcscd did not create its socket in time")
        time.sleep(0.05)
    (base / "pcscd.pid").write_text(str(proc.pid))
    return inst


def connect_in_netns(pid: int, port: int, *, timeout: float = 10.0) -> socket.socket:
    """Connect to 127.0.0.1:``port`` in the network namespace of process ``pid``.

    ``setns`` moves only the calling thread, so a short-lived thread joins the namespace,
    opens the socket (which stays in that namespace) and ends. Retries while vpcd is not yet
    listening.
    """
    result: dict[str, socket.socket | BaseException] = {}

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into pcscd's network namespace: {os.strerror(err)}")
            finally:
                os.close(fd)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                    sock.settimeout(None)
                    result["sock"] = sock
                    return
                except ConnectionRefusedError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            result["error"] = e

    t = threading.Thread(target=run, name="vpcd-connect", daemon=True)
    t.start()
    t.join()
    sock = result.get("sock")
    if isinstance(sock, socket.socket):
        return sock
    err = result.get("error")
    raise PcscdUnavailable(f"cannot reach vpcd port {port} of pcscd {pid}: {err}") from (
        err if isinstance(err, BaseException) else None
    )
