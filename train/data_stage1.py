"""Stage-1 training data: masked images as (pixels, size, mask targets, label) items, their augmentation
and their collator. Records come from `train.data`'s readers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from data_prep.records import ANOMALOUS, Record

from .data import load_mask, load_rgb


def mask_at(mask: torch.Tensor, size: int) -> torch.Tensor:
    """A [H, W] {0, 1} mask at size×size: a cell is defective when any of its pixels is (max pooling).

    Thresholding the area fraction at 0.5 instead erased thin defects: a 1-pixel scratch covers at most half
    of a 2×2 cell, so at the default map size (64, from 128-pixel images) 41% of the synthetic scratches'
    pixels vanished from the targets, and a 1-pixel line across a 1024-pixel MVTec image vanishes entirely.
    """
    return F.adaptive_max_pool2d(mask.float()[None, None], (size, size))[0, 0]


def mask_coverage(mask: torch.Tensor, size: int) -> torch.Tensor:
    """A [H, W] {0, 1} mask at size×size as soft targets: each cell's defective fraction (a 1-pixel scratch
    through a 2×2 cell gives 0.5; kept, not thresholded away)."""
    return F.adaptive_avg_pool2d(mask.float()[None, None], (size, size))[0, 0]


MASK_TARGETS = {"max": mask_at, "area": mask_coverage}


class MaskedImages(Dataset):
    """(pixels, size, mask at map_size², label) per record.

    `cache=True` keeps every item after its first decode: on the default model's 128-pixel images the
    decode + preprocessing is about 40% of a stage-1 step on 2 CPU cores, so later epochs run faster. The
    cache holds the crops as the 8-bit pixels the processor resized (a quarter of the float crops' memory),
    when they round-trip exactly; `__getitem__` normalises them again, to the processor's values within
    float32 rounding.
    """

    def __init__(
        self,
        records: list[Record],
        processor,
        map_size: int = 64,
        cache: bool = False,
        augment: Augment | None = None,
        mask_targets: str = "max",
    ):
        self.records, self.processor, self.map_size = records, processor, map_size
        self._targets = MASK_TARGETS[mask_targets]
        self._cache: dict[int, dict] | None = {} if cache else None
        image_processor = processor.image_processor
        self._mean = torch.tensor(image_processor.image_mean, dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(image_processor.image_std, dtype=torch.float32)[:, None, None]
        self.set_augment(augment)

    def set_augment(self, augment: Augment | None) -> None:
        """Change the augmentation (stage 1's polish phase); the cached items are the unaugmented ones, so they stay."""
        self.augment = augment if augment is not None and augment.active else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        if self._cache is None:
            item = self._load(index)
        else:
            if index not in self._cache:
                self._cache[index] = self._load_compact(index)
            item = dict(self._cache[index])
            crops = int(item.pop("crops", len(item["pixel_values"])))  # a one-tile image's view is kept once
            if item["pixel_values"].dtype == torch.uint8:
                pixels = (item["pixel_values"].float() / 255 - self._mean) / self._std
                item["pixel_values"] = pixels.expand(crops, -1, -1, -1)
        if self.augment is None:
            return item
        pixels, mask = self.augment(item["pixel_values"], item["masks"], self._mean, self._std)
        out = {**item, "pixel_values": pixels, "masks": mask}
        if item["labels"] > 0 and item["masks"].any() and not mask.any():  # the enlarged window missed the defect
            out["labels"] = torch.zeros_like(item["labels"])
        return out

    def fill_cache(self, workers: int) -> list[str]:
        """Load every item not yet cached, in `workers` forked processes (one where the platform cannot fork).

        The items are the ones `__getitem__` would load. The first epoch's loading (about 170 s of the default
        model's stage 1 on 2 CPU cores, by cProfile) is spread over the workers, and data-loader workers then start
        from a full cache (each would otherwise load every image again for itself). The loading decodes every image
        and mask, so it is also the full check: records that do not decode are dropped from the dataset, and a
        problem line is returned for each (stage 1 reads its records with the header check alone when it fills).
        """
        from data_prep.parallel import ordered_map

        if self._cache is None:
            raise ValueError("fill_cache needs cache=True")
        missing = [i for i in range(len(self)) if i not in self._cache]
        # numpy arrays travel back through the pool's pipe; tensors would each hold a shared-memory file open
        loaded = ordered_map(self._load_for_cache, missing, workers, chunksize=64)
        failed = {}
        for index, item in zip(missing, loaded):
            if isinstance(item, str):
                failed[index] = item
            else:
                self._cache[index] = {key: torch.from_numpy(value) for key, value in item.items()}
        problems = [f"{self.records[i].image}: {reason}" for i, reason in failed.items()]
        if failed:  # dropped, as the reader's full check would have dropped them
            keep = [i for i in range(len(self.records)) if i not in failed]
            self._cache = {new: self._cache[old] for new, old in enumerate(keep) if old in self._cache}
            self.records = [self.records[i] for i in keep]
        return problems

    def _load_for_cache(self, index: int):
        """A cache item as numpy arrays, or why its image or mask does not decode (the reader's full-check message).
        An error the full check does not confirm is raised: it is not a broken file."""
        from PIL import UnidentifiedImageError

        from data_prep.images import pair_problem

        try:
            return {key: value.numpy() for key, value in self._load_compact(index).items()}
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            record = self.records[index]
            reason = pair_problem(record.image, record.mask, full=True)
            if reason is None:
                raise
            return reason

    def _compact(self, item: dict) -> dict:
        """`item` with its crops as uint8 RGB when the processor's output is 8-bit pixels normalised (the PIL resize
        of an 8-bit image is), else unchanged: 4 bytes a value become 1, and the cache fills faster (the
        default model's 32,000 images: 7 GB of float crops through the workers' pipes, now 1.8 GB)."""
        if item["pixel_values"].dim() != 4:  # flat patches (a Qwen2.5-VL base) stay as they are
            return item
        rgb = (item["pixel_values"] * self._std + self._mean) * 255
        levels = rgb.round()
        if levels.min() < 0 or levels.max() > 255 or (rgb - levels).abs().max() > 1e-3:
            return item
        return {**item, "pixel_values": levels.to(torch.uint8)}

    def _load_compact(self, index: int) -> dict:
        """`_compact(_load(index))`, the same bytes; a one-tile image's 8-bit view comes straight from the processor's
        resize (`AssistantProcessor.one_tile_pixels`), kept once with its crop count ("crops"; `__getitem__` repeats
        it). 8,000 of the default model's 128 px images, two workers: 11.1-11.4 s against 18.3-22.4 s (the float
        crops made and converted back were much of it), and 352 MB of cache against 574 MB."""
        record = self.records[index]
        image = load_rgb(record.image)
        view = self.processor.one_tile_pixels(image)
        if view is None:
            return self._compact(self._item(record, image))
        return {
            **self._item(record, image, pixels=False),
            "pixel_values": torch.from_numpy(view[None]),
            "crops": torch.tensor(self.processor_crops(image)),
        }

    def _load(self, index: int) -> dict:
        record = self.records[index]
        return self._item(record, load_rgb(record.image))

    def _item(self, record: Record, image: Image.Image, pixels: bool = True) -> dict:
        mask = load_mask(record.mask, (image.height, image.width))
        item = {
            "image_sizes": torch.tensor([image.height, image.width]),
            "masks": self._targets(mask, self.map_size),
            "labels": torch.tensor(float(record.label == ANOMALOUS)),
        }
        if pixels:
            item["pixel_values"] = self.processor.pixels_of(image)
        return item

    def processor_crops(self, image) -> int:
        from assistant.projector import num_crops

        config = self.processor.config
        return num_crops((image.height, image.width), config.image_grid_pinpoints, config.vision_config.image_size)


@dataclass
class Augment:
    """Stage-1 augmentation, drawn afresh for every item (torch's RNG, which the trainer checkpoints).

    * `flips`: one of the 8 flips / quarter turns, applied to the crops and the mask together. Only the
      base view may be trained on (the expert's `views="base"`): a flip of the whole image is a flip of its
      base crop, not of the anyres tiles' layout.
    * `hue`: the colours rotate about the grey axis by up to ±`hue` turns (0.5: any hue); `saturation`:
      the colour's distance from grey is scaled by a factor in [1 − s, 1 + s]. Both act on the whole image,
      so a defect keeps its contrast with its surroundings while the surface colour stops being a cue.
    * `lighting`: uneven illumination. Every pixel is multiplied by a smooth random field in [1 − l, 1 + l]
      (a 2×2 to 4×4 grid of random gains, resized bicubically to the crop; the same field on every crop), so
      broad bright and dark areas over a whole image are normal while a defect keeps its local contrast.
    * `grain`: sensor grain. Fine noise, the same on the three channels (luminance), of a standard deviation
      drawn in [0, `grain`] and a correlation length of 0.5–1.2 pixels (white noise blurred by a Gaussian of
      that σ, rescaled to the drawn deviation), is added to every crop, so a grainy surface is normal while a
      defect stays a region that differs from its surroundings. Grain is drawn per crop pixel, after the
      resize to the tower's input, so its scale is the tower's.
    * `scale`: on half the items (drawn afresh), a random square window of side 1/z of the crop, z drawn in
      [1, 1 + scale], is enlarged back to the crop's size (bilinear; the mask by its nearest cell), so surfaces and
      defects are also seen up to 1 + scale times larger: the model's `detection_zoom` reads every image enlarged
      this way at inference. The other half keep the data's own scale. An anomalous item whose window misses its
      defect is relabelled normal (`MaskedImages`). Like flips, it needs base-view scoring.
    """

    flips: bool = False
    hue: float = 0.0
    saturation: float = 0.0
    lighting: float = 0.0
    grain: float = 0.0
    scale: float = 0.0

    @property
    def active(self) -> bool:
        return (
            self.flips or self.hue > 0 or self.saturation > 0 or self.lighting > 0 or self.grain > 0 or self.scale > 0
        )

    def __call__(
        self, pixels: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [crops, 3, S, S] normalised by (mean, std); mask [M, M]."""
        if self.flips:
            turns, flip = int(torch.randint(4, ())), bool(torch.randint(2, ()))
            pixels, mask = torch.rot90(pixels, turns, dims=(-2, -1)), torch.rot90(mask, turns, dims=(-2, -1))
            if flip:
                pixels, mask = pixels.flip(-1), mask.flip(-1)
        if self.scale > 0 and bool(torch.randint(2, ())):
            pixels, mask = enlarge_window(pixels, mask, float(torch.empty(()).uniform_(1, 1 + self.scale)))
        if self.hue > 0 or self.saturation > 0 or self.lighting > 0 or self.grain > 0:
            rgb = pixels * std + mean  # [crops, 3, S, S] in [0, 1]
            if self.hue > 0:
                angle = float(torch.empty(()).uniform_(-self.hue, self.hue)) * 2 * math.pi
                rgb = torch.einsum("ij,cjhw->cihw", hue_rotation(angle), rgb)
            if self.saturation > 0:
                factor = float(torch.empty(()).uniform_(1 - self.saturation, 1 + self.saturation))
                grey = rgb.mean(dim=1, keepdim=True)
                rgb = grey + factor * (rgb - grey)
            if self.lighting > 0:
                cells = int(torch.randint(2, 5, ()))
                gains = torch.empty(1, 1, cells, cells).uniform_(-1, 1)
                field = F.interpolate(gains, size=rgb.shape[-2:], mode="bicubic", align_corners=True).clamp(-1, 1)
                rgb = rgb * (1 + self.lighting * field)
            if self.grain > 0:
                rgb = rgb + grain_field(
                    rgb.shape[0],
                    rgb.shape[-2:],
                    float(torch.empty(()).uniform_(0, self.grain)),
                    float(torch.empty(()).uniform_(0.5, 1.2)),
                )
            pixels = (rgb.clamp(0, 1) - mean) / std
        return pixels.contiguous(), mask.contiguous()


def enlarge_window(pixels: torch.Tensor, mask: torch.Tensor, zoom: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A random square window of side 1/`zoom` of the crops [crops, C, S, S], at the same place in each crop and in
    the mask [M, M], enlarged back to full size: bilinear for the crops, nearest cell for the mask (a map target
    stays 0/1, or its area fraction)."""
    slack = 1 - 1 / zoom  # the window's centre may move this far from the middle, in [-1, 1] coordinates
    shift = torch.empty(2).uniform_(-slack, slack)
    theta = torch.tensor([[1 / zoom, 0.0, float(shift[0])], [0.0, 1 / zoom, float(shift[1])]])
    grid = F.affine_grid(theta[None], [1, 1, *pixels.shape[-2:]], align_corners=False)
    out = F.grid_sample(pixels, grid.expand(len(pixels), -1, -1, -1), mode="bilinear", align_corners=False)
    grid = F.affine_grid(theta[None], [1, 1, *mask.shape[-2:]], align_corners=False)
    enlarged = F.grid_sample(mask[None, None].float(), grid, mode="nearest", align_corners=False)[0, 0]
    return out, enlarged.to(mask.dtype)


def grain_field(crops: int, size: tuple[int, int], deviation: float, sigma: float) -> torch.Tensor:
    """[crops, 1, H, W] luminance grain: white noise blurred by a Gaussian of `sigma` pixels, of standard deviation `deviation`."""
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    taps = taps / taps.sum()
    noise = torch.randn(crops, 1, size[0] + 2 * radius, size[1] + 2 * radius)
    noise = F.conv2d(noise, taps.view(1, 1, 1, -1))
    noise = F.conv2d(noise, taps.view(1, 1, -1, 1))
    # the blur shrinks white noise's deviation by the taps' norm (separable: its square)
    return noise * (deviation / float(taps.square().sum()))


def hue_rotation(angle: float) -> torch.Tensor:
    """3×3 rotation of RGB about the grey axis (1, 1, 1)/√3 by `angle` radians: grey stays grey."""
    k = torch.full((3,), 1 / math.sqrt(3))
    cross = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return math.cos(angle) * torch.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * torch.outer(k, k)


def collate_masked(batch: list[dict]) -> dict:
    return {
        "pixel_values": torch.cat([b["pixel_values"] for b in batch]),
        "image_sizes": torch.stack([b["image_sizes"] for b in batch]),
        "masks": torch.stack([b["masks"] for b in batch]),
        "labels": torch.stack([b["labels"] for b in batch]),
    }
