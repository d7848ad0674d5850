"""The compartments of a real head CT series, found from its Hounsfield units alone.

Bleeds inserted into a real series must sit where they occur in a head; this module says where
that is. On every slice (smoothed a little against noise):

- bone is above ``BONE_HU``; the cranial cavity is what the bone encloses (holes of the bone
  mask) and holds soft tissue, kept as the largest 3D connected part, so orbits, sinuses and the
  scalp fall away;
- ``depth_mm`` is each cavity pixel's distance to the skull in the slice plane (bone parts of at
  least ``MIN_TABLE_MM2``: a calcification is no inner table);
- brain is cavity tissue of ``BRAIN_HU``, CSF cavity tissue of ``CSF_HU``;
- the ventricles are the deep CSF (more than ``VENTRICLE_DEPTH_MM`` from the inner table) in 3D
  parts of at least ``VENTRICLE_MIN_ML``; the rest of the CSF is fissures and cisterns; sulci too
  narrow to reach CSF density are lines ``SULCUS_CONTRAST_HU`` darker than the brain around them
  that open to the surface.

Calcifications (choroid plexus, pineal, falx) are denser than ``BRAIN_HU`` and belong to none of
brain, CSF or bone: no bleed is placed on them.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

BONE_HU = 250.0
BRAIN_HU = (18.0, 50.0)
CSF_HU = (-10.0, 16.0)
SOFT_TISSUE_HU = (-30.0, 120.0)  # what fills the cranial cavity (partial volume with bone included)
SMOOTHING_MM = 0.6
VENTRICLE_DEPTH_MM = 18.0
VENTRICLE_MIN_ML = 1.0
MIN_TABLE_MM2 = 100.0  # bone parts at least this large on a slice are skull; smaller ones are calcifications
MIN_CAVITY_MM2 = 300.0  # smaller enclosed pockets on a slice are foramina and air cells, not cranial cavity
NOISE_SMOOTHING_MM = 1.5
SULCUS_CONTEXT_MM = 4.0  # a sulcus is darker than the brain within this distance
SULCUS_CONTRAST_HU = 5.0
SULCUS_DEPTH_MM = 25.0
SURFACE_MM = 6.0  # a sulcus opens within this distance of the skull


@dataclass
class HeadAnatomy:
    """Compartment masks (n, rows, cols) of a series and the measures insertion needs."""

    smooth_hu: np.ndarray  # float32, lightly smoothed HU
    cavity: np.ndarray  # inside the inner table
    depth_mm: np.ndarray  # float32, in-plane distance to the skull inside the cavity, 0 elsewhere
    brain: np.ndarray
    csf: np.ndarray
    ventricles: np.ndarray
    sulci: np.ndarray  # CSF outside the ventricles (fissures, cisterns) and the narrower sulci open to the surface
    local_mean_hu: np.ndarray  # float32, the cavity's HU smoothed within the cavity (what blood replaces)
    noise_hu: float  # acquisition noise: robust SD of brain HU around its local mean
    spacing_mm: float

    def cavity_areas_mm2(self) -> np.ndarray:
        """Area of the cranial cavity on every slice."""
        return self.cavity.sum(axis=(1, 2)) * self.spacing_mm ** 2

    def centres_px(self) -> np.ndarray:
        """(n, 2) row and column of the cavity's centroid on every slice (the image centre where it is empty)."""
        rows, cols = self.cavity.shape[1:]
        centres = np.tile([(rows - 1) / 2, (cols - 1) / 2], (len(self.cavity), 1)).astype(np.float64)
        for index, cavity in enumerate(self.cavity):
            if cavity.any():
                centres[index] = ndimage.center_of_mass(cavity)
        return centres


def _keep_large(mask: np.ndarray, spacing_mm: float, min_area_mm2: float = MIN_CAVITY_MM2) -> np.ndarray:
    """``mask`` (one slice) without its connected parts smaller than ``min_area_mm2``."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    areas = np.bincount(labels.ravel())[1:] * spacing_mm ** 2
    return np.isin(labels, np.flatnonzero(areas >= min_area_mm2) + 1)


def _soft_tissue(smooth: np.ndarray) -> np.ndarray:
    return (smooth > SOFT_TISSUE_HU[0]) & (smooth < SOFT_TISSUE_HU[1])


def enclosed_cavity(smooth: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Soft tissue in the holes of the bone mask (gaps of a pixel or two closed): slices with a whole ring."""
    bone = smooth > BONE_HU
    closed = cv2.morphologyEx(bone.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8)).astype(bool)
    enclosed = ndimage.binary_fill_holes(closed) & ~closed & _soft_tissue(smooth)
    return _keep_large(enclosed, spacing_mm)


def _seen_cavity(smooth: np.ndarray, centre_px: tuple[float, float], spacing_mm: float) -> np.ndarray:
    """Soft tissue seen from ``centre_px`` along straight rays that cross no bone, fat or air.

    At the level of the orbits and the skull base the bone ring is open (fissures, canals): holes of
    the bone mask find nothing there, but a ray from the middle of the cranial cavity stops at the
    inner table, and one through a fissure stops at the orbital fat.
    """
    rows, cols = smooth.shape
    radius = float(np.hypot(rows, cols))
    barrier = ((smooth > BONE_HU) | (smooth < SOFT_TISSUE_HU[0])).astype(np.uint8)
    centre = (float(centre_px[1]), float(centre_px[0]))
    polar = cv2.warpPolar(barrier, (int(radius), 720), centre, radius, cv2.INTER_NEAREST)
    blocked = (np.maximum.accumulate(polar, axis=1) > 0).astype(np.uint8)
    seen = cv2.warpPolar(blocked, (cols, rows), centre, radius, cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP) == 0
    return _keep_large(seen & _soft_tissue(smooth), spacing_mm)


def _cavity(smooth: np.ndarray, spacing_mm: float) -> np.ndarray:
    """The cranial cavity of a series: enclosed slices, and between them the slices seen from their centres."""
    enclosed = np.stack([enclosed_cavity(s, spacing_mm) for s in smooth])
    found = np.flatnonzero(enclosed.any(axis=(1, 2)))
    if len(found) == 0:
        return enclosed
    centres = {int(i): ndimage.center_of_mass(enclosed[i]) for i in found}
    cavity = enclosed.copy()
    for index in range(found[0] + 1, found[-1]):
        below, above = found[found < index][-1], found[found > index][0]
        weight = (index - below) / (above - below)
        centre = tuple((1 - weight) * np.asarray(centres[below]) + weight * np.asarray(centres[above]))
        cavity[index] |= _seen_cavity(smooth[index], centre, spacing_mm)
    return _largest_3d_part(cavity)


def _largest_3d_part(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def _within_mean(values: np.ndarray, mask: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian mean of ``values`` over ``mask`` pixels only (normalised convolution), per slice."""
    weights = mask.astype(np.float32)
    out = np.zeros_like(values, dtype=np.float32)
    for index in range(len(values)):
        if not mask[index].any():
            continue
        total = cv2.GaussianBlur(values[index] * weights[index], (0, 0), sigma_px)
        norm = cv2.GaussianBlur(weights[index], (0, 0), sigma_px)
        out[index] = np.where(norm > 1e-3, total / np.maximum(norm, 1e-3), 0)
    return out


def _open_sulci(smooth: np.ndarray, brain: np.ndarray, allowed: np.ndarray, depth_mm: np.ndarray,
                spacing_mm: float) -> np.ndarray:
    """Sulci too narrow to reach CSF density: lines darker than the brain around them, open to the surface."""
    sigma_px = SULCUS_CONTEXT_MM / spacing_mm
    out = np.zeros_like(allowed)
    for index in np.flatnonzero(allowed.any(axis=(1, 2))):
        weights = brain[index].astype(np.float32)
        around = cv2.GaussianBlur(smooth[index] * weights, (0, 0), sigma_px) / np.maximum(
            cv2.GaussianBlur(weights, (0, 0), sigma_px), 1e-3)
        dark = allowed[index] & (smooth[index] < around - SULCUS_CONTRAST_HU) & (depth_mm[index] < SULCUS_DEPTH_MM)
        labels, count = ndimage.label(dark)
        if count:
            open_labels = np.unique(labels[dark & (depth_mm[index] < SURFACE_MM)])
            out[index] = np.isin(labels, open_labels[open_labels > 0])
    return out


def find_anatomy(hu: np.ndarray, spacing_mm: float, slice_step_mm: float) -> HeadAnatomy:
    """Compartments of a series ``hu`` (n, rows, cols), square pixels of ``spacing_mm``, slices ``slice_step_mm`` apart."""
    sigma_px = SMOOTHING_MM / spacing_mm
    smooth = np.stack([cv2.GaussianBlur(s, (0, 0), sigma_px) for s in hu.astype(np.float32)])
    cavity = _cavity(smooth, spacing_mm)
    not_table = [(~_keep_large(s > BONE_HU, spacing_mm, MIN_TABLE_MM2)).astype(np.uint8) for s in smooth]
    depth = np.stack([cv2.distanceTransform(t, cv2.DIST_L2, cv2.DIST_MASK_PRECISE) for t in not_table])
    depth *= cavity * np.float32(spacing_mm)
    brain = cavity & (smooth >= BRAIN_HU[0]) & (smooth <= BRAIN_HU[1])
    csf = cavity & (smooth >= CSF_HU[0]) & (smooth <= CSF_HU[1])
    deep_csf = csf & (depth > VENTRICLE_DEPTH_MM)
    labels, count = ndimage.label(deep_csf)
    voxel_ml = spacing_mm ** 2 * slice_step_mm / 1000
    big = np.flatnonzero(np.bincount(labels.ravel())[1:] * voxel_ml >= VENTRICLE_MIN_ML) + 1 if count else []
    ventricles = np.isin(labels, big)
    sulci = (csf & ~ventricles) | _open_sulci(smooth, brain, cavity & ~ventricles, depth, spacing_mm)
    local_mean = _within_mean(hu.astype(np.float32), cavity, NOISE_SMOOTHING_MM / spacing_mm)
    residual = (hu - local_mean)[brain & (depth > 3)]
    noise = float(1.4826 * np.median(np.abs(residual - np.median(residual)))) if residual.size else 0.0
    return HeadAnatomy(smooth, cavity, depth, brain, csf, ventricles, sulci, local_mean, noise, spacing_mm)
