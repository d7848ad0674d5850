"""Bleed masks out: PNG overlays, a NIfTI label volume aligned with the series, a DICOM Segmentation.

All three take the series' subtype masks on its own grid, (slices, rows, cols, 5) bool in BLEEDS
order and slice order along the normal (`ihd.geometry`):

- overlays: each slice with blood, in the brain window, every subtype filled in its colour;
- NIfTI (nibabel): voxel value `ihd.masks.LABEL_VALUES[subtype]` (1 to 5), 0 elsewhere, array
  (columns, rows, slices) with the series' affine to RAS in the sform (and in the qform when the
  grid is not sheared, which a qform cannot hold);
- DICOM SEG (highdicom): one binary segment per subtype, numbered like the NIfTI labels, referencing
  every source slice by its SOP Instance UID and the source series, on the source's planes, so a
  PACS viewer shows it over the scan. highdicom needs some attributes that exported or anonymised
  slices often lack; on copies of the headers (never in the source files) it gets empty values for
  missing type 2 patient and study attributes, the SOP Class from the file meta, a slice thickness
  equal to the slice spacing, and, where the series has no Frame of Reference UID, one derived from
  its Series Instance UID (every slice of one series shares one frame).
"""
from __future__ import annotations

import copy
import gzip
from pathlib import Path

import cv2
import numpy as np
import pydicom

from ihd.geometry import SeriesGeometry
from ihd.io import atomic_path
from ihd.masks import LABEL_VALUES
from ihd.synthetic import BLEEDS
from ihd.windows import WINDOWS, window

COLOURS_RGB = {"epidural": (255, 64, 64), "intraparenchymal": (255, 200, 0), "intraventricular": (64, 160, 255),
               "subarachnoid": (64, 255, 64), "subdural": (255, 64, 255)}
OVERLAY_ALPHA = 0.5
SEG_SERIES_NUMBER = 9100
TYPE2_DEFAULTS = ("PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                  "ReferringPhysicianName", "AccessionNumber", "StudyID", "SeriesNumber", "InstanceNumber")
NO_SHEAR_TOLERANCE = 1e-4


def label_volume(masks: np.ndarray) -> np.ndarray:
    """(slices, rows, cols) uint8 labels from exclusive subtype masks (..., 5): LABEL_VALUES, 0 for none."""
    labels = np.zeros(masks.shape[:3], np.uint8)
    for k, subtype in enumerate(BLEEDS):
        labels[masks[..., k]] = LABEL_VALUES[subtype]
    return labels


def overlay_rgb(hu: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """uint8 RGB (rows, cols, 3): the slice in the brain window, each subtype's mask blended in its colour."""
    brain = WINDOWS["brain"]
    grey = window(np.asarray(hu, np.float32), brain.center_hu, brain.width_hu)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for k, subtype in enumerate(BLEEDS):
        colour = np.asarray(COLOURS_RGB[subtype], np.float32) / 255
        rgb[masks[..., k]] = (1 - OVERLAY_ALPHA) * rgb[masks[..., k]] + OVERLAY_ALPHA * colour
    return np.clip(rgb * 255, 0, 255).astype(np.uint8)


def write_overlay(path: str | Path, hu: np.ndarray, masks: np.ndarray, caption: str = "") -> Path:
    """Write one slice's overlay as PNG, the subtypes present named in the top-left corner."""
    rgb = overlay_rgb(hu, masks)
    lines = [caption] if caption else []
    lines += [s for k, s in enumerate(BLEEDS) if masks[..., k].any()]
    for n, line in enumerate(lines):
        colour = COLOURS_RGB.get(line, (255, 255, 255))
        cv2.putText(rgb, line, (4, 14 + 14 * n), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1, cv2.LINE_AA)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"could not encode {path} as PNG")
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())
    return Path(path)


def write_nifti(path: str | Path, masks: np.ndarray, geometry: SeriesGeometry) -> Path:
    """Write the label volume of ``masks`` (slices, rows, cols, 5) on the series' grid as NIfTI (.nii or .nii.gz)."""
    import nibabel

    if masks.shape[:3] != (geometry.n_slices, geometry.rows, geometry.cols):
        raise ValueError(f"masks {masks.shape[:3]} do not match the series grid "
                         f"({geometry.n_slices}, {geometry.rows}, {geometry.cols})")
    affine = geometry.nifti_affine()
    image = nibabel.Nifti1Image(np.ascontiguousarray(np.transpose(label_volume(masks), (2, 1, 0))), None)
    image.set_sform(affine, code="scanner")
    columns = affine[:3, :3]
    gram = columns.T @ columns
    sheared = np.abs(gram - np.diag(np.diag(gram))).max() > NO_SHEAR_TOLERANCE * np.abs(gram).max()
    if sheared:
        image.set_qform(None, code=0)
    else:
        image.set_qform(affine, code="scanner")
    data = image.to_bytes()
    with atomic_path(path) as tmp:
        tmp.write_bytes(gzip.compress(data, compresslevel=1, mtime=0) if str(path).endswith(".gz") else data)
    return Path(path)


def _seg_source(header: pydicom.Dataset, geometry: SeriesGeometry) -> pydicom.Dataset:
    """A copy of a source header with what highdicom needs (see the module docstring)."""
    ds = copy.deepcopy(header)
    for keyword in TYPE2_DEFAULTS:
        if keyword not in ds:
            setattr(ds, keyword, None if keyword in ("SeriesNumber", "InstanceNumber") else "")
    if "SOPClassUID" not in ds:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    if "FrameOfReferenceUID" not in ds:
        ds.FrameOfReferenceUID = pydicom.uid.generate_uid(entropy_srcs=[str(ds.SeriesInstanceUID)])
    if "SliceThickness" not in ds:
        ds.SliceThickness = round(geometry.slice_spacing_mm, 6)
    return ds


def write_seg(path: str | Path, headers: list[pydicom.Dataset], masks: np.ndarray, geometry: SeriesGeometry,
              algorithm: str, version: str) -> Path:
    """Write a DICOM Segmentation of ``masks`` (slices, rows, cols, 5) over the series ``headers`` (slice order)."""
    import highdicom
    from pydicom.sr.codedict import codes

    if len(headers) != len(masks):
        raise ValueError(f"{len(headers)} source slices but {len(masks)} mask slices")
    sources = [_seg_source(h, geometry) for h in headers]
    identification = highdicom.AlgorithmIdentificationSequence(name=algorithm, version=version,
                                                               family=codes.cid7162.ArtificialIntelligence)
    descriptions = [highdicom.seg.SegmentDescription(
        segment_number=LABEL_VALUES[subtype], segment_label=subtype,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Hemorrhage, algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=identification) for subtype in BLEEDS]
    seg = highdicom.seg.Segmentation(
        source_images=sources, pixel_array=masks.astype(np.uint8), segmentation_type="BINARY",
        segment_descriptions=descriptions, series_instance_uid=highdicom.UID(), series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=highdicom.UID(), instance_number=1, manufacturer="ihd", manufacturer_model_name=algorithm,
        software_versions=version, device_serial_number="none", series_description=f"{algorithm} bleed masks")
    with atomic_path(path) as tmp:
        seg.save_as(tmp, enforce_file_format=True)
    return Path(path)
