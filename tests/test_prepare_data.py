"""Tests for prepare_data.py: the stages wired together on real files, resumability, offline --download."""
import shutil
from pathlib import Path

import pandas as pd
import pytest

import prepare_data
from ihd import synthetic
from ihd.io import read_json, write_json
from ihd.slices import SliceStore


def fake_kaggle_layout(real_data):
    """Stands in for ihd.synthetic.write_dataset: real slices and one real series in the Kaggle layout."""
    calls = []

    def write_dataset(out_dir, train_studies, test_studies, seed=0, workers=None):
        calls.append((train_studies, test_studies, seed))
        shutil.copytree(real_data / "rsna_slices", out_dir / "stage_2_train", ignore=shutil.ignore_patterns("*.csv"))
        shutil.copytree(real_data / "rsna_series", out_dir / "stage_2_test")
        shutil.copy(real_data / "rsna_slices" / "labels.csv", out_dir / "stage_2_train.csv")
        summary = {"train": {"images": 26}, "test": {"images": 32}}
        settings = synthetic.dataset_settings(train_studies, test_studies, seed)
        write_json(out_dir / "config.json",
                   {"settings": settings, "generator": synthetic.generator_version(), "summary": summary})
        return summary

    return calls, write_dataset


def test_synthetic_kaggle_layout_to_index_and_store(real_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real_write_dataset = synthetic.write_dataset
    calls, fake = fake_kaggle_layout(real_data)
    monkeypatch.setattr(synthetic, "write_dataset", fake)
    out = prepare_data.main(["--synthetic", "--small", "--seed", "3", "--dataset", "demo", "--size", "32",
                             "--folds", "3", "--workers", "1"])
    assert calls == [(synthetic.SMALL["train_studies"], synthetic.SMALL["test_studies"], 3)]
    index = pd.read_parquet(out / "index.parquet")
    assert index.groupby("split").size().to_dict() == {"test": 32, "train": 26}
    assert index.loc[index["split"] == "train", "any"].notna().sum() == 15
    assert sorted(index.loc[index["fold"] >= 0, "fold"].unique()) == [0, 1, 2]
    store = SliceStore(out / "slices")
    assert store.size == 32 and all(store.has(i) for i in index["image_id"])
    assert read_json(out / "index_config.json")["prepare_data"]["seed"] == 3

    monkeypatch.setattr(synthetic, "write_dataset", real_write_dataset)
    prepare_data.main(["--synthetic", "--small", "--seed", "3", "--dataset", "demo", "--size", "32", "--workers", "1"])
    assert len(calls) == 1


def _tree(folder):
    """Every file under ``folder``: its modification time and its bytes."""
    return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


def test_a_refused_rerun_touches_nothing(real_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real_write_dataset = synthetic.write_dataset
    calls, fake = fake_kaggle_layout(real_data)
    monkeypatch.setattr(synthetic, "write_dataset", fake)
    argv = ["--synthetic", "--small", "--seed", "3", "--dataset", "demo", "--workers", "1"]
    out = prepare_data.main([*argv, "--size", "32"])
    before = _tree(tmp_path)

    with pytest.raises(SystemExit) as stop:
        prepare_data.main([*argv, "--size", "64", "--folds", "3"])
    assert str(stop.value) == (f"{out / 'slices'} holds slices of size 32 (hu_offset 1024); asked for size 64: "
                               f"rerun with --size 32 to use it, or delete {out / 'slices'} to store the slices again at 64")
    assert _tree(tmp_path) == before
    with pytest.raises(SystemExit, match="seed 3 \\(asked for 4\\): rerun with --train-studies 4 --test-studies 2 "
                                         "--seed 3 to use it, choose another --dataset"):
        prepare_data.main(["--synthetic", "--small", "--seed", "4", "--dataset", "demo", "--size", "32"])
    assert _tree(tmp_path) == before
    assert len(calls) == 1

    monkeypatch.setattr(synthetic, "write_dataset", real_write_dataset)  # finds the dataset complete
    new_file = out / "raw" / "stage_2_test" / "ID_000000new.dcm"  # a file the header cache has not seen
    shutil.copy(next((out / "raw" / "stage_2_test").glob("*.dcm")), new_file)
    with open(out / "raw" / "stage_2_train.csv", "a") as labels:
        labels.write("ID_000000new_epidural,maybe\n")
    before = _tree(tmp_path)
    with pytest.raises(SystemExit, match="stage_2_train.csv: row .*'maybe' is not a number"):
        prepare_data.main([*argv, "--size", "32"])
    assert _tree(tmp_path) == before


def test_training_images_without_the_label_file_are_refused(real_data, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(real_data / "rsna_slices", raw / "stage_2_train", ignore=shutil.ignore_patterns("*.csv"))
    with pytest.raises(SystemExit, match=r"stage_2_train holds training images but .*stage_2_train.csv is missing"):
        prepare_data.main(["--raw", str(raw), "--data-dir", str(tmp_path / "data"), "--size", "32"])
    assert not (tmp_path / "data").exists()


def test_dicom_dir_unlabeled_test_rows_and_resume(real_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "export"
    shutil.copytree(real_data / "cq500_series", folder / "a" / "cq500")
    shutil.copytree(real_data / "rsna_series", folder / "b")
    victim = sorted((folder / "b").glob("*.dcm"))[5]
    victim.write_bytes(victim.read_bytes()[:-200_000])
    (folder / "README.txt").write_text("exported from a PACS\n")
    argv = ["--dicom-dir", str(folder), "--dataset", "mine", "--size", "32", "--workers", "2"]
    out = prepare_data.main(argv)

    index = pd.read_parquet(out / "index.parquet")
    assert len(index) == 24 + 31 and (index["split"] == "test").all() and (index["fold"] == -1).all()
    assert index["any"].isna().all() and victim.stem not in set(index["image_id"])
    rsna = index[index["path"].str.contains("/b/")]
    assert rsna["position"].tolist() == list(range(31)) and (rsna["series_length"] == 31).all()
    bad = pd.read_csv(out / "bad_files.csv")
    assert sorted(bad["path"].map(lambda p: p.rsplit("/", 1)[-1])) == sorted(["README.txt", victim.name])
    assert "truncated" in bad.loc[bad["path"].str.endswith(victim.name), "reason"].item()

    store = SliceStore(out / "slices")
    packs = {i: store.location(i)[0] for i in index["image_id"]}
    mtimes = {pack: pack.stat().st_mtime_ns for pack in set(packs.values())}
    damaged = packs[index["image_id"][0]]
    damaged.write_bytes(bytes(damaged.stat().st_size))
    prepare_data.main(argv)
    store = SliceStore(out / "slices")
    assert not damaged.exists() and all(store.location(i)[0].exists() for i in index["image_id"])
    store.read_hu(index["image_id"][0])
    assert all(pack.stat().st_mtime_ns == t for pack, t in mtimes.items() if pack != damaged)


def test_download_without_credentials_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(SystemExit) as stop:
        prepare_data.main(["--download", "--dataset", "rsna"])
    message = str(stop.value)
    assert "kaggle.json" in message and "KAGGLE_USERNAME" in message and "KAGGLE_KEY" in message
    assert str(tmp_path / "home" / ".kaggle") in message and "rules" in message
    assert "Offline, try the kit with: python prepare_data.py --synthetic --small" in message


def test_empty_raw_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="neither stage_2_train/ nor stage_2_test/"):
        prepare_data.main(["--dataset", "nothing"])


@pytest.mark.parametrize("flags, message", [
    (["--size", "0"], "argument --size: 0 is out of range: it must be from 16 to 1024 pixels a side"),
    (["--size", "64.5"], "argument --size: '64.5' is not a whole number"),
    (["--folds", "1"], "argument --folds: 1 is out of range: it must be from 2 to 127: one fold validates"),
    (["--synthetic", "--train-studies", "-1"], "argument --train-studies: -1 is out of range: it must be at least 0"),
    (["--synthetic", "--seed", "-3"], "argument --seed: -3 is out of range"),
    (["--workers", "0"], "argument --workers: 0 is out of range: it must be at least 1 (worker processes)"),
    (["--dicom-dir", "no/such/folder"], "argument --dicom-dir: no/such/folder does not exist"),
    (["--raw", "no/such/folder"], "argument --raw: no/such/folder is not a folder"),
    (["--dataset", "../elsewhere"], "argument --dataset: '../elsewhere' is not a plain name"),
    (["--small"], "--small can only be used with --synthetic"),
    (["--dicom-dir", str(Path(__file__).parent), "--train-studies", "3"],
     "--train-studies can only be used with --synthetic"),
    (["--synthetic", "--train-studies", "0", "--test-studies", "0"], "needs at least one study"),
])
def test_flags_are_checked_when_parsed(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        prepare_data.main([*flags, "--dataset", "checked"] if "--dataset" not in flags else flags)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_dicom_folder_without_files_is_refused_when_parsed(tmp_path, capsys):
    import predict

    (tmp_path / "export" / "empty series").mkdir(parents=True)
    (tmp_path / "export" / ".DS_Store").write_bytes(b"\0")  # a hidden file, which the index does not read
    for parse, flags in ((prepare_data.parse_args, []), (predict.parse_args, ["--run", "r"])):
        with pytest.raises(SystemExit):
            parse([*flags, "--dicom-dir", str(tmp_path / "export")])
        assert f"argument --dicom-dir: {tmp_path / 'export'} holds no files (hidden" in capsys.readouterr().err


def test_zero_studies_of_a_split_is_not_the_preset():
    settings = prepare_data.parse_args(["--synthetic", "--small", "--test-studies", "0"])
    assert (settings.train_studies, settings.test_studies) == (synthetic.SMALL["train_studies"], 0)


def test_a_partial_synthetic_dataset_of_older_code_is_refused_without_a_rerun_that_would_fail(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = tmp_path / "data" / "old" / "raw"
    settings = synthetic.dataset_settings(**synthetic.SMALL, seed=0)
    write_json(raw / synthetic.PROGRESS_DIR / synthetic.PROGRESS_SETTINGS,
               {**settings, "generator": {**synthetic.generator_version(), "source_sha256": "older code"}})
    with pytest.raises(SystemExit) as stop:
        prepare_data.main(["--synthetic", "--small", "--dataset", "old"])
    message = str(stop.value)
    assert "partly written synthetic dataset made by another version of the generator: source_sha256 older code" in message
    assert "rerun with" not in message
    assert message.endswith("choose another --dataset (or --raw), or delete that folder")
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["settings.json"]
