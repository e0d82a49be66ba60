"""Scoring held-out masked images with a model's detection path, and the thresholds and AUROCs calibrated on them.

Shared by stage 1 (its calibration), `train.self_reference` and `train.fit_check`. It lives apart from `train.stage1`,
whose Trainer callback imports transformers' trainer utilities and with them peft and bitsandbytes (7.6 s of
`python -X importtime -c "import train.stage1"` on 2 CPU cores), so that the commands that only score do not pay for them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from assistant.calibration import Calibration, CalibrationConfig
from assistant.maps import image_anomaly_map
from assistant.patch_memory import ReferenceTypical
from assistant.processing import join_zoom_views


def small_maps(model, crop_maps: list[torch.Tensor], image_sizes, size: int) -> torch.Tensor:
    """Per image, the input-size anomaly map resized (area) to size×size: [B, size, size]."""
    out = []
    for maps, image_size in zip(crop_maps, image_sizes):
        full = image_anomaly_map(maps, tuple(int(v) for v in image_size), *model.crop_layout())
        out.append(F.interpolate(full[None, None], size=(size, size), mode="area")[0, 0])
    return torch.stack(out)


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Image AUROC (`assistant.metrics`, scikit-learn's), NaN when the labels hold one class only."""
    from assistant.metrics import image_auroc

    if len(np.unique(labels)) < 2:
        return float("nan")
    return image_auroc(labels, scores)


class Prepared:
    """Each record's preprocessed image and its mask at map_size². With `keep_bytes` > 0 they are kept (up to that
    many bytes of pixels) and shared by the scoring passes of one command (`train.self_reference` scores the same
    held-out images four times, and reference images again); with 0 nothing is kept, for one pass."""

    def __init__(self, processor, map_size: int, keep_bytes: int = 0):
        self.processor, self.map_size, self.keep_bytes, self._items, self._kept = processor, map_size, keep_bytes, {}, 0

    def __call__(self, record) -> tuple[torch.Tensor, tuple[int, int], np.ndarray, torch.Tensor | None]:
        """(pixel_values [1, crops, 3, S, S], (height, width), mask [map_size, map_size] bool, the zoom's enlarged
        base view [1, 3, Z, Z] or None: `AssistantProcessor.preprocess`'s `zoom_pixel_values`, so that thresholds are
        fitted on the scores inference gives)."""
        from .data import load_mask, load_rgb, mask_at

        key = (record.image, record.mask)
        if key in self._items:
            return self._items[key]
        image = load_rgb(record.image)
        size = (image.height, image.width)
        mask = mask_at(load_mask(record.mask, size), self.map_size).numpy() > 0.5
        pixels = self.processor.preprocess([image])
        item = (pixels["pixel_values"], size, mask, pixels.get("zoom_pixel_values"))
        nbytes = sum(t.numel() * t.element_size() for t in (item[0], item[3]) if t is not None)
        if self._kept + nbytes <= self.keep_bytes:
            self._items[key], self._kept = item, self._kept + nbytes
        return item

    def batches(self, records, size: int):
        """(index of the first record, its items) for runs of consecutive records with the same crop layout, at most
        `size` at a time: the pixels of one run concatenate into one batch."""
        start, group = 0, []
        for index, record in enumerate(records):
            item = self(record)  # each record prepared once, also where it starts the next run
            if group and (len(group) == size or item[0].shape != group[0][0].shape):
                yield start, group
                start, group = index, []
            group.append(item)
        if group:
            yield start, group


#: few-shot scoring keeps the references' features (`reference_bank`) up to this many bytes, then computes the rest each time
REFERENCE_BANK_BYTES = 1 << 30


@torch.no_grad()
def score_records(
    model, processor, records, map_size: int, references=None, batch_size: int = 16, prepared: Prepared | None = None
):
    """Image scores, labels, maps and masks (both at map_size²) of `records`, from the detection path (tower + expert,
    the values `encode_images` gives). `references(record)` (optional) gives the normal records each record is
    scored against (the few-shot mode; then one record at a time). Zero-shot, records of the same crop layout are
    scored `batch_size` at a time (the default model's stage-1 calibration on 800 held-out images: 5.5 s against
    21.7 s one by one, under cProfile), the same scores within float rounding. `prepared` (a `Prepared` that keeps
    its items) shares the preprocessing between calls. Few-shot, each reference's features (`reference_bank`) are
    computed once and reused by every record it is drawn for."""
    prepared = prepared or Prepared(processor, map_size)
    was_training = model.training
    model.eval()
    scores, maps, masks, banks, kept = [], [], [], {}, 0

    def bank_of(record):
        """(bank, learned zero-shot scores, learned maps) of one reference record."""
        nonlocal kept
        key = (record.image, record.mask)
        if key in banks:
            return banks[key]
        pixels, size, _, zoom = prepared(record)
        # LLaVA's pixels are [1, crops, 3, S, S], a Qwen base's flat patches already one image's
        pixels = pixels[0] if pixels.dim() == 5 else pixels
        bank = model.reference_bank(pixels, [size]), *model.reference_learned(pixels, [size], zoom)
        nbytes = sum(level.numel() * level.element_size() for level in bank[0])
        if (
            kept + nbytes <= REFERENCE_BANK_BYTES
        ):  # the default model's 320 held-out normals: 4 levels x 288 x 128 floats each, 190 MB
            banks[key], kept = bank, kept + nbytes
        return bank

    for start, group in prepared.batches(records, 1 if references is not None else max(1, batch_size)):
        pixels = torch.cat([item[0] for item in group])
        sizes = [item[1] for item in group]
        bank = typical = None
        if references is not None:
            parts = [bank_of(r) for r in references(records[start])]
            bank = [torch.cat(level) for level in zip(*(part[0] for part in parts))] if parts else None
            typical = (
                ReferenceTypical.of(torch.cat([part[1] for part in parts]), [m for part in parts for m in part[2]])
                if parts
                else None
            )
        zoom = join_zoom_views(item[3] for item in group)  # one tensor, or a list where sizes take different zooms
        crop_maps, batch_scores = model.detect(
            pixels, sizes, reference_bank=bank, reference_typical=typical, zoom_pixel_values=zoom
        )
        maps.extend(small_maps(model, crop_maps, sizes, map_size).float().cpu().numpy())
        masks.extend(item[2] for item in group)
        scores.extend(float(v) for v in batch_scores)
    model.train(was_training)
    labels = np.array([int(r.label == 1) for r in records])
    return labels, np.array(scores), np.stack(maps), np.stack(masks)


def calibrate(
    model,
    processor,
    records,
    map_size: int,
    settings: CalibrationConfig | None = None,
    prepared: Prepared | None = None,
) -> dict:
    """Score held-out `records` and fit the zero-shot thresholds (`Calibration.fit`) into `model.config`, and from the
    same scores how high each category's normal images score (`Calibration.with_typical_top`, under the report's
    "typical"). Returns the fit's report. `settings` default to the model's own `moderate_from` (a refit keeps the
    checkpoint's suspicion rule)."""
    if settings is None:
        settings = CalibrationConfig(model.config.moderate_from or CalibrationConfig.moderate_from)
    labels, scores, maps, masks = score_records(model, processor, records, map_size, prepared=prepared)
    calibration, report = Calibration.fit(labels, scores, maps, masks, settings, previous=Calibration.of(model.config))
    if calibration is not None:
        categories = [record.category for record in records]
        folders = {
            category: [i for i, c in enumerate(categories) if c == category] for category in dict.fromkeys(categories)
        }
        calibration, report["typical"] = calibration.with_typical_top(
            [scores[i] for i in folders.values()], [labels[i] for i in folders.values()], settings, list(folders)
        )
        calibration.write(model.config)
    return report


@torch.no_grad()
def embed_records(model, processor, records, batch_size: int = 16, prepared: Prepared | None = None) -> torch.Tensor:
    """Unit domain embeddings [N, H] of `records` (`assistant.domain.embeddings`), `batch_size` at a time; `prepared`
    (a `Prepared` that keeps its items) shares the preprocessing with the command's other passes."""
    from assistant.domain import embeddings

    prepared, out = prepared or Prepared(processor, 8), []
    for _, group in prepared.batches(records, batch_size):
        out.append(embeddings(model, torch.cat([item[0] for item in group]), [item[1] for item in group]))
    return torch.cat(out)


def fit_domain_threshold(
    model, processor, held_out_records, settings: CalibrationConfig | None = None, prepared: Prepared | None = None
) -> dict:
    """`domain_threshold` from the held-out images' distances to `model.domain_bank` (`Calibration.with_domain`)."""
    vectors = embed_records(model, processor, held_out_records, prepared=prepared)
    distances = model.domain_distance(vectors[:, None, :])  # each embedding as a one-patch crop
    calibration, report = Calibration.of(model.config).with_domain(distances.cpu().numpy(), settings)
    calibration.write(model.config)
    return report


@torch.no_grad()
def fit_domain(
    model,
    processor,
    train_records,
    held_out_records,
    settings: CalibrationConfig | None = None,
    max_train: int = 2000,
    seed: int = 0,
) -> dict:
    """The out-of-domain check (`assistant.domain`): a coreset of up to `max_train` training images' embeddings becomes
    `model.domain_bank`, and the held-out images' distances to it set `domain_threshold`."""
    from assistant.domain import build_bank

    if len(train_records) > max_train:
        keep = np.random.default_rng(seed).choice(len(train_records), max_train, replace=False)
        train_records = [train_records[i] for i in sorted(keep)]
    was_training = model.training
    model.eval()
    model.domain_bank = build_bank(embed_records(model, processor, train_records))
    report = fit_domain_threshold(model, processor, held_out_records, settings)
    model.train(was_training)
    return {"bank": int(model.domain_bank.shape[0]), **report}
