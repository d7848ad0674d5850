"""How the kit's commands end: with a line saying what happened, not a traceback, when the user interrupts
one or when pretrained weights cannot be downloaded."""
from __future__ import annotations

import gc
import os
import signal
import sys
from typing import Callable

from ihd.backbones import WeightsUnavailable


def run_command(main: Callable[[], object], rerun: str) -> None:
    """Run a script's ``main``. Ctrl-C ends it with a line saying what a rerun does (``rerun``), then by the
    signal itself, as an uncaught Ctrl-C would (a shell loop running it stops too); weights that cannot be
    downloaded end it with their message."""
    try:
        main()
    except KeyboardInterrupt:
        pass  # handled below, once the interrupted work's frames are gone
    except WeightsUnavailable as error:
        raise SystemExit(str(error)) from None
    else:
        return
    print(f"\ninterrupted: {rerun}", file=sys.stderr, flush=True)
    gc.collect()  # what the interrupted work held (a worker pool's semaphores) is released before the process ends
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    raise SystemExit(128 + signal.SIGINT)  # where the signal does not end the process
