"""Fault injection for the tests: named points where a run can be killed, doing nothing in normal runs.

``LAYERPRUNE_FAULT=NAME`` (or ``NAME:N``) kills the process with SIGKILL the first (or N-th) time it reaches
the point NAME, as a pre-empted job or a power cut would: no ``finally`` block, no atexit handler runs.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "LAYERPRUNE_FAULT"
_reached: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Die here when ``LAYERPRUNE_FAULT`` names this point and this is the time it counts to."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


__all__ = ["FAULT_ENV", "fault_point"]
