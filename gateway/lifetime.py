"""Process lifetimes: child processes that end with their parent, however the parent ends
(kill -9 included), and long-running servers that freeze what their start-up built.

Two mechanisms, because each alone has a gap:

- ``PR_SET_PDEATHSIG`` (Linux): the kernel sends SIGKILL when the thread that started the child
  ends. Set by the child itself after start, so a parent that died in between is caught by
  comparing ``getppid()`` with the pid it was started by.
- A pipe the child watches: the parent keeps the write end (the child's stdin); the kernel
  closes it when the parent dies, and the child's watcher thread sees EOF and exits.

Used by the sandbox's TEST TSA (``serve`` starts it) and by the verification pool's worker
processes; the HSM signing process and the HPKI card process have the same two guards
(``hsm/child_main.py``: ``die_with_parent``, and EOF on the protocol's stdin).

``freeze_start_up_objects``: each ``serve`` worker and ``local serve``, once listening.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import sys
import threading
from typing import BinaryIO

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None) -> bool:
    """Ask for SIGKILL when the parent dies. False if the parent is already gone (the caller
    should exit), i.e. ``getppid()`` is no longer ``parent_pid`` once the request is in place."""
    expected = os.getppid() if parent_pid is None else parent_pid
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    return os.getppid() == expected


def exit_at_eof(stream: BinaryIO | None = None) -> threading.Thread:
    """Exit the process (``os._exit(0)``: no clean-up can hang) when ``stream`` (stdin by
    default), the parent's end of a pipe, reaches EOF."""
    src = stream if stream is not None else sys.stdin.buffer

    def watch() -> None:
        with contextlib.suppress(OSError, ValueError):
            while src.read(1 << 12):
                pass
        os._exit(0)

    t = threading.Thread(target=watch, name="parent-watch", daemon=True)
    t.start()
    return t


def freeze_start_up_objects() -> int:
    """Take what start-up built (modules, the app, its services, caches: most of the heap)
    out of the cyclic garbage collector's reach, once a long-running server is up (each
    ``serve`` worker, ``local serve``).

    Otherwise every full collection walks all of it: measured 56-61 ms per full collection
    under the ceremony's load, a pause of every request in flight on a gateway worker; 3 ms once
    frozen (docs/performance.md). Frozen objects are never scanned again (they live as long
    as the process anyway); a collection first, so that no start-up garbage is kept for good
    (``gc.freeze``'s own advice). Returns how many objects are frozen (``/metrics`` of a
    worker, the start-up line of ``local serve``).
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
