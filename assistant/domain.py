"""The out-of-domain check: how far an image is from every image the model was trained on.

A checkpoint may carry `domain_bank.safetensors`: unit embeddings (`AnomalyAssistantModel.domain_embedding`: the
image's patch features averaged) of training images, cut to a greedy coreset. An image's domain distance is its
distance to the nearest of them; past the calibrated `domain_threshold` (`Calibration.with_domain`) the report says
the image is out of domain and the answer says the verdict cannot be trusted, instead of describing a defect on an
object the model never saw.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .patch_memory import greedy_coreset

FILE = "domain_bank.safetensors"
#: embeddings kept in a bank (a coreset of the training images')
BANK_SIZE = 1024


def save_bank(model, folder) -> None:
    from safetensors.torch import save_file

    if getattr(model, "domain_bank", None) is not None:
        save_file({"domain_bank": model.domain_bank.detach().float().cpu().contiguous()}, str(Path(folder) / FILE))


def load_bank(model, folder) -> None:
    """Attach the folder's bank to `model` (nothing when the folder has none)."""
    from safetensors.torch import load_file

    path = Path(folder) / FILE
    model.domain_bank = load_file(str(path))["domain_bank"] if path.is_file() else None


@torch.no_grad()
def embeddings(model, pixel_values, image_sizes) -> torch.Tensor:
    """Unit domain embeddings [B, H] of a batch of preprocessed images (their base crops)."""
    features = model._detection_features(pixel_values, image_sizes)[0]
    return model.domain_embedding(features)


def build_bank(vectors: torch.Tensor, size: int = BANK_SIZE) -> torch.Tensor:
    """A bank of at most `size` of the unit `vectors` [M, H], chosen by greedy coreset."""
    return vectors[greedy_coreset(vectors, size)].contiguous()
