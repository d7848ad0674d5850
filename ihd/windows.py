"""CT windows and channel recipes: how Hounsfield units become the three channels a CNN sees.

A window maps the HU range ``center ± width/2`` linearly onto [0, 1] and clips the rest. The
paper feeds three windows of the same slice, one per channel: brain (40/80) separates grey and
white matter and fresh blood, subdural (80/200) keeps thin collections against the bright skull
visible, soft tissue (40/380) shows the scalp and skull. The winning solution instead fed three
neighbouring slices in one window. A recipe names both ideas at once: channel ``c`` shows the
slice ``offsets[c]`` away from the current one, in ``windows[c]``.
"""
from __future__ import annotations

import math

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    """A display window in Hounsfield units."""

    name: str
    center_hu: float
    width_hu: float


WINDOWS = {
    w.name: w
    for w in (
        Window("brain", 40.0, 80.0),
        Window("subdural", 80.0, 200.0),
        Window("soft_tissue", 40.0, 380.0),
        Window("bone", 600.0, 2800.0),
    )
}


def window(hu: np.ndarray, center_hu: float, width_hu: float) -> np.ndarray:
    """Map ``center ± width/2`` HU linearly to [0, 1], clipping outside; float32."""
    low_hu = center_hu - width_hu / 2.0
    scaled = (np.asarray(hu, dtype=np.float32) - np.float32(low_hu)) / np.float32(width_hu)
    return np.clip(scaled, 0.0, 1.0)


@dataclass(frozen=True)
class ChannelRecipe:
    """Which slice (offset within the series) and which window feed each input channel."""

    name: str
    offsets: tuple[int, ...]
    windows: tuple[Window, ...]

    @property
    def spec(self) -> str:
        """The recipe as ``offset:center/width`` per channel, which ``parse_recipe`` reads back."""
        return ",".join(f"{o}:{w.center_hu:g}/{w.width_hu:g}" for o, w in zip(self.offsets, self.windows))

    @property
    def sources(self) -> tuple[int, ...]:
        """The distinct offsets the channels show, in the order of the first channel to show each: the
        slices a stack is made of, which are the channels themselves when no two channels share one."""
        return tuple(dict.fromkeys(self.offsets))

    @property
    def channel_sources(self) -> tuple[int, ...]:
        """For each channel, the position in ``sources`` of the slice it shows."""
        return tuple(self.sources.index(offset) for offset in self.offsets)

    @property
    def sources_are_channels(self) -> bool:
        """True when no two channels show the same slice: the sources, in their order, are the channels."""
        return len(self.sources) == len(self.offsets)

    @property
    def uses_neighbours(self) -> bool:
        """True when a channel shows another slice than the current one."""
        return any(self.offsets)


RECIPES = {
    "windows": ChannelRecipe("windows", (0, 0, 0), (WINDOWS["brain"], WINDOWS["subdural"], WINDOWS["soft_tissue"])),
    "adjacent": ChannelRecipe("adjacent", (-1, 0, 1), (WINDOWS["brain"],) * 3),
    # Paper 000's brain, blood and bone windows; its blood window is the subdural one (80/200), where
    # fresh blood stands out against brain and next to bone.
    "brain_blood_bone": ChannelRecipe("brain_blood_bone", (0, 0, 0), (WINDOWS["brain"], WINDOWS["subdural"], WINDOWS["bone"])),
}


def parse_recipe(spec: str) -> ChannelRecipe:
    """A preset name (``windows``, ``adjacent``, ``brain_blood_bone``) or ``offset:center/width`` per channel, comma-separated.

    ``"0:40/80,0:80/200,0:40/380"`` is the paper's recipe; ``"-1:40/80,0:40/80,1:40/80"`` the
    adjacent-slice one. Raises ValueError with the expected form on anything else.
    """
    if spec in RECIPES:
        return RECIPES[spec]
    offsets, windows = [], []
    try:
        for channel in spec.split(","):
            offset, _, center_width = channel.partition(":")
            center, width = center_width.split("/")
            offsets.append(int(offset))
            windows.append(Window(f"{float(center):g}/{float(width):g}", float(center), float(width)))
    except ValueError:
        raise ValueError(
            f"recipe {spec!r} is neither a preset ({', '.join(RECIPES)}) nor 'offset:center/width,...' "
            "such as '0:40/80,0:80/200,0:40/380'"
        ) from None
    if len(offsets) != 3 or not all(math.isfinite(w.center_hu) and 0 < w.width_hu < math.inf for w in windows):
        raise ValueError(f"recipe {spec!r} must give three channels with finite centres and positive, finite widths")
    return ChannelRecipe(spec, tuple(offsets), tuple(windows))
