"""Where a process's threads spend their time, by sampling their Python stacks (stdlib only).

The GPU test machine has no py-spy (and may not allow ptrace), so bench/gpu_bench.py profiles its
decode+score run with this: a thread reads `sys._current_frames()` every `interval` seconds and,
per thread group (a thread's name without its number), gives the CPU time each thread used since
the previous sample (its own CPU clock, `pthread_getcpuclockid`) to the innermost Python function
it is in, with the innermost fastlaion function above it. A thread inside C (a torch op, DALI,
libjpeg-turbo through ctypes) counts under the Python function that called it, which is the
attribution wanted here; a thread blocked anywhere (a lock, a sleep, the GPU, a queue) uses no CPU
and so counts for nothing.

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
        # CPU seconds per thread group, by where its threads were when sampled
        self.busy: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.seen: collections.Counter[str] = collections.Counter()  # thread-samples per group
        self._cpu: dict[int, float] = {}  # each thread's CPU clock at the previous sample
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
                try:
                    cpu = time.clock_gettime(time.pthread_getcpuclockid(ident))
                except (OSError, AttributeError):  # the thread just ended; or not Linux
                    continue
                used, self._cpu[ident] = cpu - self._cpu.get(ident, cpu), cpu
                group = re.sub(r"[-_]?\d+(_\d+)?$", "", names.get(ident, "?")) or "?"
                self.seen[group] += 1
                if used > 0:
                    self.busy[group]["%s:%s" % _where(frame) + f" (in {_ours(frame)})"] += used

    def report(self, top: int = 6) -> list[tuple[str, str]]:
        """(thread group, summary) per group that used CPU: its threads, CPU seconds per second of
        wall time summed over them (1.0 = one core all the time), its top functions by CPU."""
        out = []
        for group, counter in sorted(self.busy.items(), key=lambda kv: -sum(kv[1].values())):
            total = sum(counter.values())
            if total < 0.01 * self.wall:  # under 1 % of a core: not where the time goes
                continue
            threads = max(1, round(self.seen[group] / max(self.samples, 1)))
            parts = ", ".join(f"{what} {100 * n / total:.0f}%" for what, n in counter.most_common(top))
            out.append((group, f"{threads} thread(s), {total / max(self.wall, 1e-9):.2f} cores busy; {parts}"))
        return out
