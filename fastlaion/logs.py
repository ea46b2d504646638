"""Python's warnings as log records, so that they reach the user as our other warnings do.

Python prints a warning raised in a library (Pillow on a palette image with transparency bytes,
torch, open_clip) as "/path/to/PIL/Image.py:1134: UserWarning: message" and the source line under
it, straight to stderr: two lines in the middle of the progress bar, and in a worker process or a
Ray actor once per worker, beside the parent's one-line "warning: ..." records. `log_warning`
makes it a record of the "py.warnings" logger (logging.captureWarnings's name) instead, one line,
"MESSAGE (CATEGORY in PACKAGE)": the command's handler prints it (cli._setup_logging installs it
in the command's process) and a worker forwards it to the parent (workers.forwarded_logs), which
prints each message once however many workers give it. Only how a warning is shown changes: the
filters decide as before which are shown (Python's defaults: each once per place in a process,
DeprecationWarning hidden; -W and PYTHONWARNINGS; fastlaion.decode's turbojpeg filter, which
makes libjpeg's warnings errors).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

WARNINGS_LOGGER = "py.warnings"


def log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                file: TextIO | None = None, line: str | None = None) -> None:
    """`warnings.showwarning` as a WARNING record of the "py.warnings" logger: "MESSAGE
    (CATEGORY in PACKAGE)", the record's path and line the warning's. A caller that names a
    `file` gets Python's text written there, as before."""
    if file is not None:
        with contextlib.suppress(OSError):  # as Python's own: a closed stream loses the warning
            file.write(warnings.formatwarning(message, category, filename, lineno, line))
        return
    logger = logging.getLogger(WARNINGS_LOGGER)
    if logger.isEnabledFor(logging.WARNING):
        text = f"{message} ({category.__name__} in {warning_package(filename)})"
        logger.handle(logger.makeRecord(logger.name, logging.WARNING, filename, lineno, text, None, None))


@functools.lru_cache(maxsize=256)
def warning_package(filename: str) -> str:
    """The top-level package of the file a warning names ('PIL' for .../site-packages/PIL/Image.py),
    else the file's module name; never a path, which differs between a Ray cluster's nodes and
    would make one message several."""
    folder, name = os.path.split(filename)
    package = os.path.splitext(name)[0]
    while folder and os.path.isfile(os.path.join(folder, "__init__.py")):
        folder, package = os.path.split(folder)
    return package


@contextlib.contextmanager
def warnings_logged() -> Iterator[None]:
    """Within it, the warnings this process shows are records (`log_warning`); Python's way
    (or whatever was installed) after."""
    previous: Any = warnings.showwarning
    warnings.showwarning = log_warning
    try:
        yield
    finally:
        warnings.showwarning = previous


__all__ = ["WARNINGS_LOGGER", "log_warning", "warning_package", "warnings_logged"]
