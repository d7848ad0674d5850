"""How dense a head is against the inner table of its skull: real bleed-free series against phantoms.

    python bench/inner_table.py                        # the 14 rsna_normal series; 4 phantoms of seed 0
    python bench/inner_table.py --phantoms 8 --seed 3 --without-rim

For each slice in a part of its series (the middle, 45-75% of the way from its first slice to its
last, and towards the vertex, 75-90%): the median HU of the cranial cavity in rings 0.5 mm wide at
each distance from bone (over 250 HU); a series' figure is the median over its slices. Real series
are read from their DICOM files at full size (``--backgrounds``: bleed-free series in the Kaggle
layout, ``stage_2_train/``); phantoms are rendered at 512x512 with their acquisition noise
(``ihd.synthetic``), with or without their rim against the inner table. Every figure comes from
bleed-free heads: the labeled real series are not read.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ihd import synthetic  # noqa: E402
from ihd.dicom import read_header, read_hu  # noqa: E402
from ihd.io import run_header  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "real"
DISTANCES_MM = (0.5, 1.0, 1.5, 2.0, 2.5, 6.0)
PARTS = {"middle": (0.45, 0.75), "towards the vertex": (0.75, 0.9)}


def cranial_cavity(hu: np.ndarray, closing_px: int, min_cavity_px: int) -> np.ndarray | None:
    """What the bone (over 250 HU), closed over ``closing_px`` pixels, encloses; None when that holds under
    ``min_cavity_px`` pixels (the skull not closed on this slice)."""
    closed = ndimage.binary_closing(hu > 250, iterations=closing_px)
    cavity = ndimage.binary_fill_holes(closed) & ~closed
    return cavity if cavity.sum() >= min_cavity_px else None


def cavity_rings(hu: np.ndarray, distances_px, ring_px: float, closing_px: int, min_cavity_px: int) -> list[float]:
    """Median HU of the cranial cavity (`cranial_cavity`) at each of ``distances_px`` from bone (over 250 HU),
    over rings ``2 * ring_px`` wide; NaN everywhere without a cavity, and for an empty ring."""
    cavity = cranial_cavity(hu, closing_px, min_cavity_px)
    if cavity is None:
        return [np.nan] * len(distances_px)
    to_bone = ndimage.distance_transform_edt(hu <= 250)
    rings = (cavity & (np.abs(to_bone - d) < ring_px) for d in distances_px)
    return [float(np.median(hu[ring])) if ring.any() else np.nan for ring in rings]


def full_size_rings(hu: np.ndarray, mm_per_pixel: float) -> list[float]:
    """`cavity_rings` of a full-size slice at `DISTANCES_MM`, rings 0.5 mm wide."""
    return cavity_rings(hu, [d / mm_per_pixel for d in DISTANCES_MM], 0.25 / mm_per_pixel,
                        closing_px=6, min_cavity_px=5000)


def series_profile(slices: list[list[float]]) -> list[float]:
    """The median over a series' slices of their rings (NaN ignored)."""
    return np.nanmedian(np.array(slices, dtype=float), axis=0).tolist() if slices else [np.nan] * len(DISTANCES_MM)


def real_profiles(backgrounds: Path) -> dict[str, dict[str, list[float]]]:
    """Per part, per real series: its profile."""
    files = sorted((backgrounds / "stage_2_train").glob("*.dcm"))
    headers = [read_header(f) for f in files]
    table = pd.DataFrame({"path": files, "series": [h.series_id for h in headers], "z": [h.z for h in headers]})
    table["place"] = (table.groupby("series")["z"].rank() - 1) / (table.groupby("series")["z"].transform("size") - 1)
    profiles: dict[str, dict[str, list[float]]] = {part: {} for part in PARTS}
    for part, (low, high) in PARTS.items():
        for series, rows in table[(table["place"] > low) & (table["place"] < high)].groupby("series"):
            spacing_mm = float(pydicom.dcmread(rows["path"].iloc[0], stop_before_pixels=True).PixelSpacing[0])
            profiles[part][series] = series_profile([full_size_rings(read_hu(path), spacing_mm)
                                                     for path in rows["path"]])
    return profiles


def phantom_profiles(count: int, seed: int, with_rim: bool) -> dict[str, dict[str, list[float]]]:
    """Per part, per phantom of the dataset of ``seed`` (its first ``count`` studies): its profile."""
    profiles: dict[str, dict[str, list[float]]] = {part: {} for part in PARTS}
    for plan in synthetic.plan_dataset(count, 0, seed=seed)[:count]:
        phantom = synthetic.build_phantom(plan, seed)
        if not with_rim:
            phantom.cues = dataclasses.replace(phantom.cues, rim_hu=0.0)
        n = len(plan.image_ids)
        for part, (low, high) in PARTS.items():
            indices = [i for i in range(n) if low < i / (n - 1) < high]
            slices = [full_size_rings(phantom.render(i, np.random.default_rng([seed, plan.number, i]))[0],
                                      phantom.mm_per_pixel) for i in indices]
            profiles[part][plan.series_id] = series_profile(slices)
    return profiles


def print_profiles(title: str, profiles: dict[str, dict[str, list[float]]]) -> None:
    """One block per part: a row per series and the range over series."""
    print(f"\n{title}: median HU of the cranial cavity at " + ", ".join(f"{d:g}" for d in DISTANCES_MM) + " mm from bone")
    for part, by_series in profiles.items():
        print(f"  {part} of the series:")
        for series, values in by_series.items():
            print(f"    {series}: " + "  ".join(f"{v:5.0f}" for v in values))
        values = np.array(list(by_series.values()))
        low, high = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
        print("    range: " + ", ".join(f"{a:.0f} to {b:.0f}" for a, b in zip(low, high)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backgrounds", default=str(REAL / "rsna_normal"))
    parser.add_argument("--phantoms", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--without-rim", action="store_true", help="draw the phantoms without their rim")
    args = parser.parse_args(argv)
    run_header(argv, vars(args))
    print_profiles(f"real bleed-free series ({args.backgrounds})", real_profiles(Path(args.backgrounds)))
    rim = "without" if args.without_rim else "with"
    print_profiles(f"phantoms (seed {args.seed}, {rim} the inner table's rim)",
                   phantom_profiles(args.phantoms, args.seed, not args.without_rim))


if __name__ == "__main__":
    main()
