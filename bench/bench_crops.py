"""Image encoding: the tower reading each distinct crop once vs. every crop (the baseline, in the same process).

    python bench/bench_crops.py                 # the embedded default model, 8 images of 128x128
    python bench/bench_crops.py --batch 16 --size 200

With one 96 px tile per side, a square image's tile repeats its base view pixel for pixel, so
`AnomalyAssistantModel.vision_features` reads it once and copies the features (the result and the
gradients are the same; tests/test_model_core.py checks both). The baseline disables that check. Three
timings per side, interleaved, median of `--repeats`: no gradient (chat, the app), stage 2's case (frozen tower,
gradients to the projector) and a trained tower (stage 1 with `views: all`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from assistant import AnomalyAssistant  # noqa: E402
from assistant.modeling import AnomalyAssistantModel  # noqa: E402


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def cases(model, pixel_values, sizes) -> dict:
    def no_grad():
        with torch.no_grad():
            model.encode_images(pixel_values, sizes)

    def backward(tower_trained: bool):
        def step():
            model.vision_tower.requires_grad_(tower_trained)
            visual = model.encode_images(pixel_values, sizes)
            sum(e.sum() for e in visual.image_embeds).backward()
            model.zero_grad(set_to_none=True)

        return step

    return {"no gradient": no_grad, "frozen tower (stage 2)": backward(False), "trained tower": backward(True)}


def every_crop(enabled: bool) -> None:
    """Switch the baseline on (the tower reads every crop) or off."""
    if enabled:
        AnomalyAssistantModel._distinct_crops = staticmethod(lambda crops, counts: (None, None))
    else:
        AnomalyAssistantModel._distinct_crops = OWN


OWN = AnomalyAssistantModel.__dict__["_distinct_crops"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128, help="side of the square test images in pixels")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    assistant = AnomalyAssistant.from_pretrained(args.model)
    model = assistant.model
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)) for _ in range(args.batch)
    ]
    inputs = assistant.processor.image_processor(images, return_tensors="pt")
    sizes = inputs["image_sizes"].tolist()
    counts = model.crops_per_image(sizes)
    read, _ = AnomalyAssistantModel._distinct_crops(model._flat_crops(inputs["pixel_values"], counts), counts)
    n_read = sum(counts) if read is None else len(read)
    print(f"{args.batch} images of {args.size}x{args.size}: {sum(counts)} crops, {n_read} distinct")
    once, every = {}, {}
    for key, fn in cases(model, inputs["pixel_values"], sizes).items():
        fn()  # warm-up
        for _ in range(args.repeats):  # interleaved, so a machine that slows down slows both sides alike
            every_crop(True)
            every.setdefault(key, []).extend(timed(fn, 1))
            every_crop(False)
            once.setdefault(key, []).extend(timed(fn, 1))
    once = {k: statistics.median(v) for k, v in once.items()}
    every = {k: statistics.median(v) for k, v in every.items()}
    print("| encode_images | every crop (baseline) | each distinct crop once | speed-up |\n| --- | --- | --- | --- |")
    for key in once:
        print(f"| {key} | {every[key] * 1000:.1f} ms | {once[key] * 1000:.1f} ms | {every[key] / once[key]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
