"""`python -m fastlaion` and the `fastlaion` console script.

A Ctrl-C while the command line starts (its imports, typer parsing the arguments, a command's own
imports), before the command's work begins (cli.user_errors), ends the process at once with one
line and exit status 130: nothing was written yet. It died by SIGINT with a traceback, or exited
130 without a word (typer's). This module imports only `signal` before that handler is in place,
so that the window it does not cover is Python's own start-up. SIGTERM likewise: one line, exit
status 143 (it died without a word).
"""

import os
import signal
import sys


def interrupted_while_starting(signum: int, frame: object) -> None:
    """SIGINT's and SIGTERM's handler until a command's work begins (cli.user_errors puts
    Python's back for SIGINT, fastlaion.interrupt.terminated for SIGTERM)."""
    for stop in (signal.SIGINT, signal.SIGTERM):  # a second signal cannot cut the line
        signal.signal(stop, signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or broken stream: the line still goes out below
            pass
    said, status = (b"terminated (SIGTERM)", 143) if signum == signal.SIGTERM else (b"interrupted", 130)
    try:
        os.write(2, said + b" while starting; nothing was written\n")
    finally:
        os._exit(status)


def main() -> None:
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored (a background job)
        signal.signal(signal.SIGINT, interrupted_while_starting)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # not ignored
        signal.signal(signal.SIGTERM, interrupted_while_starting)
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
