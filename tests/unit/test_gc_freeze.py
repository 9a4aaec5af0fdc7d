"""lifetime.freeze_start_up_objects: what start-up built is frozen, its garbage is not.

Run in a child interpreter: freezing pytest's own heap would outlive the test."""

from __future__ import annotations

import subprocess
import sys

_CHILD = """
import gc, weakref
from gateway.lifetime import freeze_start_up_objects

class Node:
    pass

kept = [Node() for _ in range(1000)]  # start-up state the worker keeps
a, b = Node(), Node()
a.other, b.other = b, a  # start-up garbage: a cycle nobody refers to any more
dead = weakref.ref(a)
del a, b
gc.disable()  # no automatic collection may do the function's work for it
before = gc.get_freeze_count()
freeze_start_up_objects()
# gc.get_objects() lists what the collector still scans; frozen objects are left out of it
# (gc.is_tracked stays True for them: it cannot tell frozen from scanned).
frozen = gc.is_tracked(kept[0]) and not any(o is kept[0] for o in gc.get_objects())
print(dead() is None, gc.get_freeze_count() - before >= len(kept), frozen)
gc.unfreeze()
"""


def test_start_up_objects_are_frozen_and_start_up_garbage_is_collected_first() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out == ["True", "True", "True"], out
