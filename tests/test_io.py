"""The run header: every stage's log begins with the command that reruns that stage alone."""
from __future__ import annotations

import sys

import ihd.synthetic
import predict
from ihd.io import PROJECT_ROOT, invocation, run_header


def _first_line_printed_from(module_globals: dict, argv, capsys) -> str:
    """What run_header prints first when called from code whose module globals are ``module_globals``."""
    namespace = dict(module_globals, run_header=run_header)
    exec("def stage_main(argv):\n    run_header(argv, {'seed': 0})", namespace)
    namespace["stage_main"](argv)
    return capsys.readouterr().out.splitlines()[0]


def test_the_header_names_the_calling_stage_not_the_process_that_runs_it(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["demo.py", "--root", "/tmp/demo"])
    line = _first_line_printed_from(vars(predict), ["--run", "demo", "--gradcam", "2"], capsys)
    assert line == "$ python predict.py --run demo --gradcam 2"


def test_the_header_shows_this_process_arguments_when_given_none(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(PROJECT_ROOT / "predict.py"), "--run", "r1"])
    assert _first_line_printed_from(vars(predict), None, capsys) == "$ python predict.py --run r1"


def test_modules_of_the_package_run_with_dash_m_and_scripts_by_their_path_from_the_project_root(tmp_path):
    assert invocation(vars(ihd.synthetic)) == ["python", "-m", "ihd.synthetic"]
    assert invocation({"__file__": str(PROJECT_ROOT / "bench" / "input.py"), "__spec__": None}) == [
        "python", "bench/input.py"]
    elsewhere = tmp_path / "my_stage.py"
    assert invocation({"__file__": str(elsewhere), "__spec__": None}) == ["python", str(elsewhere.resolve())]
