"""Pixel preprocessing: `AssistantProcessor.preprocess` against the LLaVA-OneVision image processor it stands for (the
baseline, in the same process), on the embedded default model.

    python bench/bench_preprocess.py                  # 300 images of 128x128 (the default model's training images)
    python bench/bench_preprocess.py --size 200 --n 100

A square RGB image whose best anyres resolution is a single tile is made with one resize (its tile repeats its
base view); every other layout goes to the processor itself, so there both sides take the same time. The outputs
are compared bit for bit. Median of `--repeats` interleaved passes.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a data-loader or cache worker
    processor = AnomalyAssistant.from_pretrained(args.model).processor
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)) for _ in range(args.n)]
    ours = [processor.preprocess([im], zoom=False) for im in images]
    theirs = [processor.image_processor([im], return_tensors="pt") for im in images]
    same = all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(ours, theirs))
    times = {"processor": [], "preprocess": []}
    for _ in range(args.repeats):
        for name, fn in (
            ("processor", lambda im: processor.image_processor([im], return_tensors="pt")),
            ("preprocess", lambda im: processor.preprocess([im], zoom=False)),
        ):
            start = time.perf_counter()
            for im in images:
                fn(im)
            times[name].append((time.perf_counter() - start) / len(images) * 1000)
    base, new = statistics.median(times["processor"]), statistics.median(times["preprocess"])
    print(f"{args.n} images of {args.size}x{args.size}, one thread; identical pixels: {same}")
    print(f"image processor {base:.2f} ms/image, AssistantProcessor.preprocess {new:.2f} ms/image: {base / new:.2f}x")


if __name__ == "__main__":
    main()
