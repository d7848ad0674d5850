"""How commands end: an interruption and unavailable weights give a line, not a traceback."""
import os
import signal

import pytest

from ihd.backbones import WeightsUnavailable
from ihd.cli import run_command
from ihd.parallel import parallel_map


def test_an_interrupted_command_says_what_a_rerun_does_and_ends_by_the_signal(capsys, monkeypatch):
    import ihd.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    handlers, sent = {}, []
    monkeypatch.setattr(cli.signal, "signal", lambda number, handler: handlers.update({number: handler}))
    monkeypatch.setattr(cli.os, "kill", lambda pid, number: sent.append((pid, number)))
    with pytest.raises(SystemExit) as stop:
        run_command(interrupted, "rerun the same command to resume")
    assert "interrupted: rerun the same command to resume" in capsys.readouterr().err
    assert handlers == {signal.SIGINT: signal.SIG_DFL} and sent == [(os.getpid(), signal.SIGINT)]
    assert stop.value.code == 130  # only where the signal did not end the process


def test_weights_that_cannot_be_downloaded_end_the_command_with_their_message():
    def offline():
        raise WeightsUnavailable("could not download the ImageNet weights: pass --weights none")

    with pytest.raises(SystemExit, match="could not download the ImageNet weights: pass --weights none"):
        run_command(offline, "")
    calls = []
    run_command(lambda: calls.append(1), "")  # a command that ends normally returns
    with pytest.raises(ValueError):  # any other error keeps its traceback
        run_command(lambda: int("x"), "")
    assert calls == [1]


def test_worker_processes_leave_ctrl_c_to_the_parent():
    handlers = list(parallel_map(signal.getsignal, [signal.SIGINT] * 4, workers=2))
    assert handlers == [signal.SIG_IGN] * 4
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN  # the parent's own handling is untouched
