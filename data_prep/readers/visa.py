"""VisA reader: the split CSV (`split_csv/1cls.csv`) with columns object,split,label,image,mask.

`label` is `normal` or `anomaly`; image and mask paths are relative to the VisA root. VisA masks hold
defect ids (0 = background), so binarise them with ``mask > 0``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..images import pair_problem
from ..records import ANOMALOUS, MISSING_MASK, NORMAL, ReadResult, Record

DEFAULT_CSV = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": NORMAL, "anomaly": ANOMALOUS}


def read_visa(
    root: str | Path, csv_path: str | Path | None = None, full_check: bool = False, masks_required: bool = True
) -> ReadResult:
    """Every row of the VisA split CSV as a record; bad rows and unreadable files are problems.

    ``masks_required=False`` keeps an anomaly row without a mask path (``mask=None``: image-level labels only, as the
    `ad` evaluation takes them)."""
    root = Path(root)
    csv_path = Path(csv_path) if csv_path is not None else root / DEFAULT_CSV
    result = ReadResult()
    if not csv_path.is_file():
        result.report(str(csv_path), "split CSV not found")
        return result
    try:
        with open(csv_path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        result.report(str(csv_path), f"unreadable CSV ({error})")
        return result
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        result.report(str(csv_path), f"missing columns {missing}; expected {','.join(COLUMNS)}")
        return result
    for line, row in enumerate(rows, start=2):
        record_id = f"line {line}"
        label_text = (row.get("label") or "").strip().lower()
        if label_text not in LABELS:
            result.drop(str(csv_path), f"label {label_text!r} is not normal/anomaly", record_id)
            continue
        label = LABELS[label_text]
        image = root / (row.get("image") or "").strip()
        mask_text = (row.get("mask") or "").strip()
        mask = root / mask_text if mask_text else None
        if label == ANOMALOUS and mask is None and masks_required:
            result.drop(str(csv_path), f"{MISSING_MASK} (an anomaly row without a mask path)", record_id)
            continue
        reason = pair_problem(image, mask, full_check)
        if reason is not None:
            result.drop(str(image), reason, record_id)
            continue
        result.keep(
            Record(
                image=str(image),
                label=label,
                mask=str(mask) if mask is not None else None,
                category=(row.get("object") or "").strip(),
                split=(row.get("split") or "").strip(),
                defect_type="anomaly" if label == ANOMALOUS else None,
            )
        )
    return result
