"""How the kit's commands end: with a line saying what happened, not a traceback, when the user interrupts
one or when pretrained weights cannot be downloaded."""
from __future__ import annotations

import sys
from typing import Callable

from ihd.backbones import WeightsUnavailable

INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C (128 + SIGINT)


def run_command(main: Callable[[], object], rerun: str) -> None:
    """Run a script's ``main``. Ctrl-C ends it with status 130 and a line saying that the files written so far
    are whole and what a rerun does (``rerun``); weights that cannot be downloaded end it with their message."""
    try:
        main()
    except KeyboardInterrupt:
        print(f"\ninterrupted: every file written so far is whole; {rerun}", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED) from None
    except WeightsUnavailable as error:
        raise SystemExit(str(error)) from None
