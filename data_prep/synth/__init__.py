"""Synthetic anomaly generator (DRAEM / AnomalyGPT style).

- `families`: procedural normal images in named families (`FAMILIES`): wood, fabric, metal, carpet,
  pill, cap; hold one out as the "unseen" family of a training run.
- `defects`: foreign Perlin texture, cut-paste, scratch, crack, stain, hole, Poisson-blended patch
  (`DEFECT_TYPES`, the standard set), and a large darker or brighter region (`shading`, drawn where asked:
  `ALL_DEFECT_TYPES`), each with an exact mask (outside equal to the normal image, inside different).
  Foreign textures come from the run's other families only, so a held-out family stays unseen.
- `generate.make_sample`: one sample, reproducible from (seed, family, index) and the families its foreign textures come from.
- `writer.write_dataset`: the MVTec AD layout plus `metadata.jsonl`.
"""

from .defects import ALL_DEFECT_TYPES, DEFECT_TYPES, Defect, DefectContext, apply_defect
from .families import FAMILIES, make_normal
from .generate import Sample, make_sample
from .writer import SynthPlan, write_dataset

__all__ = [
    "ALL_DEFECT_TYPES",
    "DEFECT_TYPES",
    "FAMILIES",
    "Defect",
    "DefectContext",
    "Sample",
    "SynthPlan",
    "apply_defect",
    "make_normal",
    "make_sample",
    "write_dataset",
]
