"""Tests for prepare_data.py: the stages wired together on real files, resumability, offline --download."""
import shutil

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
        write_json(out_dir / "config.json", {"settings": {"train_studies": train_studies,
                                                          "test_studies": test_studies, "seed": seed}})
        return {"train": {"images": 26}, "test": {"images": 32}}

    return calls, write_dataset


def test_synthetic_kaggle_layout_to_index_and_store(real_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
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

    prepare_data.main(["--synthetic", "--small", "--seed", "3", "--dataset", "demo", "--size", "32", "--workers", "1"])
    assert len(calls) == 1
    with pytest.raises(SystemExit, match="choose another --dataset"):
        prepare_data.main(["--synthetic", "--small", "--seed", "4", "--dataset", "demo", "--size", "32"])


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


def test_empty_raw_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="neither stage_2_train/ nor stage_2_test/"):
        prepare_data.main(["--dataset", "nothing"])
