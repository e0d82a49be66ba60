"""Training data: masked images for stage 1, LLaVA conversations for stage 2, and their collators.

Records come from `data_prep`'s readers with a full decode check, so a missing or broken image is
reported and counted once, up front, and never reaches a batch. Stage-2 inputs are built with the
model's own `AssistantProcessor` (chat template, `<image>` expansion, tokenizer) so training and
inference see the same token layout; only assistant turns carry labels.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from data_prep.records import ANOMALOUS, ReadResult, Record

IGNORE_INDEX = -100
ROLE = {"human": "user", "gpt": "assistant"}


@dataclass
class Skipped:
    """Inputs left out of training, with the reason for each (printed once and counted)."""

    problems: list
    seen: int

    def report(self, what: str, stream=None) -> None:
        stream = stream or sys.stderr
        for problem in self.problems:
            print(f"skipped: {problem}", file=stream)
        if self.problems:
            print(f"{what}: skipped {len(self.problems)} of {self.seen} entries (listed above)", file=stream)


def read_masked(root: str | Path, full_check: bool = True) -> tuple[list[Record], Skipped]:
    """Labelled images with masks from an MVTec-layout folder (synthetic output too) or a VisA root.

    `full_check=False` opens only the headers (missing, unreadable or empty files, mask sizes); `decode_checked`
    then decodes the records that are used. Held-out splits are drawn from this list (`split_records`), so the split
    of a source does not depend on which of its images decode: a command that needs only the held-out part decodes
    only that part, and gets the part training held out."""
    from data_prep.readers import read_mvtec, read_visa

    root = Path(root)
    reader = read_visa if (root / "split_csv").is_dir() else read_mvtec
    result: ReadResult = reader(root, full_check=full_check)
    records = [r for r in result.records if r.label is not None]
    problems = [str(p) for p in result.dropped] + [f"{r.image}: no label" for r in result.records if r.label is None]
    return records, Skipped(problems, result.n_seen)


def decode_checked(records: list[Record]) -> tuple[list[Record], list[str]]:
    """The records whose image and mask decode completely (in one process per core from `PARALLEL_CHECK_FROM`), and a
    problem line for each of the others."""
    from data_prep.images import pair_problems

    reasons = pair_problems([(r.image, r.mask) for r in records], full=True)
    kept = [r for r, reason in zip(records, reasons) if reason is None]
    return kept, [f"{r.image}: {reason}" for r, reason in zip(records, reasons) if reason is not None]


def read_held_out(root: str | Path, val_fraction: float, seed: int) -> tuple[list[Record], Skipped, int]:
    """The held-out split of a masked-image source as stage 1 draws it (`split_records` of the header-checked records,
    then only the ones that decode), for `train.self_reference`: only that split is decoded (the default model's 800
    of 32,000 images). Returns (held-out records, skipped, records found); the skipped images are reported, and an
    unreadable or empty source is a ValueError with a one-line message (`read_masked_or_fail`)."""
    records, skipped = read_masked_or_fail(root, full_check=False)
    _, held_out = split_records(records, val_fraction, seed)
    held_out, problems = decode_checked(held_out)
    Skipped(problems, len(held_out) + len(problems)).report(f"{root} (held-out part, decoded)")
    return held_out, Skipped(skipped.problems + problems, skipped.seen), len(records)


def read_masked_or_fail(root: str | Path, full_check: bool = True) -> tuple[list[Record], Skipped]:
    """`read_masked` for the post-training commands (`train.fit_check`): the skipped images are reported, and an
    unreadable or empty source is a ValueError with a one-line message."""
    try:
        records, skipped = read_masked(root, full_check)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read masked images from {root}: {error}") from None
    skipped.report(str(root))
    if not records:
        raise ValueError(f"no masked images in {root} (an MVTec-layout folder, the synthetic generator's output or a VisA root)")
    return records, skipped


def read_conversations(path: str | Path) -> tuple[list[Record], Skipped]:
    """LLaVA-format conversations (`data_prep instruct` output); malformed entries and bad images are skipped."""
    from data_prep.readers import read_llava

    result = read_llava(path, full_check=True)
    return list(result.records), Skipped([str(p) for p in result.dropped], result.n_seen)


def split_records(records: list[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """A held-out split stratified by label (every label present in both parts when it has ≥ 2 records)."""
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted({r.label for r in records}, key=lambda v: (v is None, v)):
        group = [r for r in records if r.label == label]
        rng.shuffle(group)
        n_val = int(round(len(group) * val_fraction))
        if len(group) >= 2:
            n_val = min(max(n_val, 1), len(group) - 1)
        val += group[:n_val]
        train += group[n_val:]
    key = lambda r: r.image  # noqa: E731 - a stable order independent of the label grouping
    return sorted(train, key=key), sorted(val, key=key)


def load_rgb(path: str) -> Image.Image:
    from assistant.imageio import load_image

    return load_image(path)


def load_mask(path: str | None, size: tuple[int, int]) -> torch.Tensor:
    """Ground-truth mask as float [H, W] in {0, 1} (zeros for a normal image)."""
    if path is None:
        return torch.zeros(size)
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("L")) > 0).float()


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


# -- stage 1 ------------------------------------------------------------------------------------------
class MaskedImages(Dataset):
    """(pixels, size, mask at map_size², label) per record.

    `cache=True` keeps every item after its first decode: on the default model's 128-pixel images the
    decode + preprocessing is about 40% of a stage-1 step on 2 CPU cores, so later epochs run faster. The
    cache holds the crops as the 8-bit pixels the processor resized (a quarter of the float crops' memory),
    when they round-trip exactly; `__getitem__` normalises them again, to the processor's values within
    float32 rounding.
    """

    def __init__(self, records: list[Record], processor, map_size: int = 64, cache: bool = False, augment: "Augment | None" = None,
                 mask_targets: str = "max"):
        self.records, self.processor, self.map_size = records, processor, map_size
        self._targets = MASK_TARGETS[mask_targets]
        self._cache: dict[int, dict] | None = {} if cache else None
        image_processor = processor.image_processor
        self._mean = torch.tensor(image_processor.image_mean, dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(image_processor.image_std, dtype=torch.float32)[:, None, None]
        self.set_augment(augment)

    def set_augment(self, augment: "Augment | None") -> None:
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
        return {**item, "pixel_values": pixels, "masks": mask}

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
        return {**self._item(record, image, pixels=False), "pixel_values": torch.from_numpy(view[None]),
                "crops": torch.tensor(self.processor_crops(image))}

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
    """

    flips: bool = False
    hue: float = 0.0
    saturation: float = 0.0
    lighting: float = 0.0
    grain: float = 0.0

    @property
    def active(self) -> bool:
        return self.flips or self.hue > 0 or self.saturation > 0 or self.lighting > 0 or self.grain > 0

    def __call__(self, pixels: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [crops, 3, S, S] normalised by (mean, std); mask [M, M]."""
        if self.flips:
            turns, flip = int(torch.randint(4, ())), bool(torch.randint(2, ()))
            pixels, mask = torch.rot90(pixels, turns, dims=(-2, -1)), torch.rot90(mask, turns, dims=(-2, -1))
            if flip:
                pixels, mask = pixels.flip(-1), mask.flip(-1)
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
                rgb = rgb + grain_field(rgb.shape[0], rgb.shape[-2:], float(torch.empty(()).uniform_(0, self.grain)),
                                        float(torch.empty(()).uniform_(0.5, 1.2)))
            pixels = (rgb.clamp(0, 1) - mean) / std
        return pixels.contiguous(), mask.contiguous()


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


# -- stage 2 ------------------------------------------------------------------------------------------
def chat_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns → chat messages; the image goes first in the first user turn, as at inference."""
    messages = []
    for index, turn in enumerate(conversations):
        text = turn["value"]
        if index == 0:
            text = text.replace("<image>", "").strip()
            messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]})
        else:
            messages.append({"role": ROLE[turn["from"]], "content": text.strip()})
    return messages


def level_for(label: int | None) -> str | None:
    """The suspicion level shown to the LLM during training: from the ground truth label."""
    if label is None:
        return None
    return "highly" if label == ANOMALOUS else "slightly"


def where_for(record: Record) -> str:
    """A marker's `{where}` during training: the ground-truth location of an anomalous record, else ""."""
    from assistant.processing import where_text

    return where_text(record.extra.get("location")) if record.label == ANOMALOUS else ""


def encode_conversation(
    processor, conversations: list[dict], image_size: tuple[int, int], level: str | None, where: str = "",
    expansions: dict | None = None,
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation: the chat rendered with the model's template, `<image>`
    expanded into the exact image (and look-twice) token count, labels only on assistant text.

    `expansions`, when given, keeps each (image size, level, where)'s expansion ids for the next conversations."""
    tokenizer = processor.tokenizer
    messages = chat_messages(conversations)
    encoded = tokenizer.apply_chat_template(
        messages, chat_template=processor.chat_template, tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True, add_generation_prompt=False,
    )
    ids, assistant = list(encoded["input_ids"]), list(encoded["assistant_masks"])
    image_id = processor.config.image_token_index
    positions = [i for i, t in enumerate(ids) if t == image_id]
    if len(positions) != 1:
        raise ValueError(f"the rendered chat holds {len(positions)} image tokens, expected 1")
    key = (tuple(image_size), level, where)
    expansion = expansions.get(key) if expansions is not None else None
    if expansion is None:
        expansion = tokenizer(processor.expand_image(image_size, level, where), add_special_tokens=False)["input_ids"]
        if expansions is not None:
            expansions[key] = expansion
    at = positions[0]
    ids = ids[:at] + expansion + ids[at + 1 :]
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids[:at], assistant[:at])]
    labels += [IGNORE_INDEX] * len(expansion)
    labels += [t if m else IGNORE_INDEX for t, m in zip(ids[at + len(expansion) :], assistant[at + 1 :])]
    return ids, labels


#: conversations from which `Conversations` tokenises in one forked process per core
PARALLEL_ENCODE_FROM = 2000


class Conversations(Dataset):
    """Tokenised conversations with their image pixels; records longer than `max_length` are dropped up front.

    Each conversation is tokenised once, here (its length decides whether it is kept), and the token ids and
    labels are kept as int32 arrays (the default model's 32,000 conversations: about 50 MB), so an item costs
    only its image's decode and preprocessing. From `PARALLEL_ENCODE_FROM` conversations the tokenising runs in one
    forked process per core, and each (image size, level, location)'s `<image>` expansion is tokenised once.
    """

    def __init__(self, records: list[Record], processor, with_levels: bool, max_length: int = 2048, workers: int | None = None):
        from data_prep.parallel import default_workers, ordered_map

        self.processor, self.with_levels = processor, with_levels
        self._expansions: dict = {}
        if workers is None:  # forked workers pay from a few thousand (8,000 of the default model's: 4.0-4.2 s against 11.2 s)
            workers = default_workers() if len(records) >= PARALLEL_ENCODE_FROM else 1
        self.records, problems = [], []
        for record, (size, ids, labels) in zip(records, ordered_map(self._encode_record, records, workers, chunksize=256)):
            if len(ids) > max_length:
                problems.append(f"{record.image}: {len(ids)} tokens > data.max_length {max_length}")
                continue
            self.records.append((record, size, ids, labels))
        self.skipped = Skipped(problems, len(records))

    def _encode_record(self, record: Record) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
        with Image.open(record.image) as image:
            size = (image.height, image.width)
        ids, labels = self._encode(record, size)
        return size, np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)

    def _encode(self, record: Record, size):
        level = level_for(record.label) if self.with_levels else None
        where = where_for(record) if self.with_levels else ""
        return encode_conversation(self.processor, record.extra["conversations"], size, level, where, self._expansions)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record, size, ids, labels = self.records[index]
        image = load_rgb(record.image)
        return {
            "input_ids": torch.from_numpy(ids).long(),
            "labels": torch.from_numpy(labels).long(),
            "pixel_values": self.processor.pixels_of(image),
            "image_sizes": torch.tensor(size),
        }


@dataclass
class ConversationCollator:
    pad_token_id: int

    def __call__(self, batch: list[dict]) -> dict:
        length = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(batch), length), dtype=torch.long)
        for row, b in enumerate(batch):  # right padding: positions stay those of an unpadded sequence
            n = len(b["input_ids"])
            ids[row, :n], labels[row, :n], attention[row, :n] = b["input_ids"], b["labels"], 1
        return {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": attention,
            "pixel_values": torch.cat([b["pixel_values"] for b in batch]),
            "image_sizes": torch.stack([b["image_sizes"] for b in batch]),
        }
