"""Segmentation on the CPU and on real masks: time per 40-slice study, Dice on CT-ICH, the pointing game.

    python bench/segment.py --unet-run seg-plain-128 --cnn-run demo
    python bench/segment.py --unet-run seg-plain-128 --runs 3 --synthetic data/synthetic/raw

Time: the study of `bench/study_latency.py` (the real RSNA series plus copies, 40 slices of 512x512)
through `ihd.seg_inference.segment_series`: DICOM read, U-Net, probabilities resized back to 512x512,
NIfTI, DICOM SEG, overlays and the table of bleeds; median of ``--runs`` after a warm-up. Baseline:
the bare U-Net on the same 40 inputs already in memory (`predict_on_batch`).

Scores on the real CT-ICH slices (`../shared/data/real/ctich_masks/`, never trained on): Dice of `any`
per slice and their mean, beside the baseline of calling every pixel between 50 and 90 HU blood; the pointing game for both localizations on the same slices: is the U-Net's
peak `any` probability inside the radiologist's mask, and is the CNN's Grad-CAM peak (for `any`)?
Chance level: the share of the head's pixels that the mask covers.
Beside the run's mask rule, CT-ICH is also scored (for comparison, chosen on nothing here) under the rule
its epoch was chosen with on the model's grid and under the best rule without an HU gate on the
slices' grid, both from its best.json. With ``--synthetic``, on that dataset's test split at 512x512: the
pooled Dice of `any` under the same rules, and the pointing game on every test slice with blood.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.machine import device_description  # noqa: E402
from bench.study_latency import write_study  # noqa: E402
from ihd.cnn import load_cnn  # noqa: E402
from ihd.dicom import read_hu  # noqa: E402
from ihd.gradcam import gradcam_heatmap  # noqa: E402
from ihd.index import build_index  # noqa: E402
from ihd.io import read_json, run_header  # noqa: E402
from ihd.mask_rules import MaskRule, in_range  # noqa: E402
from ihd.masks import ANY, MaskSet, png_mask_set, synthetic_set  # noqa: E402
from ihd.seg_inference import choose_rule_on_grid, native_probabilities, segment_series  # noqa: E402
from ihd.seg_metrics import dice, pointing_hit  # noqa: E402
from ihd.segmentation import BEST_FILE, HEAD_HU, load_unet, predict_probabilities  # noqa: E402
from ihd.slices import to_model_hu  # noqa: E402
from ihd.windows import parse_recipe  # noqa: E402

CTICH = ROOT.parent / "shared" / "data" / "real" / "ctich_masks"
BLOOD_HU = (50.0, 90.0)  # fresh blood; the baseline segmenter calls every pixel in this range blood
CT_GRID = 512  # CT-ICH's and the synthetic slices' own grid, where masks are scored


@dataclass
class Settings:
    unet_run: str = ""  # a train_seg.py run in --models-dir
    cnn_run: str = ""  # a train_cnn.py run for Grad-CAM; empty: no pointing game for Grad-CAM
    synthetic: str = ""  # a synthetic raw folder: also play the pointing game on its test slices with blood
    slices: int = 40  # a typical RSNA series holds 24 to 60 slices
    runs: int = 5  # timed runs after the warm-up; the median is reported
    models_dir: str = "models"


def compared_rules(best_path: Path) -> dict[str, MaskRule]:
    """The rules a run's rule is compared with, from its best.json when recorded: the rule its epoch was chosen
    with (on the model's grid), and the best rule without an HU gate on the slices' grid (its validation table)."""
    if not best_path.is_file():
        return {}
    best = read_json(best_path)
    rules = {"the epoch's rule": MaskRule.from_json(best["epoch_rule"])} if "epoch_rule" in best else {}
    ungated = [row for row in best.get("val_dice_any_by_rule", []) if row["dice_any"] is not None
               and MaskRule.from_json(row["rule"]).blood_hu is None]
    if ungated:
        top = max(row["dice_any"] for row in ungated)
        rules["the best rule without a gate"] = MaskRule.from_json(next(r["rule"] for r in ungated if r["dice_any"] == top))
    return rules


def time_study(model, size: int, rule: MaskRule, run: str, settings: Settings) -> dict:
    """Median seconds of segment_series on a 40-slice study, and of the bare U-Net on its inputs in memory."""
    with tempfile.TemporaryDirectory() as folder:
        study = Path(folder) / "study"
        study.mkdir()
        write_study(study, settings.slices)
        index = build_index([(study, "test")], Path(folder) / "index", workers=1).sort_values("position")
        paths, series_id = list(index["path"]), index["series_id"].iloc[0]
        inputs = np.stack([to_model_hu(read_hu(p), size) for p in paths])
        full, bare = [], []
        for run_number in range(settings.runs + 1):
            start = time.perf_counter()
            segment_series(model, size, paths, series_id, Path(folder) / f"out{run_number}", run, rule)
            full.append(time.perf_counter() - start)
            start = time.perf_counter()
            predict_probabilities(model, inputs)
            bare.append(time.perf_counter() - start)
    return {"slices": len(paths), "segment_series_s": statistics.median(full[1:]),
            "bare_unet_s": statistics.median(bare[1:])}


def pointing_game(unet, unet_size: int, rule: MaskRule, cnn, cnn_config: dict | None, masks: MaskSet) -> dict:
    """Per slice (at the masks' own size): Dice of `any` under ``rule``, and whether the U-Net's and Grad-CAM's
    peaks fall inside the true mask."""
    probabilities = native_probabilities(unet, masks.hu, unet_size, rule.within_skull)  # back on the masks' own grid
    rows = []
    for k in range(len(masks)):
        truth = masks.masks[k, ..., ANY] > 0.5
        unet_any = probabilities[k, ..., ANY]
        hu = masks.hu[k]
        row = {"name": masks.names[k], "dice": dice(rule.blood(unet_any, hu), truth),
               "threshold_dice": dice(in_range(hu, BLOOD_HU), truth),
               "chance_hit": float(truth.sum() / max(1, (hu > HEAD_HU).sum())),
               "unet_hit": pointing_hit(unet_any, truth)}
        if cnn is not None:
            size = int(cnn_config["image_size"])
            stack = np.repeat(to_model_hu(masks.hu[k], size)[..., None], len(parse_recipe(cnn_config["recipe"]).offsets), -1)
            row["gradcam_hit"] = pointing_hit(gradcam_heatmap(cnn, stack), truth)
        rows.append(row)
    return {"slices": rows, "mean_dice": float(np.nanmean([r["dice"] for r in rows])),
            "threshold_mean_dice": float(np.nanmean([r["threshold_dice"] for r in rows])),
            "chance_pointing": float(np.mean([r["chance_hit"] for r in rows])),
            "unet_pointing": float(np.mean([r["unet_hit"] for r in rows])),
            "gradcam_pointing": float(np.mean([r["gradcam_hit"] for r in rows])) if cnn is not None else None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet-run", required=True)
    parser.add_argument("--cnn-run", default=Settings.cnn_run)
    parser.add_argument("--synthetic", default=Settings.synthetic)
    parser.add_argument("--slices", type=int, default=Settings.slices)
    parser.add_argument("--runs", type=int, default=Settings.runs)
    parser.add_argument("--models-dir", default=Settings.models_dir)
    settings = Settings(**vars(parser.parse_args(argv)))
    run_header(argv, settings)
    print(f"device: {device_description()}")
    run_dir = Path(settings.models_dir) / settings.unet_run
    unet, unet_config = load_unet(run_dir)
    size = int(unet_config["image_size"])
    rule = MaskRule.from_json(unet_config["mask_rule"])
    rules = {"the run's rule": rule} | compared_rules(run_dir / BEST_FILE)
    print(f"mask rule: {rule.describe()}")
    cnn, cnn_config = (None, None)
    if settings.cnn_run:
        cnn, cnn_config = load_cnn(Path(settings.models_dir) / settings.cnn_run)
        if any(parse_recipe(cnn_config["recipe"]).offsets):
            raise SystemExit(f"{settings.cnn_run} reads neighbouring slices: the CT-ICH slices come alone")
    result = {"timing": time_study(unet, size, rule, settings.unet_run, settings)}
    timing = result["timing"]
    print(f"{timing['slices']}-slice study: segment_series {timing['segment_series_s']:.2f} s "
          f"(bare U-Net on inputs in memory {timing['bare_unet_s']:.2f} s)")
    bad = []
    ctich_masks = png_mask_set(CTICH, CT_GRID, bad, non_ct_as_hu=True)
    result["ctich"] = pointing_game(unet, size, rule, cnn, cnn_config, ctich_masks)
    for row in result["ctich"]["slices"]:
        print(f"  {row['name']}: dice {row['dice']:.3f} (HU threshold {row['threshold_dice']:.3f})  U-Net peak {'in' if row['unet_hit'] else 'out'}"
              + (f"  Grad-CAM peak {'in' if row['gradcam_hit'] else 'out'}" if cnn is not None else ""))
    ctich = result["ctich"]
    print(f"CT-ICH ({len(ctich['slices'])} slices): mean Dice {ctich['mean_dice']:.3f} (HU threshold baseline "
          f"{ctich['threshold_mean_dice']:.3f}); pointing game U-Net {ctich['unet_pointing']:.2f}, Grad-CAM "
          f"{ctich['gradcam_pointing']}, a random point in the head {ctich['chance_pointing']:.3f}")
    result["ctich_mean_dice_by_rule"] = {name: pointing_game(unet, size, r, None, None, ctich_masks)["mean_dice"]
                                         for name, r in rules.items()}
    print("CT-ICH mean Dice of `any` by rule: " + "; ".join(f"{name} ({rules[name].describe()}) {d:.3f}"
                                                           for name, d in result["ctich_mean_dice_by_rule"].items()))
    if settings.synthetic:
        test = synthetic_set(settings.synthetic, "test", CT_GRID, bad)
        by_rule = choose_rule_on_grid(unet, size, [test]).dices()  # every candidate's Dice, read here, chosen on nothing
        result["synthetic_dice_any"] = {name: by_rule.get(r, math.nan) for name, r in rules.items()}
        for name, r in rules.items():
            print(f"synthetic test ({len(test)} slices at {CT_GRID}x{CT_GRID}), pooled Dice of `any` under "
                  f"{name} ({r.describe()}): {result['synthetic_dice_any'][name]:.3f}")
        with_blood = np.flatnonzero((test.masks[..., ANY] > 0.5).any(axis=(1, 2)))
        game = pointing_game(unet, size, rule, cnn, cnn_config, test.subset(with_blood))
        result["synthetic_pointing"] = {k: v for k, v in game.items() if k != "slices"} | {"slices": len(with_blood)}
        print(f"synthetic test slices with blood ({len(with_blood)}): {result['synthetic_pointing']}")
    return result


if __name__ == "__main__":
    main()
