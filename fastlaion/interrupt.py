"""Ctrl-C and child processes: the terminal sends SIGINT to every process of the group, children
included, also while multiprocessing is still starting Python in them, where it prints a
traceback per child. Children are started with SIGINT blocked (`ctrl_c_held`) and take it back
where they can handle it (`release_ctrl_c`): a Ctrl-C that came in between is then delivered.
Steps that must finish together once begun (the renames that put an output in place) run under
`ctrl_c_deferred`; the line that says why a command stopped prints under `ctrl_c_ignored`."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_MASKS = hasattr(signal, "pthread_sigmask")  # not on Windows


@contextlib.contextmanager
def ctrl_c_held() -> Iterator[None]:
    """Block SIGINT in this thread while the block runs (start child processes in it: they
    inherit the mask). Blocked, not ignored: a Ctrl-C meanwhile is delivered when it ends."""
    if not _MASKS:
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def release_ctrl_c(ignore: bool = False) -> None:
    """In a child started under `ctrl_c_held`: deliver SIGINT again from here on (a pending one
    raises KeyboardInterrupt now), or, with `ignore`, drop it for good (the parent stops this
    child itself)."""
    if ignore:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _MASKS:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@contextlib.contextmanager
def ctrl_c_deferred() -> Iterator[None]:
    """Run the block to its end through a Ctrl-C, which then lands as it would have (a
    KeyboardInterrupt): for steps that must finish together, so that what a Ctrl-C's message says
    was written is what is on disk. Python's SIGINT handler is swapped, not the signal mask:
    `ctrl_c_held` holds the signal in one thread only, and the kernel hands a process's SIGINT to
    any thread that does not block it (faiss's, Polars' ...). In the main thread only (the one
    Python's handler runs in); elsewhere it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda *_: came.append(1))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if came and previous is not signal.SIG_IGN:
        if callable(previous):
            previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt
        else:
            raise KeyboardInterrupt


@contextlib.contextmanager
def ctrl_c_ignored(to_the_end: bool = False) -> Iterator[None]:
    """Run the block through any Ctrl-C, which is dropped: for the line that says why a command
    stopped, which a second Ctrl-C cut (and the process then exited without the rest). With
    `to_the_end` SIGINT stays ignored after the block: the process is about to exit with its own
    status. In the main thread only; elsewhere it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        if not to_the_end:
            signal.signal(signal.SIGINT, previous)
