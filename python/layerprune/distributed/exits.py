"""Every rank of a job ends the same way: all succeed, or all exit with the error line of the rank that failed.

The ranks talk through the process group's key-value store (the one torchrun's rendezvous serves), not
through collectives, because a failed rank never joins the collective the others are blocked in:

* a rank that fails posts ``{rank, line, code}`` (the first failure wins, counted by ``store.add``), then
  waits, bounded, until every other rank has seen it, so that none is killed before it could say why;
* a watcher thread on every rank polls the store; when another rank's failure appears it prints that line
  to stderr, acknowledges it and ends the process with that exit code (``os._exit``: the main thread may be
  blocked in a collective that will never complete);
* :meth:`ExitAgreement.barrier` waits for every rank in the store, so a wait of any length (rank 0 writing a
  large model) needs no collective timeout.

torchrun stops the remaining ranks with SIGTERM as soon as one exits non-zero; a rank that has already agreed
on its exit code exits with it on SIGTERM (a SIGTERM before that is handled like Ctrl-C).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TextIO

POLL_S = 0.05
ACK_TIMEOUT_S = 60.0
_KEY_COUNT = "failures"
_KEY_FAILURE = "failure"
_KEY_SEEN = "failure_seen"
_sessions = itertools.count()



# Callables run before this process ends with os._exit (no finally block or atexit handler runs then): the
# command line registers the release of the outputs it claimed (layerprune.cli.args.release_outputs).
BEFORE_FORCED_EXIT: list[Callable[[], None]] = []


def forced_exit(code: int) -> NoReturn:
    """``os._exit(code)`` after the :data:`BEFORE_FORCED_EXIT` callables (each one's failure ignored)."""
    for callback in BEFORE_FORCED_EXIT:
        with contextlib.suppress(Exception):
            callback()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(code)

class ExitAgreement:
    """The watcher and the failure and barrier protocol of one job (see the module docstring)."""

    def __init__(self, store: Any, rank: int, world_size: int, *, poll_s: float = POLL_S,
                 ack_timeout_s: float = ACK_TIMEOUT_S, stream: TextIO | None = None) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.poll_s = poll_s
        self.ack_timeout_s = ack_timeout_s
        self.stream = stream
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rounds: dict[str, int] = {}
        self._agreed_code: int | None = None
        self._saved_sigterm: Any = None

    # ---- watching --------------------------------------------------------------------------------
    def start(self) -> ExitAgreement:
        if threading.current_thread() is threading.main_thread():
            self._saved_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._thread = threading.Thread(target=self._watch, name="layerprune-exit-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5 * self.poll_s + 1.0)
        # once an ending is agreed, SIGTERM keeps exiting with its code until the process is gone
        if self._saved_sigterm is not None and self._agreed_code is None \
                and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._saved_sigterm)
            self._saved_sigterm = None

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self._agreed_code is not None:
            forced_exit(self._agreed_code)  # the launcher stops a job whose ending is agreed: keep the agreed code
        raise KeyboardInterrupt("terminated")

    def posted_failure(self) -> dict[str, Any] | None:
        """The failure another rank (or this one) posted, if any."""
        if not self.store.check([_KEY_FAILURE]):
            return None
        return json.loads(self.store.get(_KEY_FAILURE).decode("utf-8"))

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                failure = self.posted_failure()
            except Exception:  # noqa: BLE001 - the store is gone: the job is over, the main thread will see why
                return
            if failure is not None and failure["rank"] != self.rank:
                self._exit_with(failure)

    def _say(self, line: str, code: int) -> None:
        """Print the line this rank ends with; from here on SIGTERM exits with ``code``."""
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        print(line, file=self.stream or sys.stderr, flush=True)
        self._agreed_code = int(code)

    def _exit_with(self, failure: dict[str, Any]) -> NoReturn:
        self._say(str(failure["line"]), int(failure["code"]))
        with contextlib.suppress(Exception):
            self.store.add(_KEY_SEEN, 1)
        forced_exit(int(failure["code"]))

    # ---- failing -----------------------------------------------------------------------------------
    def fail(self, line: str, code: int) -> int:
        """Announce this rank's failure and print the line every rank ends with (this rank's, unless another
        rank failed first); returns the exit code that goes with it."""
        if int(self.store.add(_KEY_COUNT, 1)) == 1:
            self.store.set(_KEY_FAILURE, json.dumps({"rank": self.rank, "line": line, "code": int(code)}))
            self._say(line, code)
            deadline = time.monotonic() + self.ack_timeout_s
            while int(self.store.add(_KEY_SEEN, 0)) < self.world_size - 1 and time.monotonic() < deadline:
                time.sleep(self.poll_s / 5)
            return int(code)
        first = json.loads(self.store.get(_KEY_FAILURE).decode("utf-8"))  # blocks until the first one is written
        self._say(str(first["line"]), int(first["code"]))
        self.store.add(_KEY_SEEN, 1)
        return int(first["code"])

    # ---- agreeing --------------------------------------------------------------------------------
    def barrier(self, name: str) -> None:
        """Wait until every rank has reached ``name`` (the watcher ends this process if one fails meanwhile)."""
        self._rounds[name] = self._rounds.get(name, 0) + 1
        key = f"barrier/{name}/{self._rounds[name]}"
        self.store.add(key, 1)
        while int(self.store.add(key, 0)) < self.world_size:
            time.sleep(self.poll_s)

    def finish(self) -> None:
        """Every rank succeeded: wait for all, then keep rank 0 (which may host the store) until all have left."""
        self.barrier("finished")
        self.stop()
        self.store.add("left", 1)
        if self.rank == 0:
            deadline = time.monotonic() + self.ack_timeout_s
            while int(self.store.add("left", 0)) < self.world_size and time.monotonic() < deadline:
                time.sleep(self.poll_s)


_CURRENT: ExitAgreement | None = None


def current() -> ExitAgreement | None:
    return _CURRENT


@contextlib.contextmanager
def exit_agreement(**options: Any) -> Iterator[ExitAgreement | None]:
    """An :class:`ExitAgreement` over the default process group's store for the block (None for one rank).

    Every rank must enter it the same number of times (each job gets its own keys)."""
    global _CURRENT
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        yield None
        return
    from torch.distributed.distributed_c10d import _get_default_store

    store = dist.PrefixStore(f"layerprune/exits/{next(_sessions)}/", _get_default_store())
    agreement = ExitAgreement(store, dist.get_rank(), dist.get_world_size(), **options).start()
    saved, _CURRENT = _CURRENT, agreement
    try:
        yield agreement
    finally:
        agreement.stop()
        _CURRENT = saved


def barrier(name: str) -> None:
    """Every rank reaches ``name`` before any goes on: through the store inside an exit agreement, else a
    collective barrier of the data-parallel group (nothing in one process)."""
    if _CURRENT is not None:
        _CURRENT.barrier(name)
        return
    from layerprune.distributed.group import active

    dp = active()
    if dp is not None:
        import torch.distributed as dist

        dist.barrier(group=dp.group)


def wait_for_failure(error: BaseException) -> NoReturn:
    """This rank cannot go on because another one failed: wait for that rank's failure to be announced (the
    watcher then ends this process with its line). Raises ``error`` when none comes: outside an exit
    agreement at once, inside it after the acknowledgement timeout."""
    agreement = _CURRENT
    if agreement is not None:
        deadline = time.monotonic() + agreement.ack_timeout_s
        while time.monotonic() < deadline:
            failure = agreement.posted_failure()
            if failure is not None and failure["rank"] != agreement.rank:
                agreement._exit_with(failure)
            time.sleep(agreement.poll_s)
    raise error


__all__ = ["ACK_TIMEOUT_S", "BEFORE_FORCED_EXIT", "POLL_S", "ExitAgreement", "barrier", "current", "exit_agreement",
           "forced_exit", "wait_for_failure"]
