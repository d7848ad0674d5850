"""The mask rule: which pixels of the U-Net's `any` map are called blood, and how validation chooses it.

A rule has three parts:

- a threshold on the probability of `any`;
- optionally, blood only inside each slice's skull hull (`ihd.segmentation.inside_skull`): the maps
  are then zero outside it before the rule sees them (`predict_probabilities(within_skull=True)`);
- optionally, a gate on Hounsfield units: blood only where the slice's own HU lie in a range around
  fresh blood's 50 to 90 HU.

The U-Net works at its own size (128 or 256) and its maps are resized back to the slice's grid
(512x512 for CT) bilinearly, which smears a bleed's edge over the brain and CSF around it; the gate,
applied to the slice's own pixels, keeps only what can be blood. Validation chooses among
``THRESHOLD_CANDIDATES`` x hull or not x ``BLOOD_HU_GATES`` by the pooled Dice of `any` (`RuleChoice`),
the simpler rule winning ties: the whole slice over the hull, no gate over a gate, a narrower gate
only when it does better, the lowest threshold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MASK_THRESHOLD = 0.5  # the rule of a run that chose none
THRESHOLD_CANDIDATES = tuple(round(0.05 * k, 2) for k in range(2, 20)) + (0.97, 0.99)  # 0.10 .. 0.95, 0.97, 0.99
BLOOD_HU_GATES = (None, (40.0, 100.0), (45.0, 95.0), (50.0, 90.0))  # widest first: partial volume at a bleed's edge


@dataclass(frozen=True)
class MaskRule:
    """Blood where `any` >= ``threshold`` (within the skull hull when ``within_skull``), and, with ``blood_hu``
    (low, high), only where the slice's HU lie in that range."""

    threshold: float = MASK_THRESHOLD
    within_skull: bool = False
    blood_hu: tuple[float, float] | None = None

    def blood(self, probabilities_any: np.ndarray, hu: np.ndarray) -> np.ndarray:
        """Boolean blood mask of `any` probabilities and the HU of the same pixels (any shape, the same both);
        the maps must already be zero outside the hull when ``within_skull``."""
        blood = np.asarray(probabilities_any) >= self.threshold
        if self.blood_hu is not None:
            blood &= in_range(hu, self.blood_hu)
        return blood

    def describe(self) -> str:
        """The rule in words, for logs."""
        return (f"blood where `any` >= {self.threshold:.2f}{' inside the skull hull' if self.within_skull else ''}"
                + (f" and {self.blood_hu[0]:g} <= HU <= {self.blood_hu[1]:g}" if self.blood_hu else ""))

    def as_json(self) -> dict:
        """The rule as JSON values."""
        return {"threshold": self.threshold, "within_skull": self.within_skull,
                "blood_hu": list(self.blood_hu) if self.blood_hu else None}

    @classmethod
    def from_json(cls, values: dict) -> "MaskRule":
        """The rule of ``as_json``'s values; a run saved before a part existed gets that part's neutral value."""
        gate = values.get("blood_hu")
        return cls(float(values.get("threshold", MASK_THRESHOLD)), bool(values.get("within_skull", False)),
                   (float(gate[0]), float(gate[1])) if gate else None)


def in_range(hu: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """Where ``hu`` lies within [low, high]."""
    hu = np.asarray(hu)
    return (hu >= bounds[0]) & (hu <= bounds[1])


class RuleChoice:
    """The pooled Dice of `any` of every candidate rule over validation slices, added a batch at a time (memory
    stays that of one batch), and the best rule.

    For each hull option, gate and threshold it counts predicted and overlapping pixels; the truth count
    is shared. ``add`` takes the maps without the hull and, when the hull is a candidate, with it.
    """

    def __init__(self, thresholds: tuple[float, ...] = THRESHOLD_CANDIDATES,
                 gates: tuple[tuple[float, float] | None, ...] = BLOOD_HU_GATES):
        self.thresholds = np.asarray(sorted(thresholds), np.float64)
        self.gates = gates
        self.predicted = np.zeros((2, len(gates), len(self.thresholds)), np.int64)  # [within skull, gate, threshold]
        self.overlap = np.zeros_like(self.predicted)
        self.truth = 0
        self.hull_seen = False

    def add(self, truth_any: np.ndarray, hu: np.ndarray, whole: np.ndarray, within: np.ndarray | None = None) -> None:
        """Count one batch: truth (bool or 0/1), HU and `any` maps of the same shape; ``within``: the maps zero
        outside the hull (None: the hull is no candidate)."""
        truth = np.asarray(truth_any) > 0.5
        self.truth += int(truth.sum())
        self.hull_seen |= within is not None
        for hull, maps in enumerate((whole, within)):
            if maps is None:
                continue
            maps = np.asarray(maps)
            if np.isnan(maps).any():
                raise ValueError("the probability maps hold NaN: the U-Net's output cannot be scored")
            for g, gate in enumerate(self.gates):
                allowed = np.ones(truth.shape, bool) if gate is None else in_range(hu, gate)
                self.predicted[hull, g] += self._at_least(maps[allowed])
                self.overlap[hull, g] += self._at_least(maps[allowed & truth])

    def _at_least(self, values: np.ndarray) -> np.ndarray:
        """How many ``values`` reach each threshold, compared in the values' own precision as `MaskRule.blood`
        compares them (a float32 map against float32(threshold))."""
        thresholds = self.thresholds.astype(values.dtype) if values.dtype.kind == "f" else self.thresholds
        below = np.bincount(np.searchsorted(thresholds, values, side="right"), minlength=len(thresholds) + 1)
        return len(values) - np.cumsum(below)[:-1]

    def table(self) -> list[dict]:
        """Every candidate and its pooled Dice (None where undefined), as JSON values in the order of preference."""
        return [{"rule": rule.as_json(), "dice_any": None if math.isnan(d) else d} for rule, d in self.dices().items()]

    def dices(self) -> dict[MaskRule, float]:
        """Pooled Dice of every candidate rule, NaN where nothing is predicted or true; in the order of preference."""
        result = {}
        for hull in range(2 if self.hull_seen else 1):
            for g, gate in enumerate(self.gates):
                for t, threshold in enumerate(self.thresholds):
                    denominator = self.predicted[hull, g, t] + self.truth
                    result[MaskRule(float(threshold), bool(hull), gate)] = (
                        2.0 * self.overlap[hull, g, t] / denominator if denominator else math.nan)
        return result

    def best(self) -> tuple[MaskRule, float]:
        """The rule with the best pooled Dice, the first in the order of preference on ties; (``MaskRule()``,
        NaN) when no candidate has a Dice."""
        defined = [(rule, d) for rule, d in self.dices().items() if not math.isnan(d)]
        if not defined:
            return MaskRule(), math.nan
        top = max(d for _, d in defined)
        return next(rule for rule, d in defined if d == top), top
