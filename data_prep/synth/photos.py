"""Real photographed surfaces as normal-image families: random crops of photos that ship inside installed packages.

scikit-image's wheel carries `brick`, `grass` and `gravel` (512×512 greyscale photographs, CC0, see its
`skimage/data/README.txt`) and the other photos named in `PHOTO_SURFACES` (colour ones are turned grey). Each sample
is a square crop of random size (a quarter of the photo's side up to all of it, so the texture's scale varies),
turned and mirrored at random, with mild brightness, contrast and tint changes.
A family name here can stand wherever a procedural family does (`data_prep.synth.families.family`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

#: family name → (scikit-image loader name, noun for the conversations)
PHOTO_SURFACES = {
    "brick": ("brick", "brick wall"),
    "grass": ("grass", "lawn"),
    "gravel": ("gravel", "gravel surface"),
    "coins": ("coins", "coin tray"),
    "cell": ("cell", "cell culture"),
    "tissue": ("immunohistochemistry", "tissue section"),
    "moon": ("moon", "lunar surface"),
    "retina": ("retina", "fundus photograph"),
}
#: surfaces kept out of every training recipe and every threshold fit, far from the training surfaces (as far from
#: them as landscapes are, by the domain check's distance): scikit-image's `moon` (public domain) and `retina` (CC0)
#: photos, for the evaluation's far-surface row (`eval.default_model_quality`), where a model meets what a new kind
#: of inspection image looks like to it
FAR_SURFACES = ("moon", "retina")


class MissingPhotosError(ImportError):
    """scikit-image is not installed; the message names the install command."""


@functools.cache
def photo(name: str) -> np.ndarray:
    """The photo behind a family as a float32 H×W array in [0, 255] (read once per process)."""
    try:
        import skimage.data
    except ImportError:
        raise MissingPhotosError("the real-surface families need scikit-image: pip install scikit-image") from None
    image = np.asarray(getattr(skimage.data, PHOTO_SURFACES[name][0])(), dtype=np.float32)
    return image if image.ndim == 2 else image[..., :3].mean(-1)


def make_photo_crop(
    name: str, size: int, rng: np.random.Generator, scale: float | None = None
) -> tuple[np.ndarray, None]:
    """A normal `size`×`size` RGB float32 image of the photographed surface `name` (textures have no foreground).
    `scale` fixes the crop's side as that share of the photo's (one camera at one distance); None draws it."""
    full = photo(name)
    height, width = full.shape
    side = (
        int(rng.integers(min(height, width) // 4, min(height, width) + 1))
        if scale is None
        else int(min(height, width) * scale)
    )
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    crop = Image.fromarray(full[top : top + side, left : left + side]).resize((size, size), Image.BILINEAR)
    grey = np.rot90(np.asarray(crop, dtype=np.float32), int(rng.integers(4)))
    grey = grey[:, ::-1] if rng.random() < 0.5 else grey
    grey = (grey - grey.mean()) * rng.uniform(0.8, 1.2) + grey.mean() + rng.uniform(-20, 20)
    tint = rng.uniform(0.9, 1.1, 3).astype(np.float32)
    return np.clip(grey[..., None] * tint, 0, 255).astype(np.float32), None


@dataclass(frozen=True)
class PhotoFamily:
    name: str
    noun: str
    kind: str = "texture"

    def make(self, size: int, rng: np.random.Generator):
        return make_photo_crop(self.name, size, rng)


PHOTOS = {name: PhotoFamily(name, noun) for name, (_, noun) in PHOTO_SURFACES.items()}
