"""make paper: the paper's chain as the Makefile runs it, each command read by its own stage's parser."""
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

import predict
import prepare_data
import train_cnn
import train_lstm
from ihd.presets import stage_values

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"prepare_data.py": prepare_data, "train_cnn.py": train_cnn, "train_lstm.py": train_lstm, "predict.py": predict}
PRESET_STAGES = {"prepare_data.py": "prepare", "train_cnn.py": "cnn", "train_lstm.py": "lstm"}


@pytest.fixture(scope="module")
def chain() -> dict:
    """{script: its Settings} for every stage command of `make paper`, in the order make prints them
    (`make -n`: printed, not run), each parsed by that stage's own parse_args."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    printed = subprocess.run(["make", "--no-print-directory", "-n", "paper"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    settings = {}
    for line in printed.replace("\\\n", " ").splitlines():
        words = shlex.split(line)
        script = next((word for word in words if word in STAGES), None)
        if script is None:
            continue
        assert script not in settings, f"make paper runs {script} twice"
        arguments = words[words.index(script) + 1 :]
        try:
            settings[script] = STAGES[script].parse_args(arguments)
        except SystemExit:
            pytest.fail(f"make paper runs `{script} {' '.join(arguments)}`, which {script} refuses (see the error above)")
    return settings


def test_make_paper_runs_every_stage_once_in_order(chain):
    assert list(chain) == list(STAGES)


def test_every_stage_runs_the_papers_preset_and_no_flag_overrides_it(chain):
    for script, stage in PRESET_STAGES.items():
        assert chain[script].preset == "paper", f"{script} runs without --preset paper"
        for setting, value in stage_values("paper", stage).items():
            assert getattr(chain[script], setting) == value, (
                f"make paper's {script} gives {setting} {getattr(chain[script], setting)!r}, the paper's recipe {value!r}")


def test_the_chain_starts_from_the_download_and_ends_in_a_submission(chain):
    prepare, cnn = chain["prepare_data.py"], chain["train_cnn.py"]
    assert prepare.download and not prepare.synthetic and prepare.dicom_dir is None
    assert prepare.dataset == cnn.dataset == "rsna"
    assert chain["predict.py"].submit and chain["predict.py"].dicom_dir is None


def test_each_stage_reads_what_the_one_before_wrote(chain):
    cnn, lstm, prediction = chain["train_cnn.py"], chain["train_lstm.py"], chain["predict.py"]
    assert cnn.run == lstm.run == prediction.run, "the stages name different runs"
    assert prediction.selection in lstm.selections, f"predict.py asks for {prediction.selection}, which no LSTM trains"
    assert chain["prepare_data.py"].data_dir == cnn.data_dir == prediction.data_dir
    assert cnn.models_dir == lstm.models_dir == prediction.models_dir
    assert cnn.features_dir == lstm.features_dir == prediction.features_dir
