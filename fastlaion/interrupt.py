"""Ctrl-C and child processes: the terminal sends SIGINT to every process of the group, children
included, also while multiprocessing is still starting Python in them, where it prints a
traceback per child. Children are started with SIGINT blocked (`ctrl_c_held`) and take it back
where they can handle it (`release_ctrl_c`): a Ctrl-C that came in between is then delivered.
Steps that must finish together once begun (the renames that put an output in place) run under
`ctrl_c_deferred`; the line that says why a command stopped prints under `ctrl_c_ignored`.

SIGTERM (what `kill`, `timeout`, Slurm, Kubernetes, `docker stop` and systemd send) stops a
command as the first Ctrl-C does: `stop_on_sigterm` makes it a KeyboardInterrupt in this process,
and `stopped_by` tells which of the two came first, for the command's line and exit status
(143, not 130). Each helper here treats both signals alike."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_MASKS = hasattr(signal, "pthread_sigmask")  # not on Windows
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # each stops a command; SIGTERM's handler: terminated
_stopped_by: list[int] = []  # the stop signal this process got first (terminated records SIGTERM)


def terminated(signum: int, frame: Any) -> None:
    """SIGTERM's handler while a command works: a KeyboardInterrupt, as a Ctrl-C's, noted as
    SIGTERM's (`stopped_by`). A second SIGTERM is dropped: the first one's clean-up runs to its
    end (a supervisor that will not wait sends SIGKILL)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _stopped_by.append(signal.SIGTERM)
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """From here on SIGTERM stops this process as a Ctrl-C does (`terminated`), unless it is
    ignored (a parent chose so). In the main thread only."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
        signal.signal(signal.SIGTERM, terminated)


def stopped_by() -> signal.Signals:
    """The signal that stopped this process: SIGTERM if `terminated` ran, else SIGINT (Ctrl-C)."""
    return signal.SIGTERM if _stopped_by else signal.SIGINT


@contextlib.contextmanager
def ctrl_c_held() -> Iterator[None]:
    """Block SIGINT and SIGTERM in this thread while the block runs (start child processes in
    it: they inherit the mask). Blocked, not ignored: a Ctrl-C meanwhile is delivered when it ends."""
    if not _MASKS:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def release_ctrl_c(ignore: bool = False) -> None:
    """In a child started under `ctrl_c_held`: deliver SIGINT and SIGTERM again from here on (a
    pending one lands now), or, with `ignore`, drop SIGINT for good (the parent stops this child
    itself; SIGTERM keeps its default, which ends the child quietly: the parent's own way to end
    it)."""
    if ignore:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _MASKS:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(STOP_SIGNALS))


@contextlib.contextmanager
def ctrl_c_deferred() -> Iterator[None]:
    """Run the block to its end through a Ctrl-C or SIGTERM, which then lands as it would have
    (a KeyboardInterrupt): for steps that must finish together, so that what a Ctrl-C's message
    says was written is what is on disk. Python's handlers are swapped, not the signal mask:
    `ctrl_c_held` holds the signals in one thread only, and the kernel hands a process's SIGINT to
    any thread that does not block it (faiss's, Polars' ...). In the main thread only (the one
    Python's handler runs in); elsewhere it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _: came.append(signum)) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if came:
        land(came[0], previous[came[0]])


def land(signum: int, handler: Any) -> None:
    """Deliver `signum`, held back so far, to `handler`, the one it would have met (Python's
    default SIGINT handler raises KeyboardInterrupt; `terminated` too)."""
    if callable(handler):
        handler(signum, None)
    elif handler is not signal.SIG_IGN and signum == signal.SIGINT:
        raise KeyboardInterrupt
    elif handler is signal.SIG_DFL:  # SIGTERM with no handler: the end it would have had
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


@contextlib.contextmanager
def ctrl_c_ignored(to_the_end: bool = False) -> Iterator[None]:
    """Run the block through any Ctrl-C or SIGTERM, which is dropped: for the line that says why a
    command stopped, which a second Ctrl-C cut (and the process then exited without the rest).
    With `to_the_end` both stay ignored after the block: the process is about to exit with its
    own status. In the main thread only; elsewhere it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        if not to_the_end:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_until_stopped(loop: asyncio.AbstractEventLoop, main: Awaitable[T]) -> T:
    """`loop.run_until_complete(main)`, where a Ctrl-C or SIGTERM cancels `main` (which unwinds as
    when any task is cancelled) and then lands as it would have: with the handler in place
    before, once the loop has stopped (Python's raises KeyboardInterrupt, so do `terminated` and a
    worker's). Python's handler raised it wherever the loop's thread was, and inside a
    connection's callback (data_received) uvloop took it for that connection's error: it closed
    the connection (its row failed, "payload_error") and went on, the Ctrl-C lost (a worker, which
    drops any later one, ran on until the parent killed it). The loop's own signal handler only
    wakes the loop. Signals whose handler is not Python's (ignored, or the default) are left as
    they are; off the main thread this is run_until_complete."""
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    handlers = {sig: h for sig, h in handlers.items() if callable(h)}
    if threading.current_thread() is not threading.main_thread() or not handlers:
        return loop.run_until_complete(main)
    task = asyncio.ensure_future(main, loop=loop)
    came: list[int] = []

    def stop(signum: int) -> None:
        if not came:  # a second one would cut the first one's unwinding short
            task.cancel()
        came.append(signum)

    for sig in handlers:
        loop.add_signal_handler(sig, stop, sig)
    try:
        result = loop.run_until_complete(task)
    except BaseException:
        if not came:
            raise
    finally:
        for sig, handler in handlers.items():
            loop.remove_signal_handler(sig)  # which puts Python's default back, not the handler before
            signal.signal(sig, handler)
    if came:
        land(came[0], handlers[came[0]])
        raise KeyboardInterrupt  # a handler that let it pass: the work was stopped all the same
    return result
