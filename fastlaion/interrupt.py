"""Ctrl-C and child processes: the terminal sends SIGINT to every process of the group, children
included, also while multiprocessing is still starting Python in them, where it prints a
traceback per child. Children are started with SIGINT blocked (`ctrl_c_held`) and take it back
where they can handle it (`release_ctrl_c`): a Ctrl-C that came in between is then delivered."""

from __future__ import annotations

import contextlib
import signal
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
