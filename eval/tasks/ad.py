"""Anomaly-detection metrics on an MVTec-layout folder (also the synthetic sets) or a VisA split CSV.

The test images go through the detection-only path (`AnomalyAssistant.detect`: score and map, no
text). Metrics per class with `eval.metrics.compute_ad_metrics`: image AUROC, AP, F1-max always, on
every test image; the model's own verdicts' accuracy, false alarms and misses at its calibrated thresholds
(`eval.metrics.verdict_rates`); pixel AUROC, AUPRO (FPR <= 0.3) and AUPIMO when the set has ground-truth masks. A
defective image without a mask (image-level labels only) still counts for the image metrics; the pixel
metrics then read the normal images and the defective ones that have a mask, and the notes say how many
were left out of them. Maps are cached
downsampled (longest side <= ``--map-size``); masks are resized (nearest) to the cached map size,
so pixel metrics are computed at that resolution, as anomalib computes them at its eval size.
The summary is the mean over classes, as MVTec AD and VisA results are published.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from .base import DataError, Dataset, Sample, Scores, Task

IMAGE_METRICS = ("image_AUROC", "image_AP", "image_F1max")
#: at the model's own thresholds (`eval.metrics.verdict_rates`), when every scored image has a verdict
VERDICT_METRICS = ("verdict_accuracy", "false_alarms", "missed")
PIXEL_METRICS = ("pixel_AUROC", "pixel_AUPRO", "pixel_AUPIMO")


class ADTask(Task):
    name = "ad"
    prompt = "(no text: detection-only path)"
    needs_model = True
    #: few-shot: this many normal training images of each test image's class are its references (a class without a
    #: training split draws them from its normal test images, which then leave its test set)
    shots = 0
    shot_seed = 0
    #: without shots: "single" (each image on its own), "batch" (each class's test images scored against each other)
    #: or "auto" (batch for a class of at least `BATCH_MODE_MIN_IMAGES` test images, as `inspect` chooses for a folder)
    zero_shot = "auto"

    def load(self, data: Path, need_images: bool) -> Dataset:
        from data_prep.check import UnknownFormat, detect_format
        from data_prep.readers import read_mvtec, read_visa
        from data_prep.readers.visa import DEFAULT_CSV

        try:
            fmt = detect_format(data)
        except UnknownFormat as error:
            raise DataError(str(error)) from error
        if fmt == "mvtec":
            result, root = read_mvtec(data, masks_required=False), data
        elif fmt == "visa":
            if data.is_dir():
                result, root = read_visa(data, masks_required=False), data
            else:
                root = data.parent.parent if data.parent.name == DEFAULT_CSV.parent.name else data.parent
                result = read_visa(root, data, masks_required=False)
        else:
            raise DataError(f"'{data}' is {fmt} data; the ad task reads an MVTec-layout folder or a VisA split CSV")
        records = [r for r in result.records if r.split == "test"]
        if not records:
            raise DataError(f"no test images in '{data}'" + (f" ({result.problems[0]})" if result.problems else ""))
        samples = [
            Sample(
                key=Path(r.image).resolve().relative_to(root.resolve()).as_posix(),
                index=i,
                image=r.image,
                label=r.label,
                category=r.category,
                mask=r.mask,
            )
            for i, r in enumerate(records)
        ]
        self._drawn_from_test = {}
        if self.shots:
            samples = self._with_references(samples, result.records)
        self._samples = samples  # the batch mode scores a class's whole test set together
        return Dataset(samples, [str(p) for p in result.problems], len(samples) + len(result.dropped))

    def _with_references(self, samples: list[Sample], records) -> list[Sample]:
        """The test samples, each with `shots` normal images of its class as references: drawn with `shot_seed` from
        the class's training images (the same for every test image), or, for a class without any (images sorted into
        good/ and defect folders), from its normal test images, which then leave the test set (anomalib's `Folder`
        splits its normal images likewise); `_drawn_from_test` counts them per class for the notes."""
        import random

        train: dict[str, list[str]] = {}
        for record in records:
            if record.split == "train" and record.label == 0:
                train.setdefault(record.category, []).append(str(record.image))
        test_normal: dict[str, list[str]] = {}
        for sample in samples:
            if sample.label == 0:
                test_normal.setdefault(sample.category, []).append(str(sample.image))
        chosen = {}
        for category in sorted({s.category for s in samples}):
            pool = train.get(category) or test_normal.get(category, [])
            kind = "normal training images" if category in train else "normal images (no training split)"
            # one normal image stays in the test set, so that a class drawn from its test images can still be ranked
            spare = 0 if category in train else 1
            if len(pool) < self.shots + spare:
                raise DataError(
                    f"--shots {self.shots}: class '{category}' has only {max(len(pool) - spare, 0)} {kind} to draw "
                    "references from" + ("" if category in train else " while keeping one to test")
                )
            chosen[category] = random.Random(f"{self.shot_seed}/{category}").sample(sorted(pool), self.shots)
            if category not in train:
                self._drawn_from_test[category] = self.shots
        drawn = {path for category in self._drawn_from_test for path in chosen[category]}
        kept = [s for s in samples if str(s.image) not in drawn]
        for sample in kept:
            sample.extra["references"] = chosen[sample.category]
        return kept

    def class_mode(self, category: str) -> str:
        """How a class's test images are scored without shots: "single" or "batch" (`assistant.batch.choose_zero_shot`
        on the class's whole test set)."""
        from assistant.batch import choose_zero_shot

        size = sum(s.category == category for s in self._samples)
        return choose_zero_shot(self.zero_shot, size, bool(self.shots))[0]

    def infer(self, adapter, sample: Sample, save_map) -> dict:
        if not self.shots and self.class_mode(sample.category) == "batch":
            found = self._folder_result(adapter, sample)
        else:
            found = adapter.detect(sample)
        return {"score": found["score"], "verdict": found["verdict"], "map": save_map(sample.key, found["anomaly_map"])}

    def _folder_result(self, adapter, sample: Sample) -> dict:
        """The batch mode: the first sample of a class scores the class's whole test set (every shard scores the same
        images, so the result does not depend on sharding); the others read it."""
        results = self.__dict__.setdefault("_folder_results", {})
        if sample.key not in results:
            members = [s for s in self._samples if s.category == sample.category]
            results.update(zip([s.key for s in members], adapter.detect_folder(members)))
        return results.pop(sample.key)

    def score(self, samples: list[Sample], predictions: dict[str, dict], options: dict) -> Scores:
        load_map = options["load_map"]
        anomalous = [s for s in samples if s.label == 1]
        unmasked = sum(s.mask is None for s in anomalous)
        with_masks = unmasked < len(anomalous)  # pixel metrics when some defective image has a mask
        from ..metrics import verdict_rates

        # a model without thresholds gives no verdict: then only the threshold-free metrics
        with_verdicts = all(predictions[s.key].get("verdict") is not None for s in samples)
        notes = [
            f"{category}: no training split, so its {count} references were drawn from its normal images and left out "
            "of its test set"
            for category, count in sorted(getattr(self, "_drawn_from_test", {}).items())
        ]
        if unmasked and with_masks:
            notes.append(
                f"{unmasked} of {len(anomalous)} anomalous images have no ground-truth mask: they count for the image "
                "metrics only; the pixel metrics read the normal images and the masked anomalous ones"
            )
        elif unmasked:
            notes.append("the anomalous images have no ground-truth masks: image-level metrics only")
        rows = []
        for category in sorted({s.category for s in samples}):
            chosen = [s for s in samples if s.category == category]
            row = {"class": category, "n": len(chosen), "n_anomalous": sum(s.label == 1 for s in chosen)}
            labels = np.array([s.label for s in chosen])
            scores = np.array([predictions[s.key]["score"] for s in chosen], dtype=np.float64)
            metrics = self._metrics(category, labels, scores, None, None, notes)
            masked = [s for s in chosen if s.label == 0 or s.mask is not None]
            if metrics and with_masks and any(s.label == 1 for s in masked):
                maps = [load_map(predictions[s.key]["map"]) for s in masked]
                shape = Counter(m.shape for m in maps).most_common(1)[0][0]
                maps = np.stack([_resize(m, shape) for m in maps])
                masks = np.stack([_mask(s.mask, shape) for s in masked])
                pixel = self._metrics(
                    category,
                    np.array([s.label for s in masked]),
                    np.array([predictions[s.key]["score"] for s in masked], dtype=np.float64),
                    masks,
                    maps,
                    notes,
                )
                metrics.update({name: pixel[name] for name in PIXEL_METRICS if name in pixel})
            for name in IMAGE_METRICS + (PIXEL_METRICS if with_masks else ()):
                row[name] = metrics.get(name, float("nan"))
            row["threshold_F1max"] = metrics.get("thresholds", {}).get("image_F1max", float("nan"))
            if with_verdicts:
                row.update(verdict_rates(labels, [predictions[s.key]["verdict"] for s in chosen]))
            rows.append(row)
        summary = {"n": len(samples), "n_classes": len(rows)}
        for name in IMAGE_METRICS + (PIXEL_METRICS if with_masks else ()) + (VERDICT_METRICS if with_verdicts else ()):
            values = [r[name] for r in rows if not math.isnan(r[name])]
            summary[name] = sum(values) / len(values) if values else float("nan")
        return Scores(summary, rows, notes)

    @staticmethod
    def _metrics(category: str, labels, scores, masks, maps, notes: list[str]) -> dict:
        """`compute`'s metrics for one class; a class it cannot score gets a note instead (and no metrics)."""
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                metrics = compute(labels, scores, masks, maps)
            notes.extend(f"{category}: {w.message}" for w in caught if issubclass(w.category, RuntimeWarning))
        except ValueError as error:
            notes.append(f"{category}: {'not scored' if masks is None else 'no pixel metrics'} ({error})")
            return {}
        return metrics


def compute(labels, scores, masks, maps) -> dict:
    from ..metrics import compute_ad_metrics

    return compute_ad_metrics(labels, scores, masks=masks, maps=maps)


def _resize(anomaly_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if anomaly_map.shape == shape:
        return anomaly_map
    from PIL import Image

    return np.asarray(
        Image.fromarray(anomaly_map, mode="F").resize((shape[1], shape[0]), Image.BILINEAR), dtype=np.float32
    )


def _mask(path: str | None, shape: tuple[int, int]) -> np.ndarray:
    """The ground-truth mask as bool at `shape` (nonzero = anomalous: VisA masks hold defect ids)."""
    if path is None:
        return np.zeros(shape, dtype=bool)
    from PIL import Image

    with Image.open(path) as image:
        mask = np.asarray(image.convert("L")) > 0
    if mask.shape != shape:
        mask = np.asarray(Image.fromarray(mask).resize((shape[1], shape[0]), Image.NEAREST))
    return mask
