"""How inserted blood looks next to real blood: its density and how uneven it is, bleed by bleed.

    python bench/blood_appearance.py DATASET_RAW [DATASET_RAW ...]

Real blood: the nine CT-ICH slices of ``../shared/data/real/ctich_masks`` with a radiologist's mask
(hemorrhage traced on each slice; the RSNA labeled series have no masks and are not read). Inserted
blood: each raw folder given (``prepare_data.py --synthetic --backgrounds``: ``stage_2_train/`` and its
``truth/masks``), every slice whose masks hold a bleed. On each slice and each bleed (a connected
region of its masks, at full size), inside its core (the mask less its outer ``CORE_PX`` pixels):

- density: the median HU;
- unevenness: the standard deviation of the HU smoothed over ``SMOOTH_PX`` pixels square, which the
  scanner's pixel noise hardly reaches and a clot's own texture does;
- contrast: the median HU minus that of the brain around it (``RING_PX`` pixels outside the mask,
  0-100 HU).

Both sets are at about half a millimetre a pixel (RSNA's 512 pixels over a 25 cm field, CT-ICH's 512 over
a head), so the pixel sizes above are about a millimetre and a half, three and a half, and seven.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import cpu_description  # noqa: E402
from ihd.dicom import read_hu  # noqa: E402
from ihd.synthetic import BLEEDS, load_masks  # noqa: E402

CTICH = ROOT.parent / "shared" / "data" / "real" / "ctich_masks"
CORE_PX = 3
SMOOTH_PX = 7
RING_PX = 15
MIN_CORE_PX = 30  # smaller cores say little about texture
CTICH_SUBTYPES = {"Epidural": "epidural", "Subdural": "subdural", "Intraparenchymal": "intraparenchymal",
                  "Intraventricular": "intraventricular", "Subarachnoid": "subarachnoid"}


def bleed_statistics(hu: np.ndarray, mask: np.ndarray, blood: np.ndarray | None = None) -> list[dict]:
    """One slice's HU (rows, cols) and a bleed mask (rows, cols) -> density, unevenness and contrast of each
    connected region whose core holds at least ``MIN_CORE_PX`` pixels; the brain around it leaves out ``blood``
    (every bleed on the slice; ``mask`` when None)."""
    count, regions = cv2.connectedComponents(mask.astype(np.uint8))
    smooth = cv2.blur(hu.astype(np.float32), (SMOOTH_PX, SMOOTH_PX))
    square = np.ones((2 * CORE_PX + 1, 2 * CORE_PX + 1), np.uint8)
    rows = []
    for label in range(1, count):
        region = (regions == label).astype(np.uint8)
        core = cv2.erode(region, square).astype(bool)
        if core.sum() < MIN_CORE_PX:
            continue
        ring = cv2.dilate(region, np.ones((2 * RING_PX + 1,) * 2, np.uint8)).astype(bool)
        ring &= ~(mask if blood is None else blood).astype(bool)
        ring &= (hu > 0) & (hu < 100)
        density = float(np.median(hu[core]))
        rows.append({"core_px": int(core.sum()), "density_hu": density, "unevenness_hu": float(smooth[core].std()),
                     "contrast_hu": density - float(np.median(hu[ring])) if ring.any() else np.nan})
    return rows


def real_bleeds(folder: Path = CTICH) -> pd.DataFrame:
    """Statistics of the CT-ICH slices' masked bleeds, with each slice's subtypes."""
    labels = pd.read_csv(folder / "labels.csv")
    rows = []
    for _, row in labels.iterrows():
        name = Path(row["file"]).stem
        hu = read_hu(folder / "images" / row["file"], non_ct_as_hu=True)
        mask = cv2.imread(str(folder / "masks" / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise SystemExit(f"{folder / 'masks' / name}.png: missing or unreadable")
        subtypes = "+".join(ours for theirs, ours in CTICH_SUBTYPES.items() if row[theirs])
        rows += [{"slice": name, "subtype": subtypes, **s} for s in bleed_statistics(hu, mask > 127)]
    return pd.DataFrame(rows)


def inserted_bleeds(raw: Path, limit: int | None = None) -> pd.DataFrame:
    """Statistics of the bleeds inserted in the raw folder ``raw``, each with its subtype: series in name order,
    up to the one that brings the slices measured to ``limit``; the brain around a bleed leaves out every bleed."""
    rows = []
    for series in sorted((raw / "truth" / "masks").glob("*.npz")):
        image_ids, masks = load_masks(series)
        for index in np.flatnonzero(masks.any(axis=(1, 2, 3))):
            hu = read_hu(next(path for split in ("train", "test")
                              if (path := raw / f"stage_2_{split}" / f"{image_ids[index]}.dcm").exists()))
            for k, subtype in enumerate(BLEEDS):
                if masks[index, k].any():
                    rows += [{"slice": image_ids[index], "subtype": subtype, **s}
                             for s in bleed_statistics(hu, masks[index, k], masks[index].any(axis=0))]
        if limit is not None and len({r["slice"] for r in rows}) >= limit:
            break
    return pd.DataFrame(rows)


def summary(bleeds: pd.DataFrame) -> str:
    """Medians and quartiles of each statistic over the bleeds."""
    if bleeds.empty:
        return "no bleed with a core to measure"
    parts = [f"{len(bleeds)} bleeds on {bleeds['slice'].nunique()} slices"]
    for column in ("density_hu", "unevenness_hu", "contrast_hu"):
        q1, median, q3 = np.nanpercentile(bleeds[column], [25, 50, 75])
        parts.append(f"{column.replace('_hu', '')} {median:.1f} HU ({q1:.1f}-{q3:.1f})")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw", nargs="+", type=Path, help="raw folders of inserted datasets")
    parser.add_argument("--slices", type=int, default=300,
                        help="stop reading a dataset after the series that brings its measured slices to this")
    args = parser.parse_args(argv)
    print(cpu_description())
    real = real_bleeds()
    print("median (quartiles) over bleeds; density: median HU of the core, unevenness: spread of the HU smoothed "
          f"over {SMOOTH_PX} pixels, contrast: against the brain around it")
    print(f"real (CT-ICH, radiologists' masks): {summary(real)}")
    print(real.round(1).to_string(index=False))
    for raw in args.raw:
        inserted = inserted_bleeds(raw, args.slices)
        print(f"inserted ({raw}): {summary(inserted)}")
        print(inserted.groupby("subtype")[["density_hu", "unevenness_hu", "contrast_hu"]].median().round(1)
              .to_string())


if __name__ == "__main__":
    main()
