"""The U-Net, its loss and mask rule, the segmentation scores, and train_seg.py end to end (tiny sizes)."""
import dataclasses
import json
import math
from pathlib import Path

import keras
import numpy as np
import pytest

from ihd.dicom import AIR_HU
from ihd.labels import SUBTYPES
from ihd.mask_rules import THRESHOLD_CANDIDATES, MaskRule, RuleChoice
from ihd.masks import ANY, UNKNOWN, MaskSet
from ihd.seg_metrics import dice, pointing_hit, score_masks, volume_errors, volume_ml
from ihd.segmentation import (
    bce_dice_loss, build_unet, choose_mask_rule, compile_unet, evaluate, inside_skull, load_unet, predict_probabilities,
    subtype_masks, training_dataset,
)
from ihd.synthetic import BLEEDS


def test_plain_and_application_unets_give_six_masks_at_input_size():
    plain = build_unet("plain", 32, base_filters=4)
    assert plain.output.shape[1:] == (32, 32, len(SUBTYPES))
    assert plain.get_layer("masks").activation.__name__ == "sigmoid"
    mobile = build_unet("MobileNetV2", 64, weights="none", base_filters=4)
    assert mobile.output.shape[1:] == (64, 64, len(SUBTYPES))
    assert mobile.get_layer("block_6_expand_relu") is not None  # the encoder sits in the same flat graph
    assert mobile.get_layer("bn_Conv1").momentum == 0.9  # from scratch: moving averages that catch up in an epoch


def test_unet_refuses_what_it_cannot_build():
    with pytest.raises(ValueError, match="multiple of 32"):
        build_unet("MobileNetV2", 48, weights="none")
    with pytest.raises(ValueError, match="unknown U-Net encoder"):
        build_unet("Xception2", 64)
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_unet("plain", 64, weights="imagenet")


def test_windowing_sees_hounsfield_units():
    """Air and bone give the same windowed input whatever their exact values beyond the windows."""
    model = build_unet("plain", 16, base_filters=2)
    windowing = keras.Model(model.input, model.get_layer("windowing").output)
    hu = np.zeros((1, 16, 16, 1), np.float32)
    hu[0, :2, :2, 0] = [[-1000.0, -2000.0], [40.0, 3000.0]]
    out = np.asarray(windowing(hu))
    assert np.allclose(out[0, 0, 0], out[0, 0, 1]) and np.allclose(out[0, 1, 0], [0.5, 0.3, 0.5], atol=1e-6)


def _truth(shape=(2, 8, 8)):
    truth = np.zeros((*shape, len(SUBTYPES)), np.float32)
    truth[:, 2:5, 2:5, 1] = truth[:, 2:5, 2:5, ANY] = 1.0
    return truth


def test_loss_is_small_when_right_and_ignores_unknown_channels():
    truth = _truth()
    right = float(bce_dice_loss(truth, truth))
    wrong = float(bce_dice_loss(truth, np.zeros_like(truth)))
    assert right < 0.01
    # By hand: 36 of 768 values are blood predicted at the 1e-6 clip, and 2 of 6 channels have
    # soft Dice (0 + 1) / (18 + 1); the 4 empty channels predicted empty have Dice 1.
    assert wrong == pytest.approx(36 * -math.log(1e-6) / 768 + 2 * (1 - 1 / 19) / 6, rel=1e-4)
    unknown = truth.copy()
    unknown[..., :ANY] = UNKNOWN
    guess_a, guess_b = truth.copy(), truth.copy()
    guess_b[..., :ANY] = 1 - guess_b[..., :ANY]  # opposite subtype guesses, same `any`
    assert float(bce_dice_loss(unknown, guess_a)) == pytest.approx(float(bce_dice_loss(unknown, guess_b)), abs=1e-6)
    assert float(bce_dice_loss(truth, guess_a)) < float(bce_dice_loss(truth, guess_b))


def test_subtype_masks_are_exclusive_and_follow_any():
    probabilities = np.array([[0.1, 0.7, 0.2, 0.3, 0.4, 0.6], [0.1, 0.7, 0.2, 0.3, 0.4, 0.4],
                              [0.2, 0.1, 0.1, 0.1, 0.3, 0.9]], np.float32)
    masks = subtype_masks(probabilities, probabilities[:, ANY] >= 0.5)
    assert masks.tolist() == [[False, True, False, False, False], [False] * 5, [False, False, False, False, True]]


def test_dice_and_volume_by_hand():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[0, :4] = True
    b[0, 2:4] = True
    assert dice(a, b) == pytest.approx(2 * 2 / 6)
    assert math.isnan(dice(np.zeros(3, bool), np.zeros(3, bool)))
    with pytest.raises(ValueError, match="differ in shape"):
        dice(a, b[:2])
    assert volume_ml(np.ones((4, 5, 5), bool), (0.5, 0.5, 5.0)) == pytest.approx(100 * 1.25 / 1000)
    errors = volume_errors(np.array([2.0, 0.0, 0.0]), np.array([1.0, 3.0, 0.0]))
    assert errors == {"volume_mae_ml": 2.0, "volume_bias_ml": -1.0, "volume_cases": 2}


def test_scores_per_channel_and_case():
    truth = _truth((2, 8, 8))
    predicted = truth > 0.5
    predicted[1] = False  # the second case (slice) is missed entirely
    voxel = np.array([[1.0, 1.0, 10.0], [1.0, 1.0, 10.0]])
    scores = score_masks(predicted, truth, np.array(["a", "b"]), voxel, SUBTYPES)
    parenchymal = scores["intraparenchymal"]
    assert parenchymal["dice_pooled"] == pytest.approx(2 * 9 / 27)
    assert parenchymal["dice_mean"] == pytest.approx(0.5)  # 1 and 0
    assert parenchymal["volume_mae_ml"] == pytest.approx(0.045)  # 0 mL off, then 0.09 mL missed
    assert parenchymal["volume_bias_ml"] == pytest.approx(-0.045)
    assert math.isnan(scores["epidural"]["dice_pooled"]) and scores["epidural"]["volume_cases"] == 0
    truth[..., :ANY] = UNKNOWN
    assert set(score_masks(predicted, truth, np.array(["a", "b"]), voxel, SUBTYPES)) == {"any"}


def test_pointing_game():
    mask = np.zeros((64, 64), bool)
    mask[40:50, 10:20] = True
    heatmap = np.zeros((8, 8), np.float32)
    heatmap[5, 2] = 1.0  # rows 40-47, columns 16-23 at 64x64
    assert pointing_hit(heatmap, mask)
    heatmap[1, 6] = 2.0
    assert not pointing_hit(heatmap, mask)


def _squares(n=24, size=32, seed=0) -> MaskSet:
    """Bright squares (60 HU) on brain (30 HU): subdural in the left half, intraparenchymal in the right."""
    rng = np.random.default_rng(seed)
    hu = np.full((n, size, size), 30.0, np.float32) + rng.normal(0, 2, (n, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size, len(SUBTYPES)), np.int8)
    for i in range(n):
        row, col = rng.integers(2, size - 10), rng.integers(2, size // 2 - 8)
        subtype = BLEEDS.index("subdural") if i % 2 else BLEEDS.index("intraparenchymal")
        col += 0 if i % 2 else size // 2
        hu[i, row:row + 7, col:col + 7] = 60.0
        masks[i, row:row + 7, col:col + 7, subtype] = masks[i, row:row + 7, col:col + 7, ANY] = 1
    cases = np.array([f"case{i}" for i in range(n)])
    return MaskSet(hu, masks, cases, cases, np.ones((n, 3)), [""] * n)


def test_a_tiny_unet_learns_to_outline_bleeds():
    keras.utils.set_random_seed(0)
    squares = _squares(n=16)
    model = build_unet("plain", 32, base_filters=8)
    compile_unet(model, 1e-2, 40 * 2)
    model.fit(training_dataset(squares, 8, seed=0, augment=False), epochs=40, shuffle=False, verbose=0)
    scores = evaluate(model, squares)
    assert scores["any"]["dice_pooled"] > 0.8
    assert scores["subdural"]["dice_pooled"] > 0.6 and scores["intraparenchymal"]["dice_pooled"] > 0.6
    assert predict_probabilities(model, squares.hu[:3]).shape == (3, 32, 32, len(SUBTYPES))


def test_validation_without_blood_is_said_and_an_epoch_that_finds_none_is_kept_with_dice_n_a(tmp_path, capsys):
    from ihd.segmentation import ValidationDice

    squares = _squares(n=4)
    bleed_free = dataclasses.replace(squares, masks=np.zeros_like(squares.masks))
    model = build_unet("plain", 32, base_filters=8)
    last = model.layers[-1]

    def finding(bias):  # every pixel's logit: -30 finds no blood, +30 finds blood everywhere
        *kernels, last_bias = last.get_weights()
        last.set_weights([np.zeros_like(w) for w in kernels] + [np.full_like(last_bias, bias)])

    callback = ValidationDice(bleed_free, tmp_path)
    assert "the 4 validation slices hold no blood" in capsys.readouterr().out
    callback.set_model(model)
    finding(-30.0)
    callback.on_epoch_end(0, {"loss": 0.5})
    assert "val_dice_any n/a" in capsys.readouterr().out
    assert json.loads((tmp_path / "best.json").read_text())["val_dice_any"] is None
    finding(30.0)
    callback.on_epoch_end(1, {"loss": 0.4})
    printed = capsys.readouterr().out
    assert "val_dice_any 0.000" in printed and "best, saved" not in printed  # false blood does not beat none
    assert json.loads((tmp_path / "best.json").read_text())["epoch"] == 1
    ValidationDice(squares, tmp_path)
    assert "hold no blood" not in capsys.readouterr().out


def test_augmentation_moves_image_and_mask_together():
    squares = _squares(n=8)
    batch_hu, batch_masks = next(iter(training_dataset(squares, 8, seed=1, augment=True)))
    again, _ = next(iter(training_dataset(squares, 8, seed=1, augment=True)))
    np.testing.assert_array_equal(batch_hu, again)  # the same seed, the same augmented batch
    bright = np.asarray(batch_hu)[..., 0] > 45
    assert np.array_equal(bright, np.asarray(batch_masks)[..., ANY] > 0.5)
    unknown = squares.masks.copy()
    unknown[..., :ANY] = UNKNOWN
    _, masks = next(iter(training_dataset(dataclasses.replace(squares, masks=unknown), 8, seed=1, augment=True)))
    assert (np.asarray(masks)[..., :ANY] == UNKNOWN).all()


def test_train_seg_end_to_end(prepared_synthetic, real_data, tmp_path):
    import train_seg

    run_dir = train_seg.main([
        "--synthetic", str(prepared_synthetic / "raw"), "--encoder", "plain", "--weights", "none", "--image-size", "32",
        "--base-filters", "4", "--crop-size", "16", "--epochs", "2", "--batch-size", "8", "--run", "tiny",
        "--score-png-masks", str(real_data / "ctich_masks"), "--read-non-ct-as-hu", "--models-dir", str(tmp_path),
        "--rule-size", "64",
    ])
    assert (run_dir / "unet.keras").is_file() and (run_dir / "history.csv").is_file()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["encoder"] == "plain" and config["train_slices"] > config["val_slices"] > 0
    assert load_unet(run_dir)[0].input.shape[1:3] == (32, 32)  # trained on 16x16 crops, saved at the slice size
    scores = json.loads((run_dir / "scores.json").read_text())
    best = json.loads((run_dir / "best.json").read_text())
    assert best["rule"]["threshold"] in THRESHOLD_CANDIDATES and scores["mask_rule"] == best["rule"]
    assert (best["rule_grid"], best["epoch_rule_grid"]) == (64, 32)  # chosen again on the slices' own grid
    assert scores["epoch_rule"] == best["epoch_rule"] and best["val_dice_any_by_rule"]
    assert load_unet(run_dir)[1]["mask_rule"] == best["rule"]  # every output's rule

    again = ["--run", "tiny", "--models-dir", str(tmp_path), "--rule-only", "--rule-size", "64"]
    config_text = (run_dir / "config.json").read_text()
    train_seg.main(again)  # the trained run's rule chosen again: the same data, the same rule, the epoch's choice kept
    assert json.loads((run_dir / "best.json").read_text()) == best
    assert (run_dir / "config.json").read_text() == config_text
    assert json.loads((run_dir / "scores.json").read_text())["train_seconds"] == scores["train_seconds"]
    (run_dir / "best.json").write_text(json.dumps({"epoch": 2, "threshold": 0.9, "within_skull": False,
                                                   "val_dice_any": 0.5}))  # as runs before the HU gate saved it
    train_seg.main(again)
    upgraded = json.loads((run_dir / "best.json").read_text())
    assert upgraded["rule"] == best["rule"] and upgraded["epoch"] == 2
    assert upgraded["epoch_rule"] == MaskRule(0.9).as_json() and upgraded["epoch_rule_grid"] == 32
    with pytest.raises(SystemExit, match="no trained run"):
        train_seg.main(["--run", "absent", "--models-dir", str(tmp_path), "--rule-only"])
    recorded = json.loads(config_text)
    (run_dir / "config.json").write_text(json.dumps(recorded | {"val_cases": recorded["val_cases"][1:]}))
    with pytest.raises(SystemExit, match="validation series .* differ"):  # the data on disk changed since training
        train_seg.main(again)
    assert "any" in scores[f"{prepared_synthetic / 'raw'} validation"]
    synthetic_test = scores[f"{prepared_synthetic / 'raw'} test"]
    assert set(synthetic_test) <= set(SUBTYPES) and "any" in synthetic_test
    assert "any" in scores[str(real_data / "ctich_masks")]
    assert scores[str(real_data / "ctich_masks")]["subdural"]["slices"] == 8  # all but 071_14 (subdural and parenchymal)
    assert scores[str(real_data / "ctich_masks")]["any"]["slices"] == 9
    bad = (run_dir / "bad_inputs.csv").read_text()
    assert "truncated" in bad  # the small synthetic dataset's one cut-short file


def test_training_sources_that_give_no_masks_are_refused_saying_why(real_data, tmp_path):
    import train_seg

    flags = ["--image-size", "32", "--epochs", "1", "--models-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"absent/truth/masks: no mask files .*; leave .*absent out of --synthetic to "
                                         r"train on the others"):
        train_seg.main(["--synthetic", str(tmp_path / "absent"), "--png-masks", str(real_data / "ctich_masks"), *flags])
    with pytest.raises(SystemExit) as alone:
        train_seg.main(["--synthetic", str(tmp_path / "absent"), *flags])
    assert "no mask files" in str(alone.value) and "leave" not in str(alone.value)  # no other source to train on
    with pytest.raises(SystemExit, match=r"no training masks could be read from .*ctich_masks: 9 inputs skipped; 9 as "
                                         r"modality OT, not CT: .*\(--read-non-ct-as-hu reads them as HU\)"):
        train_seg.main(["--synthetic", "", "--png-masks", str(real_data / "ctich_masks"), *flags])


def test_segment_index_writes_aligned_outputs_and_the_table(real_data, tmp_path):
    """A U-Net whose output is "intraparenchymal everywhere" over the real tilted series: every output is checkable."""
    import highdicom
    import nibabel
    import pandas as pd
    import pydicom

    from ihd.dicom import read_hu
    from ihd.index import build_index
    from ihd.io import write_json
    from ihd.masks import LABEL_VALUES
    from ihd.segmentation import MODEL_FILE
    from ihd.seg_inference import segment_index

    model = build_unet("plain", 32, base_filters=2)
    layer = model.get_layer("masks")
    kernel, bias = layer.get_weights()
    bias[:] = -5.0
    bias[[BLEEDS.index("intraparenchymal"), ANY]] = 5.0
    layer.set_weights([np.zeros_like(kernel), bias])
    run_dir = tmp_path / "models" / "everywhere"
    run_dir.mkdir(parents=True)
    model.save(run_dir / MODEL_FILE)
    write_json(run_dir / "config.json", {"image_size": 32})

    index = build_index([(real_data / "rsna_series", "test")], tmp_path / "index", workers=1)
    bleeds = segment_index(run_dir, index, tmp_path / "out")
    out = tmp_path / "out" / "segmentation"
    series_id = index["series_id"].iloc[0]
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in index.sort_values("position")["path"]]
    spacing = [float(v) for v in headers[0].PixelSpacing]
    assert len(bleeds) == 1
    row = bleeds.iloc[0]
    assert (row.subtype, row.compartment, row.side, row.first_slice, row.last_slice) == (
        "intraparenchymal", "intra-axial", "midline", 0, 31)
    normal_gap = (float(headers[1].ImagePositionPatient[2]) - float(headers[0].ImagePositionPatient[2])) * float(
        headers[0].ImageOrientationPatient[4])  # the gantry tilts the planes: spacing along the normal
    assert row.volume_ml == pytest.approx(32 * 512 * 512 * spacing[0] * spacing[1] * normal_gap / 1000, rel=0.01)
    assert pd.read_csv(out / "bleeds.csv")["series_id"].tolist() == [series_id]

    labels = nibabel.load(out / f"{series_id}.nii.gz")
    assert labels.shape == (512, 512, 32) and (np.asarray(labels.dataobj) == LABEL_VALUES["intraparenchymal"]).all()
    first = np.asarray(headers[0].ImagePositionPatient, float)
    assert (labels.affine @ [0, 0, 0, 1])[:3] == pytest.approx(first * [-1, -1, 1], abs=1e-3)
    seg = highdicom.seg.segread(out / f"{series_id}_seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_id
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 32
    assert len(list(out.glob(f"{series_id}_*.png"))) == 32

    gate = MaskRule(0.5, False, (50.0, 90.0))  # the same U-Net under a rule with the HU gate of fresh blood
    write_json(run_dir / "best.json", {"epoch": 1, "rule": gate.as_json()})
    segment_index(run_dir, index, tmp_path / "gated")
    gated = np.asarray(nibabel.load(tmp_path / "gated" / "segmentation" / f"{series_id}.nii.gz").dataobj)
    hu = np.stack([read_hu(p) for p in index.sort_values("position")["path"]])  # (slices, rows, cols)
    blood_hu = np.transpose((hu >= 50) & (hu <= 90), (2, 1, 0))  # the NIfTI's (column, row, slice) order
    assert 0 < blood_hu.sum() < blood_hu.size
    np.testing.assert_array_equal(gated == LABEL_VALUES["intraparenchymal"], blood_hu)

    exported = tmp_path / "exported"  # four slices of the series saved as Modality OT, raw HU as CT-ICH exports them
    exported.mkdir()
    for path in index.sort_values("position")["path"].tolist()[:4]:
        ds = pydicom.dcmread(path)
        ds.Modality = "OT"
        ds.save_as(exported / Path(path).name)
    ot_index = build_index([(exported, "test")], tmp_path / "ot", workers=1, non_ct_as_hu=True)
    assert len(segment_index(run_dir, ot_index, tmp_path / "ot-refused")) == 0
    assert "modality OT" in pd.read_csv(tmp_path / "ot-refused" / "segmentation" / "skipped.csv")["reason"].item()
    assert len(segment_index(run_dir, ot_index, tmp_path / "ot-read", non_ct_as_hu=True)) > 0  # under the gated rule


def test_training_crops_keep_the_blood_in_view():
    squares = _squares(n=16, size=64)
    squares.hu[8:] = 30.0
    squares.masks[8:] = 0  # slices 8-15: no blood
    squares.hu[8:, :, :40] = AIR_HU  # only columns 40-63 are head
    for augment in (False, True):
        hu, masks = (np.asarray(t) for t in next(iter(training_dataset(squares, 16, seed=3, augment=augment,
                                                                        crop_size=16))))
        assert hu.shape == (16, 16, 16, 1) and masks.shape == (16, 16, 16, len(SUBTYPES))
        with_blood = masks[..., ANY].any(axis=(1, 2))
        assert with_blood.sum() == 8  # every crop of a bleeding slice holds blood, the others none
        assert np.array_equal(hu[with_blood, ..., 0] > 45, masks[with_blood, ..., ANY] > 0.5)  # cut together
        assert (hu[~with_blood] > AIR_HU).mean() > 0.5  # crops of the empty slices are on the head
    with pytest.raises(ValueError, match="crop size 24"):
        training_dataset(squares, 8, seed=0, crop_size=24)


def test_validation_holds_out_whole_patients():
    """Several series of one head (bleeds inserted into one background) are never split between the sides."""
    from train_seg import split_patients

    squares = _squares(n=24)
    squares.patients = np.array([f"patient{i // 4}" for i in range(24)])  # 6 patients of 4 series each
    for seed in range(5):
        train, validation = split_patients(squares, 0.34, seed)
        assert len(train) + len(validation) == 24 and not set(train) & set(validation)
        assert not set(squares.patients[train]) & set(squares.patients[validation])
        assert len(set(squares.patients[validation])) == 2  # a third of the patients, whatever their slices
    lone = dataclasses.replace(squares, patients=np.full(24, "one"))
    assert len(split_patients(lone, 0.2, 0)[1]) == 0  # one patient: nothing to hold out


def test_threshold_is_chosen_for_the_best_pooled_dice():
    probabilities = np.array([0.2, 0.42, 0.6, 0.8, 0.05])
    truth = np.array([0, 1, 1, 1, 0])
    choice = RuleChoice()
    choice.add(truth, np.zeros(5), probabilities)
    rule, best = choice.best()
    assert rule == MaskRule(0.25) and best == 1.0  # the lowest of 0.25 .. 0.40, which all find the three and nothing else
    assert choice.dices()[MaskRule(0.5)] == pytest.approx(2 * 2 / (2 + 3))
    empty = RuleChoice()
    empty.add(np.zeros(4), np.zeros(4), np.zeros(4))
    assert empty.best()[0] == MaskRule() and math.isnan(empty.best()[1])


def test_rule_counts_match_dice_by_hand_over_batches():
    """Pooled over batches, at every threshold (a value equal to a threshold is blood), gate and hull option."""
    rng = np.random.default_rng(0)
    probabilities = rng.choice([0.1, 0.3, 0.55, 0.97, 0.99, 0.995], size=(6, 20, 20))
    hull = rng.random((6, 20, 20)) < 0.7
    truth = rng.random((6, 20, 20)) < 0.3
    hu = rng.uniform(20, 120, (6, 20, 20))
    choice = RuleChoice()
    for batch in (slice(0, 2), slice(2, 6)):
        choice.add(truth[batch], hu[batch], probabilities[batch], probabilities[batch] * hull[batch])
    for rule, pooled in choice.dices().items():
        maps = probabilities * hull if rule.within_skull else probabilities
        assert pooled == pytest.approx(dice(rule.blood(maps, hu), truth)), rule
    on_thresholds = np.float32(THRESHOLD_CANDIDATES)[rng.integers(0, len(THRESHOLD_CANDIDATES), (2, 20, 20))]
    single = RuleChoice()  # float32 maps holding float32 thresholds exactly: blood in the count as in the rule
    single.add(truth[:2], hu[:2], on_thresholds)
    for rule, pooled in single.dices().items():
        assert pooled == dice(rule.blood(on_thresholds, hu[:2]), truth[:2]), rule
    with pytest.raises(ValueError, match="NaN"):
        RuleChoice().add(truth[:1], hu[:1], np.full((1, 20, 20), np.nan))


def test_rule_chosen_on_the_grid_is_the_rule_applied_there():
    """`choose_rule_on_grid`'s Dice of each candidate is that of the masks the rule makes from the resized maps."""
    from ihd.seg_inference import choose_rule_on_grid, native_probabilities

    class Brightness:  # a stand-in U-Net: `any` rises with HU around 60
        def predict_on_batch(self, x):
            return np.repeat((1 / (1 + np.exp(-(x[..., :1] - 60) / 15))).astype(np.float32), len(SUBTYPES), -1)

    rng = np.random.default_rng(0)
    hu, _ = _head(64)
    hu = np.where(hu == 35.0, rng.uniform(-20, 120, (5, 64, 64)), hu).astype(np.float32)
    masks = np.zeros((5, 64, 64, len(SUBTYPES)), np.int8)
    masks[..., ANY] = (hu > 55) & (hu < 95) & (rng.random((5, 64, 64)) < 0.8)
    slices = MaskSet(hu, masks, np.array(["c"] * 5), np.array(["p"] * 5), np.ones((5, 3)), [""] * 5)
    dices = choose_rule_on_grid(Brightness(), 32, [slices.subset(np.arange(2)), slices.subset(np.arange(2, 5))],
                                batch_size=2).dices()
    for within in (False, True):
        maps = native_probabilities(Brightness(), hu, 32, within)[..., ANY]
        for rule in [r for r in dices if r.within_skull == within]:
            assert dices[rule] == pytest.approx(dice(rule.blood(maps, hu), masks[..., ANY] > 0)), rule


def test_hu_gate_is_kept_only_where_validation_gains():
    """A map blurred past a 70 HU bleed into 35 HU brain: the gate of fresh blood cuts the blur."""
    hu = np.full((1, 32, 32), 35.0)
    hu[0, 10:20, 10:20] = 70.0
    truth = hu > 50
    blurred = np.zeros((1, 32, 32))
    blurred[0, 8:22, 8:22] = 0.9
    rule, best = choose_mask_rule(blurred, truth, np.ones_like(truth), hu)
    assert rule == MaskRule(0.1, False, (40.0, 100.0)) and best == 1.0  # the widest gate that does it
    sharp = truth * 0.9
    assert choose_mask_rule(sharp, truth, np.ones_like(truth), hu)[0] == MaskRule(0.1)  # no gain: no gate
    edge = hu.copy()
    edge[0, 10, 10:20] = 42.0  # partial volume at the bleed's edge, still blood in the truth
    truth_edge = (edge > 40) & (blurred > 0.5) & (hu > 50) | (edge == 42.0)
    assert choose_mask_rule(blurred, truth_edge, np.ones_like(truth), edge)[0].blood_hu == (40.0, 100.0)
    assert MaskRule.from_json({"threshold": 0.7, "within_skull": True}) == MaskRule(0.7, True)  # a run saved before the gate
    assert MaskRule.from_json(MaskRule(0.3, False, (50.0, 90.0)).as_json()) == MaskRule(0.3, False, (50.0, 90.0))


def _head(size=128):
    """A slice of HU: scalp (40) around a skull ring (1000) around brain (35), a table (400) below, apart."""
    rows, cols = np.mgrid[:size, :size]
    radius = np.hypot(rows - 56, cols - size / 2)
    hu = np.full((size, size), AIR_HU, np.float32)
    hu[radius < 50] = 40.0  # scalp
    hu[radius < 46] = 1000.0  # skull
    hu[radius < 42] = 35.0  # brain
    hu[118:122, 10:118] = 400.0  # the table, 12 pixels below the head
    return hu, radius


def test_inside_skull_is_the_skull_hull():
    hu, radius = _head()
    inside = inside_skull(hu)
    assert inside[radius < 45].all()  # the brain and the skull itself
    assert not inside[(radius > 47) & (hu > AIR_HU)].any() and not inside[118:122].any()  # scalp and table out
    gap = hu.copy()
    gap[:, 63:65] = np.where(gap[:, 63:65] == 1000.0, 35.0, gap[:, 63:65])  # a skull in two pieces (sutures, the base)
    assert inside_skull(gap)[radius < 40].all()
    no_bone = np.where(hu >= 400, 40.0, hu)  # below the skull, or no head CT: nothing to go by
    assert inside_skull(no_bone).all() and inside_skull(np.full((32, 32), AIR_HU)).all()


def test_mask_rule_keeps_the_skull_hull_only_where_validation_gains():
    hu, _ = _head(64)
    hu = np.stack([hu] * 2)
    skull = np.stack([inside_skull(hu[0])] * 2)
    truth = np.zeros((2, 64, 64), bool)
    truth[:, 20:28, 28:36] = True  # a bleed inside
    probabilities = truth * 0.8
    plain, best = choose_mask_rule(probabilities, truth, skull, hu)
    assert not plain.within_skull and best == 1.0  # a tie: the whole slice
    probabilities[:, 2:4, 30:34] = 0.9  # bright scalp called blood, outside the skull
    rule, best = choose_mask_rule(probabilities, truth, skull, hu)
    assert rule == MaskRule(0.1, True) and best == 1.0
    choice = RuleChoice()
    choice.add(truth, hu, probabilities, probabilities * skull)
    assert choice.dices()[MaskRule(0.85)] == pytest.approx(0.0)  # only the scalp is left
    outside = probabilities.copy()
    outside[:, 20:28, 28:36] = 0.0  # all the truth lies outside the hull: the hull would lose it
    truth_outside = outside > 0.5
    assert not choose_mask_rule(outside, truth_outside, skull, hu)[0].within_skull


def test_training_keeps_every_bleeding_slice_and_a_share_of_empty_ones():
    from train_seg import keep_some_empty

    squares = _squares(n=20)
    squares.masks[10:] = 0  # slices 10-19 have no blood
    rows = np.arange(20)
    assert keep_some_empty(squares, rows, 0.0, seed=0).tolist() == list(range(10))
    assert keep_some_empty(squares, rows, 1.0, seed=0).tolist() == list(range(20))
    half = keep_some_empty(squares, rows, 0.5, seed=0)
    assert set(range(10)) <= set(half) and 10 < len(half) < 20


@pytest.mark.parametrize("flag, value, message", [
    ("--epochs", "0", "0 is out of range: it must be at least 1"),
    ("--image-size", "-32", "-32 is out of range"),
    ("--crop-size", "-1", "-1 is out of range: it must be at least 0"),
    ("--learning-rate", "0", "'0' is not a positive number"),
    ("--empty-share", "1.5", "'1.5' is not in [0, 1]"),
    ("--val-fraction", "1", "'1' is not in (0, 1)"),
    ("--val-fraction", "0", "'0' is not in (0, 1)"),
])
def test_bad_flags_are_refused_when_parsed(flag, value, message, capsys):
    import train_seg

    with pytest.raises(SystemExit):
        train_seg.parse_args([flag, value])
    assert message in capsys.readouterr().err
    assert train_seg.parse_args(["--empty-share", "1"]).empty_share == 1.0
