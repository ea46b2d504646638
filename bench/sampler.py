"""Where a process's threads spend their time, by sampling their Python stacks (stdlib only).

The GPU test machine has no py-spy (and may not allow ptrace), so bench/gpu_bench.py profiles its
decode+score run with this: a thread reads `sys._current_frames()` every `interval` seconds and
counts, per thread group (a thread's name without its number), the innermost Python function
each thread is in, with the innermost fastlaion function above it. A thread inside C (a torch op,
DALI, libjpeg-turbo through ctypes) counts under the Python function that called it, which is
the attribution wanted here. A thread whose innermost function is a wait (a lock, a queue, a
future, an idle pool worker) counts as waiting.

    with Sampler() as s:
        work()
    for line in s.report():
        print(line)
"""

from __future__ import annotations

import collections
import os
import re
import sys
import threading
import time
from types import FrameType, TracebackType

# Innermost functions that mean the thread is waiting, not working.
WAITS = {("threading.py", "wait"), ("threading.py", "_wait_for_tstate_lock"), ("threading.py", "join"),
         ("queue.py", "get"), ("queue.py", "put"), ("_base.py", "result"), ("_base.py", "wait"),
         ("_base.py", "as_completed"), ("thread.py", "_worker"), ("selectors.py", "select")}


def _where(frame: FrameType) -> tuple[str, str]:
    code = frame.f_code
    return os.path.basename(code.co_filename), code.co_name


def _ours(frame: FrameType | None) -> str:
    """The innermost fastlaion (or bench) function on the stack, as file:function."""
    while frame is not None:
        path = frame.f_code.co_filename
        if f"{os.sep}fastlaion{os.sep}" in path or f"{os.sep}bench{os.sep}" in path:
            return "%s:%s" % _where(frame)
        frame = frame.f_back
    return "-"


class Sampler:
    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.samples = 0
        self.busy: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.seen: collections.Counter[str] = collections.Counter()  # thread-samples per group
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self.wall = 0.0

    def __enter__(self) -> Sampler:
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.wall = time.perf_counter() - self._t0

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval):
            names = {t.ident: t.name for t in threading.enumerate()}
            self.samples += 1
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                group = re.sub(r"[-_]?\d+(_\d+)?$", "", names.get(ident, "?")) or "?"
                self.seen[group] += 1
                leaf = _where(frame)
                if leaf in WAITS:
                    continue
                self.busy[group]["%s:%s" % leaf + f" (in {_ours(frame)})"] += 1

    def report(self, top: int = 6) -> list[tuple[str, str]]:
        """(thread group, summary) per group that did any work: threads, busy share of the wall
        time summed over its threads (1.0 = one thread busy all the time), the top functions."""
        out = []
        for group, counter in sorted(self.busy.items(), key=lambda kv: -sum(kv[1].values())):
            total = sum(counter.values())
            threads = max(1, round(self.seen[group] / max(self.samples, 1)))
            busy = total / max(self.samples, 1)
            parts = ", ".join(f"{what} {100 * n / total:.0f}%" for what, n in counter.most_common(top))
            out.append((group, f"{threads} thread(s), {busy:.2f} threads busy on average; {parts}"))
        return out
