"""A trained U-Net over the series of a DICOM folder: masks, overlays, NIfTI, DICOM SEG and a table of bleeds.

Per series (slices in the order of `ihd.index`): read every slice in HU, run the U-Net at its size,
resize the six probability maps back to the series' own grid (bilinear), call blood what the run's
mask rule says on that grid (`ihd.mask_rules`), and give each pixel of blood its likeliest subtype
(`ihd.segmentation.subtype_masks`). The rule is chosen on the grid it is applied to
(`choose_rule_on_grid`): a threshold that suits the model's grid does not suit the maps resized back. Then write, in ``out_dir/segmentation/``:
``<series>.nii.gz`` (label volume on the series' grid), ``<series>_seg.dcm`` (DICOM Segmentation
referencing the source slices), ``<series>_<image>.png`` (an overlay for every slice with blood), and
for all series together ``bleeds.csv``: one row per bleed with its study, series, subtype, location,
volume and thickness (`ihd.location`). A series whose slices do not form one regular grid cannot be
placed or measured: it is named in ``skipped.csv`` with the reason, and the others go on.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
from tqdm.auto import tqdm

from ihd.dicom import DicomError, read_hu
from ihd.geometry import GeometryError, series_geometry
from ihd.io import atomic_path, write_json
from ihd.location import TABLE_COLUMNS, locate_bleeds
from ihd.mask_export import write_nifti, write_overlay, write_seg
from ihd.mask_rules import MaskRule, RuleChoice
from ihd.masks import ANY, BadInput, MaskSet, write_bad_inputs
from ihd.segmentation import load_unet, predict_probabilities, skull_hulls, subtype_masks
from ihd.slices import to_model_hu

ALGORITHM = "ihd-unet"


def native_probabilities(model, hu: np.ndarray, size: int, within_skull: bool = False) -> np.ndarray:
    """U-Net probabilities (n, rows, cols, 6) of native HU slices (n, rows, cols), resized back to their grid;
    ``within_skull``: 0 outside the skull hull of each slice at the model's size (see `predict_probabilities`)."""
    small = predict_probabilities(model, np.stack([to_model_hu(s, size) for s in hu]), within_skull=within_skull)
    return _to_grid(small, hu.shape[1:])


def _to_grid(maps: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Maps (n, size, size[, channels]) resized bilinearly to (n, rows, cols[, channels])."""
    rows, cols = shape
    return np.stack([cv2.resize(m, (cols, rows), interpolation=cv2.INTER_LINEAR) for m in maps])


def choose_rule_on_grid(model, size: int, validation: Iterable[MaskSet], batch_size: int = 32) -> RuleChoice:
    """The pooled Dice of `any` of every candidate mask rule (`RuleChoice`) on validation slices at their own grid,
    where masks are made: the U-Net's maps at ``size`` resized back, with and without the skull hull.
    ``validation`` comes in parts (MaskSets at that grid, larger than the model's), so that memory holds one
    part at a time; ``.best()`` of the result is the rule to keep."""
    choice = RuleChoice()
    for part in tqdm(validation, desc="mask rule on the slices' grid", unit="part"):
        for begin in range(0, len(part), batch_size):
            hu = part.hu[begin:begin + batch_size]
            small_hu = np.stack([to_model_hu(s, size) for s in hu])
            small_any = predict_probabilities(model, small_hu)[..., ANY]
            choice.add(part.masks[begin:begin + batch_size, ..., ANY], hu, _to_grid(small_any, hu.shape[1:]),
                       _to_grid(small_any * skull_hulls(small_hu), hu.shape[1:]))
    return choice


def segment_series(model, size: int, paths: list[str], series_id: str, out_dir: Path, run: str,
                   rule: MaskRule = MaskRule(), non_ct_as_hu: bool = False) -> pd.DataFrame:
    """Segment one series (paths in slice order) under the run's mask rule (on the series' own grid), write its
    outputs; returns its bleeds (TABLE_COLUMNS). ``non_ct_as_hu``: see ``ihd.dicom.read_hu``."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    geometry = series_geometry(headers, series_id)
    hu = np.stack([read_hu(p, non_ct_as_hu) for p in paths])
    probabilities = native_probabilities(model, hu, size, rule.within_skull)
    masks = subtype_masks(probabilities, rule.blood(probabilities[..., ANY], hu))
    write_nifti(out_dir / f"{series_id}.nii.gz", masks, geometry)
    write_seg(out_dir / f"{series_id}_seg.dcm", headers, masks, geometry, ALGORITHM, run)
    for k in np.flatnonzero(masks.any(axis=(1, 2, 3))):
        image_id = Path(paths[k]).stem
        write_overlay(out_dir / f"{series_id}_{image_id}.png", hu[k], masks[k], f"slice {k}: {image_id}")
    return locate_bleeds(masks, hu, geometry)


def segment_index(run_dir: str | Path, index: pd.DataFrame, out_dir: str | Path, non_ct_as_hu: bool = False
                  ) -> pd.DataFrame:
    """Segment every series of a DICOM folder's index with the U-Net of ``run_dir`` (``non_ct_as_hu``: see
    ``ihd.dicom.read_hu``); returns the table of bleeds."""
    model, config = load_unet(run_dir)
    if config["mask_rule_grid"] in (None, config["image_size"]):
        print(f"note: the mask rule of {run_dir} was chosen on the model's grid ({config['image_size']}x"
              f"{config['image_size']}), and masks are made on each series' own: choose it there with "
              f"python train_seg.py --run {Path(run_dir).name} --models-dir {Path(run_dir).parent} --rule-only")
    out_dir = Path(out_dir) / "segmentation"
    tables, skipped = [], []
    seconds = {}
    for (study_id, series_id), rows in tqdm(index.groupby(["study_id", "series_id"], sort=False),
                                            desc="segmentation", unit="series"):
        paths = list(rows.sort_values("position")["path"])
        start = time.perf_counter()
        try:
            table = segment_series(model, int(config["image_size"]), paths, series_id, out_dir, Path(run_dir).name,
                                   MaskRule.from_json(config["mask_rule"]), non_ct_as_hu)
        except (GeometryError, DicomError) as error:
            skipped.append(BadInput(str(Path(paths[0]).parent), f"series {series_id} not segmented: {error}"))
            continue
        seconds[series_id] = round(time.perf_counter() - start, 2)
        table.insert(0, "series_id", series_id)
        table.insert(0, "study_id", study_id)
        tables.append(table)
    bleeds = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["study_id", "series_id", *TABLE_COLUMNS])
    with atomic_path(out_dir / "bleeds.csv") as tmp:
        bleeds.to_csv(tmp, index=False, float_format="%.3f")
    write_bad_inputs(out_dir / "skipped.csv", skipped)
    write_json(out_dir / "config.json", {"unet_run": str(run_dir), "unet_config": config, "seconds_per_series": seconds})
    print(f"segmentation: {len(bleeds)} bleeds in {len(tables)} series -> {out_dir / 'bleeds.csv'}"
          f"{f'; {len(skipped)} series skipped -> ' + str(out_dir / 'skipped.csv') if skipped else ''}")
    if len(bleeds):
        print(bleeds.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    return bleeds
