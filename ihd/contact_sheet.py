"""Contact sheets of head CT series in the brain window: a synthetic series beside a real one.

    python -m ihd.contact_sheet --synthetic-series data/synthetic/raw --real-series ../shared/data/real/rsna_series --out docs/synthetic_vs_real.png
    python -m ihd.contact_sheet --synthetic-series ID_3075c7ff42 --raw data/synthetic/raw --out /tmp/sheet.png
    python -m ihd.contact_sheet --synthetic-series /tmp/one_series_folder --out /tmp/sheet.png

``--synthetic-series`` is a folder of one series' DICOM files, a series id (looked up among the
files of ``--raw``), or a raw dataset folder (its first series with a bleed is shown, else its
first series). Slices are ordered by their position along the slice normal.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ihd.dicom import read_header, read_hu  # noqa: E402
from ihd.io import atomic_path, run_header  # noqa: E402
from ihd.labels import read_long_labels  # noqa: E402
from ihd.windows import WINDOWS, window  # noqa: E402


@dataclass
class Settings:
    """Settings of the contact-sheet command."""

    synthetic_series: str  # a series folder, a series id, or a raw dataset folder
    real_series: str = "../shared/data/real/rsna_series"  # the real study to compare with ("" for none)
    raw: str = "data/synthetic/raw"  # where a series id is looked up
    out: str = "docs/synthetic_vs_real.png"
    columns: int = 8  # slices per row
    tile_px: int = 96  # each slice drawn at this size; keeps the PNG small


def contact_sheet(slices_hu: list[np.ndarray], columns: int = 8, tile_px: int = 96,
                  center_hu: float = WINDOWS["brain"].center_hu, width_hu: float = WINDOWS["brain"].width_hu
                  ) -> np.ndarray:
    """Tile HU slices, in the given order, into one uint8 grid image in the given window (brain by default)."""
    rows = max(1, -(-len(slices_hu) // columns))
    sheet = np.zeros((rows * tile_px, columns * tile_px), np.uint8)
    for k, hu in enumerate(slices_hu):
        shown = window(hu, center_hu, width_hu)
        tile = cv2.resize(shown, (tile_px, tile_px), interpolation=cv2.INTER_AREA)
        r, c = divmod(k, columns)
        sheet[r * tile_px:(r + 1) * tile_px, c * tile_px:(c + 1) * tile_px] = np.rint(tile * 255).astype(np.uint8)
    return sheet


def series_files(files: list[Path]) -> list[Path]:
    """Files of one series in slice order (position along the normal, ties by name)."""
    return sorted(files, key=lambda f: (read_header(f).z, f.stem))


def _pick_series(raw: Path) -> list[Path]:
    """The first training series with a bleed in a raw dataset folder (else its first series)."""
    files = sorted((raw / "stage_2_train").glob("*.dcm")) or sorted(raw.rglob("*.dcm"))
    headers = {f: read_header(f) for f in files}
    labels_path = raw / "stage_2_train.csv"
    positive = set()
    if labels_path.exists():
        labels = read_long_labels(labels_path)
        positive = set(labels.index[labels["any"] > 0])
    series = sorted({h.series_id for h in headers.values()})
    bleeding = [s for s in series if any(h.series_id == s and f.stem in positive for f, h in headers.items())]
    chosen = (bleeding or series)[0]
    return [f for f, h in headers.items() if h.series_id == chosen]


def find_series(spec: str, raw: str) -> list[Path]:
    """Resolve ``--synthetic-series``: a folder of one series, a raw dataset folder, or a series id in ``raw``."""
    path = Path(spec)
    if path.is_dir():
        if (path / "stage_2_train").is_dir() or (path / "stage_2_test").is_dir():
            return series_files(_pick_series(path))
        return series_files(sorted(path.glob("*.dcm")))
    files = [f for f in sorted(Path(raw).rglob("*.dcm")) if read_header(f).series_id == spec]
    if not files:
        raise SystemExit(f"series {spec} not found under {raw}")
    return series_files(files)


def draw(panels: list[tuple[str, np.ndarray]], out: str | Path) -> None:
    """Stack titled contact sheets vertically into one PNG."""
    heights = [sheet.shape[0] / sheet.shape[1] for _, sheet in panels]
    width_in = panels[0][1].shape[1] / 100
    figure, axes = plt.subplots(len(panels), 1, figsize=(width_in, width_in * sum(heights) + 0.4 * len(panels)),
                                gridspec_kw={"height_ratios": heights}, squeeze=False)
    for axis, (title, sheet) in zip(axes[:, 0], panels):
        axis.imshow(sheet, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        axis.set_title(title, fontsize=8)
        axis.axis("off")
    figure.tight_layout()
    with atomic_path(out) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    plt.close(figure)


def main(argv: list[str] | None = None) -> Path:
    """Draw the synthetic series (and the real one) as brain-window contact sheets into one PNG."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic-series", required=True)
    parser.add_argument("--real-series", default=Settings.real_series)
    parser.add_argument("--raw", default=Settings.raw)
    parser.add_argument("--out", default=Settings.out)
    parser.add_argument("--columns", type=int, default=Settings.columns)
    parser.add_argument("--tile-px", type=int, default=Settings.tile_px)
    settings = Settings(**vars(parser.parse_args(argv)))
    run_header(argv, settings)
    brain = WINDOWS["brain"]
    panels = []
    for name, files in (("synthetic", find_series(settings.synthetic_series, settings.raw)),
                        ("real (RSNA)", series_files(sorted(Path(settings.real_series).glob("*.dcm")))
                         if settings.real_series else [])):
        if not files:
            continue
        header = read_header(files[0])
        sheet = contact_sheet([read_hu(f) for f in files], settings.columns, settings.tile_px)
        title = (f"{name}: series {header.series_id}, {len(files)} slices, base to vertex, "
                 f"brain window {brain.center_hu:g}/{brain.width_hu:g}")
        panels.append((title, sheet))
    draw(panels, settings.out)
    print(f"wrote {settings.out}")
    return Path(settings.out)


if __name__ == "__main__":
    main()
