"""Every script under bench/ imports: a name moved or removed elsewhere in the kit breaks it here, not in a
benchmark run hours later."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

SCRIPTS = sorted(path.stem for path in (Path(__file__).resolve().parents[1] / "bench").glob("*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_bench_script_imports(name):
    module = importlib.import_module(f"bench.{name}")
    assert callable(getattr(module, "main", None)) or name in ("fixtures", "machine")


def test_rehearsal_counts_the_memory_and_cpu_of_a_stage_and_its_workers(tmp_path):
    """A stage whose worker holds 300 MB and computes for 1.5 s: the rehearsal counts both, though the stage's own
    process is small and idle and never waits for the worker."""
    import sys

    from bench.rehearsal import measure
    worker = ("import time; block = bytearray(300 << 20); block[::4096] = b'x' * len(block[::4096]); "
              "end = time.process_time() + 1.5\nwhile time.process_time() < end: pass\ntime.sleep(1)")
    # as a pool's workers under multiprocessing's forkserver: the worker's parent is a process the stage never waits for
    middle = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {worker!r}], check=True)"
    stage = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {middle!r}]); time.sleep(4)"
    result = measure([sys.executable, "-c", stage], tmp_path / "stage.log")
    assert result["peak_tree_pss_bytes"] >= 300 << 20
    assert result["largest_process_rss_bytes"] >= 300 << 20
    assert 4 <= result["seconds"] < 30
    assert 1.4 <= result["cpu_seconds"] <= result["seconds"] * 2  # the worker's busy loop, not only the stage's


def test_segment_bench_compares_the_runs_rule_with_the_epochs_and_the_best_without_a_gate(tmp_path):
    from bench.segment import compared_rules
    from ihd.io import write_json
    from ihd.mask_rules import MaskRule

    assert compared_rules(tmp_path / "best.json") == {}  # a run without one: nothing to compare
    table = [{"rule": MaskRule(0.5).as_json(), "dice_any": 0.6}, {"rule": MaskRule(0.6, True).as_json(), "dice_any": 0.7},
             {"rule": MaskRule(0.7, True).as_json(), "dice_any": 0.7}, {"rule": MaskRule(0.1).as_json(), "dice_any": None},
             {"rule": MaskRule(0.3, True, (50.0, 90.0)).as_json(), "dice_any": 0.9}]
    write_json(tmp_path / "best.json", {"rule": MaskRule(0.3, True, (50.0, 90.0)).as_json(), "val_dice_any_by_rule": table,
                                        "epoch_rule": MaskRule(0.9, True).as_json()})
    assert compared_rules(tmp_path / "best.json") == {"the epoch's rule": MaskRule(0.9, True),
                                                       "the best rule without a gate": MaskRule(0.6, True)}


def test_inner_table_rings_read_the_cavity_at_each_distance_from_bone():
    """A skull ring enclosing 30 HU with a 100 HU band 2 pixels in: the rings find the band and the brain, and
    a slice whose skull is open has no cavity to read."""
    import numpy as np

    from bench.inner_table import cavity_rings

    rows, cols = np.mgrid[:128, :128]
    radius = np.hypot(rows - 64, cols - 64)
    hu = np.where(radius < 50, 30.0, -1000.0)
    hu[(radius >= 50) & (radius < 55)] = 1200.0
    hu[(radius > 47.5) & (radius < 48.5)] = 100.0
    assert cavity_rings(hu, [2, 10], ring_px=0.5, closing_px=3, min_cavity_px=500) == [100.0, 30.0]
    hu[:, 60:68] = np.where(radius[:, 60:68] >= 50, -1000.0, hu[:, 60:68])  # a gap through the skull
    assert np.isnan(cavity_rings(hu, [2, 10], ring_px=0.5, closing_px=3, min_cavity_px=500)).all()


def test_held_out_heads_are_whole_series_and_a_new_split_leaves_no_link_of_the_old(tmp_path, capsys):
    """Each series of the backgrounds lands on one side only, with its own label rows; a file that is not DICOM is
    named and left out; splitting again with fewer training heads leaves no stale link on the training side."""
    import os

    import pandas as pd

    from bench.inserted_transfer import split_heads
    from bench.phantom_transfer import REAL

    source = REAL / "rsna_normal"
    backgrounds = tmp_path / "normal"
    (backgrounds / "stage_2_train").mkdir(parents=True)
    files = sorted((source / "stage_2_train").glob("*.dcm"))[:120]
    for path in files:
        os.symlink(path, backgrounds / "stage_2_train" / path.name)
    (backgrounds / "stage_2_train" / "ID_broken.dcm").write_bytes(b"not a DICOM file")
    (backgrounds / "stage_2_train.csv").write_text((source / "stage_2_train.csv").read_text())

    def sides(training_heads):
        training, held_out = split_heads(backgrounds, training_heads, tmp_path / "heads")
        return [{p.stem for p in (side / "stage_2_train").iterdir()} for side in (training, held_out)], training

    (train_ids, held_ids), training = sides(2)
    assert "ID_broken.dcm" in capsys.readouterr().out
    assert not train_ids & held_ids and train_ids | held_ids == {p.stem for p in files}
    labels = pd.read_csv(training / "stage_2_train.csv")
    assert set(labels["ID"].str.rsplit("_", n=1).str[0]) == train_ids
    (fewer, _), _ = sides(1)
    assert fewer < train_ids


def test_blood_statistics_read_density_unevenness_and_contrast_of_each_bleed():
    """Two bleeds in 30 HU brain: one of 70 HU throughout, one whose halves are 55 and 75 HU. Each is measured
    on its own core: the flat one has no unevenness, the split one about half their difference; a bleed too
    thin for a core is left out; and the real CT-ICH slices give one row per masked bleed."""
    import numpy as np

    from bench.blood_appearance import bleed_statistics, real_bleeds

    hu = np.full((128, 128), 30.0, np.float32)
    mask = np.zeros((128, 128), bool)
    mask[10:40, 10:40] = True
    hu[10:40, 10:40] = 70.0
    mask[60:100, 60:100] = True
    hu[60:100, 60:80], hu[60:100, 80:100] = 55.0, 75.0
    mask[120:122, 10:60] = True  # 2 pixels thick: no core
    hu[120:122, 10:60] = 70.0
    flat, split = sorted(bleed_statistics(hu, mask), key=lambda row: row["unevenness_hu"])
    assert (flat["density_hu"], flat["unevenness_hu"], flat["contrast_hu"]) == (70.0, 0.0, 40.0)
    assert flat["core_px"] == 24 * 24
    assert split["density_hu"] == 65.0 and 7.0 < split["unevenness_hu"] < 10.0 and split["contrast_hu"] == 35.0
    real = real_bleeds()
    assert len(real) >= 8 and real["slice"].nunique() >= 8
    assert real["density_hu"].between(40, 80).all()


def test_saved_transfer_rows_are_scored_again_when_the_validation_set_was_inserted_by_other_code(tmp_path):
    """A validation set remade by a changed inserter keeps its settings: the record that decides whether saved rows
    still hold must tell the two sets apart all the same."""
    import json

    from bench.phantom_transfer import validation_record

    config = {"settings": {"backgrounds": "/heads", "seed": 301}, "generator": {"source": "a"}, "summary": {}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    before = validation_record(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "generator": {"source": "b"}}))
    assert validation_record(tmp_path) != before
    assert validation_record(tmp_path)["settings"] == before["settings"]


def test_the_real_scores_table_puts_each_interval_under_its_column_with_the_intervals_notes():
    import numpy as np

    from bench.synthetic_to_real import table
    from ihd.intervals import study_intervals
    from ihd.labels import SUBTYPES
    from ihd.report import span_text

    rng = np.random.default_rng(4)
    study_ids = np.repeat(np.arange(6), 4)
    y_true = np.zeros((24, len(SUBTYPES)))
    y_true[:8] = 1  # 2 studies bleed, 4 do not
    predictions = {name: np.clip(0.3 * y_true + rng.random(y_true.shape) * 0.6, 0.01, 0.99)
                   for name in ("cnn", "cnn+lstm")}
    predictions["prior"] = np.full_like(y_true, 0.3)
    intervals = study_intervals(y_true, predictions, study_ids, ("prior", "cnn"))
    aucs = {s: 0.5 for s in SUBTYPES}
    real = {"models": {name: {"weighted_log_loss": loss, "slice_auc": aucs, "study_auc": {"any": 0.5}}
                       for name, loss in (("cnn+lstm", 0.18), ("cnn", 0.19), ("prior", 0.23))},
            "intervals": intervals}
    text = table({"inserted": {"selection": "pca:32", "synthetic_test": {"cnn+lstm": 0.15}, "real": real}})
    bounds = intervals["models"]["cnn+lstm"]
    assert (f"| -0.0500 ({span_text(bounds['loss_minus_prior'], 4)}) | 0.1900 | 0.500 "
            f"({span_text(bounds['slice_auc_any'], 3)}) |") in text
    assert "resamples of the 6 real studies (2 with a bleed)" in text
    assert "from 2 studies with a bleed (under 30) such intervals are likely too narrow" in text


def test_study_latency_times_every_stage_of_a_real_series_through_an_untrained_chain(tmp_path):
    from bench import study_latency

    settings = study_latency.Settings(slices=34, backbone="tiny", image_size=32, selected=8)
    folder = tmp_path / "study"
    folder.mkdir()
    study_latency.write_study(folder, settings.slices)
    assert len(list(folder.glob("*.dcm"))) == 34  # the real series' 32 slices and two shifted copies
    stages = study_latency.one_study(study_latency.untrained_chain(settings), folder, tmp_path / "out")
    assert set(stages) == {"index headers", "read DICOM + resize + stack", "CNN", "selection + LSTM",
                           "Grad-CAM + picture", "total"}
    assert stages["total"] == pytest.approx(sum(v for k, v in stages.items() if k != "total"))
    assert (tmp_path / "out" / "gradcam.png").is_file()
