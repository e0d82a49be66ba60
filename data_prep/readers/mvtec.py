"""MVTec AD layout reader (also reads the synthetic generator's output).

    <root>/<class>/train/good/*.png
    <root>/<class>/test/good/*.png                      normal test images
    <root>/<class>/test/<defect>/<name>.png             anomalous test images
    <root>/<class>/ground_truth/<defect>/<name>_mask.png

`root` may also be a single class folder (one that holds `train/` or `test/`).

Image folders sorted by label (anomalib's `Folder` habit) read as a class without a training split:

    <class>/good/*.png                                   normal images
    <class>/<defect>/*.png                               anomalous images (any other folder)
    <class>/ground_truth/<defect>/<name>_mask.png        optional masks, named as MVTec AD names them

Their images are test records (`split="test"`); `<class>` may be `root` itself or a folder under it.
"""

from __future__ import annotations

from pathlib import Path

from ..images import is_image_file, pair_problems
from ..records import ANOMALOUS, MISSING_MASK, NORMAL, ReadResult, Record

GOOD = "good"


def class_dirs(root: Path) -> list[Path]:
    """The class folders under `root`, or `[root]` when `root` is itself a class folder."""
    if _is_class_dir(root):
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and _is_class_dir(p))


def _is_class_dir(path: Path) -> bool:
    return (path / "train").is_dir() or (path / "test").is_dir() or (path / GOOD).is_dir()


def _label_folders(class_dir: Path) -> bool:
    """Whether `class_dir` holds its images in label folders (good/, <defect>/) rather than train/ and test/."""
    return not (class_dir / "train").is_dir() and not (class_dir / "test").is_dir()


def read_mvtec(root: str | Path, full_check: bool = False, masks_required: bool = True) -> ReadResult:
    """Every image of an MVTec-layout tree as records; missing masks and unreadable files are problems.

    ``full_check`` decodes every image (slower; catches truncated files). ``masks_required=False`` keeps a defective
    image without a mask as a record with ``mask=None`` (image-level labels only, as `train.calibrate --all-images`
    takes them).
    """
    root = Path(root)
    result = ReadResult()
    if not root.is_dir():
        result.report(str(root), "not a directory")
        return result
    classes = class_dirs(root)
    if not classes:
        result.report(str(root), "no class folder with train/ or test/ found (MVTec AD layout)")
    for class_dir in classes:
        _read_class(class_dir, result, full_check, masks_required)
    return result


def _read_class(class_dir: Path, result: ReadResult, full_check: bool, masks_required: bool = True) -> None:
    category = class_dir.name
    used_masks: set[Path] = set()
    pending = []  # (image, mask, record id, record), checked together below
    # label folders: the class folder itself plays the part of test/ (its ground_truth/ holds the masks)
    splits = [("test", class_dir)] if _label_folders(class_dir) else [(s, class_dir / s) for s in ("train", "test")]
    for split, split_dir in splits:
        if not split_dir.is_dir():
            continue
        for defect_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            defect = defect_dir.name
            if split_dir == class_dir and (defect == "ground_truth" or defect.startswith(".")):
                continue
            if split == "train" and defect != GOOD:
                result.report(str(defect_dir), "train/ should hold only good/ images; folder ignored")
                continue
            for path in sorted(p for p in defect_dir.iterdir() if is_image_file(p)):
                record_id = str(path.relative_to(class_dir.parent))
                mask = None
                if defect != GOOD:
                    mask = class_dir / "ground_truth" / defect / f"{path.stem}_mask.png"
                    if not mask.is_file():
                        if masks_required:
                            result.drop(str(mask), MISSING_MASK, record_id)
                            continue
                        mask = None
                    else:
                        used_masks.add(mask)
                pending.append(
                    (
                        path,
                        mask,
                        record_id,
                        Record(
                            image=str(path),
                            label=NORMAL if defect == GOOD else ANOMALOUS,
                            mask=str(mask) if mask is not None else None,
                            category=category,
                            split=split,
                            defect_type=None if defect == GOOD else defect,
                        ),
                    )
                )
    reasons = pair_problems([(path, mask) for path, mask, _, _ in pending], full_check)
    for (path, _, record_id, record), reason in zip(pending, reasons):
        if reason is not None:
            result.drop(str(path), reason, record_id)
        else:
            result.keep(record)
    gt_dir = class_dir / "ground_truth"
    if gt_dir.is_dir():
        for mask in sorted(gt_dir.glob("*/*")):
            if is_image_file(mask) and mask not in used_masks:
                result.report(str(mask), "mask without a test image")
