"""Calibration: the one owner of every decision threshold (image, pixel, suspicion bounds, per scoring mode).

Scores and maps are computed elsewhere; this module fits thresholds on held-out labels, scores and masks, writes them
into a model's config and reads them back. Training stages, merge, refits and inference all go through it
(anomalib keeps thresholds apart from scores the same way).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class CalibrationConfig:
    """How thresholds are fitted (the recipe's `calibration` section)."""

    #: suspicion bounds = (moderate_from · t, t) for the image threshold t; 1.0 leaves no "moderately" band, so the
    #: two levels stage 2 trains on ("slightly" / "highly") split exactly at the verdict
    moderate_from: float = 0.5

    def __post_init__(self):
        if not 0.0 < self.moderate_from <= 1.0:
            raise ValueError(f"calibration moderate_from must be in (0, 1], got {self.moderate_from}")

    @classmethod
    def from_dict(cls, values: dict) -> "CalibrationConfig":
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown calibration config keys: {sorted(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)
