"""Detection path throughput: images through the vision tower and the expert in batches vs one at a time.

    python bench/bench_detect.py                         # CPU, SigLIP-so400m/384 tower, 8 images
    python bench/bench_detect.py --device cuda --images 64 --batch-size 16
    python bench/bench_detect.py --detection-views 8    # also: batches scored over 8 flips and turns, vs 1
    python bench/bench_detect.py --model default         # the shipped default model at 256×256: each scoring mode

With `--model default` (or a checkpoint folder) it times `AnomalyAssistant` on 256×256 images with torch's threads
set to `--threads` (2): zero-shot one image at a time (what `ask` does without its text); few-shot with 4 normal
references, and with 40 (the set's bank cut to a coreset once, against the baseline of rebuilding it each call); the
folder mode (each image against the others, at most `MAX_PEERS` of them) at 50, 200 and 1,000 images
(`--folder-sizes`; `--all-pairs` also times each folder above the peer sample against all its other images, the
baseline); and `anomaly-assistant ask` end to end in a fresh process (start-up, model load and the answer included),
against `ask --server` with the same model already served (`anomaly-assistant serve`).

The tower has LLaVA-OneVision-0.5B's sizes (SigLIP-so400m-patch14-384) with random weights; the expert
has Anomaly-OV's sizes and scores the base view (`views="base"`). The LLM plays no part in detection, so
a tiny one stands in. Prints images/s for both and the ratio, from one run in one process; with
`--detection-views N`, also the batched path with `config.detection_views = N` and its cost against one view.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2Config
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from assistant.checkpoint import ANOMALY_OV_LAYERS
from assistant.config import LLAVA_OV_GRID_PINPOINTS, AnomalyAssistantConfig
from assistant.expert import ExpertConfig
from assistant.modeling import AnomalyAssistantModel
from assistant.patch_memory import MAX_PEERS
from assistant.selector import SelectorConfig


def build(device, dtype) -> AnomalyAssistantModel:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_inference import llava_onevision_05b_config

    vision = llava_onevision_05b_config().vision_config
    text = Qwen2Config(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    config = AnomalyAssistantConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=999,
        expert_config=ExpertConfig(feature_layers=ANOMALY_OV_LAYERS, views="base").to_dict(),
        selector_config=SelectorConfig().to_dict(),
        image_grid_pinpoints=LLAVA_OV_GRID_PINPOINTS,
    )
    torch.manual_seed(0)
    return AnomalyAssistantModel(config).to(device, dtype).eval()


def model_modes(args) -> None:
    """Images/s of each scoring mode of a real checkpoint, and `ask`'s wall time."""
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from assistant import AnomalyAssistant

    torch.set_num_threads(args.threads)
    assistant = AnomalyAssistant.from_pretrained(args.model)
    rng = np.random.default_rng(0)

    def images(n):
        return [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(n)]

    def rate(fn, n) -> float:
        fn()  # warm-up
        start = time.perf_counter()
        fn()
        return n / (time.perf_counter() - start)

    single, references = images(20), images(4)
    print(f"model {args.model}, 256×256 images, {torch.get_num_threads()} threads")
    print(
        f"  zero-shot, one image at a time  {rate(lambda: [assistant.detect(im) for im in single], 20):7.2f} images/s"
    )
    print(
        f"  few-shot, 4 references          {rate(lambda: [assistant.detect(im, references=references) for im in single], 20):7.2f} images/s"
    )
    many = images(100)  # a reference folder of 100 images (its bank: 25,600 patches of 256 px images)
    start = time.perf_counter()
    assistant.detect(single[0], references=many)
    first = time.perf_counter() - start
    per_image = 1 / rate(lambda: [assistant.detect(im, references=many) for im in single[:5]], 5)
    query = assistant.processor.preprocess(single[:1])
    refs = assistant.processor.preprocess(many)
    start = time.perf_counter()
    with torch.no_grad():  # the baseline: the references' pixels each call, so their floor and bank are rebuilt
        assistant.model.detect(query["pixel_values"], query["image_sizes"], refs["pixel_values"], refs["image_sizes"])
    rebuilt = time.perf_counter() - start
    print(
        f"  few-shot, 100 references        first image {first:.1f} s (the set's floor, typical scores and bank), then "
        f"{per_image:.2f} s per image; {rebuilt:.1f} s per image with the bank rebuilt each call "
        f"({rebuilt / per_image:.0f}x)"
    )
    for n in args.folder_sizes:
        folder = images(n)
        start = time.perf_counter()
        assistant.detect_batch(folder, zero_shot="batch", batch_size=16)
        seconds = time.perf_counter() - start
        print(f"  folder mode, {n:4d} images         {n / seconds:7.2f} images/s ({seconds:.1f} s in all)")
        if n > MAX_PEERS + 1 and args.all_pairs:  # the baseline: every image against all the others
            model = assistant.model
            model.detect_folder = partial(model.detect_folder, peers=n - 1)
            start = time.perf_counter()
            assistant.detect_batch(folder, zero_shot="batch", batch_size=16)
            baseline = time.perf_counter() - start
            del model.detect_folder  # back to the class's method
            print(
                f"    against all {n - 1} others instead of {MAX_PEERS}: {baseline:.1f} s "
                f"({baseline / seconds:.2f}x the sampled peers' time)"
            )
    command = shutil.which("anomaly-assistant")
    argv = [command] if command else [sys.executable, "-m", "assistant"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "part.png"
        images(1)[0].save(path)
        start = time.perf_counter()
        subprocess.run([*argv, "ask", str(path), "--model", args.model], check=True, capture_output=True)
        fresh = time.perf_counter() - start
        print(f"  anomaly-assistant ask, end to end {fresh:6.2f} s (fresh process)")
        served = ask_with_server(argv, path, args.model)
        print(
            f"  ask --server, end to end         {served:6.2f} s (median of 3; a running `serve` of the same model; "
            f"{fresh / served:.1f}x faster)"
        )


def ask_with_server(argv: list[str], path, model: str) -> float:
    """Median wall time of `ask --server` against `anomaly-assistant serve` started here (its start-up not counted)."""
    import socket
    import statistics
    import subprocess
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [*argv, "serve", "--model", model, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("anomaly-assistant serve did not come up")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
                break
            except OSError:
                time.sleep(0.25)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run(
                [*argv, "ask", str(path), "--server", f"http://127.0.0.1:{port}"], check=True, capture_output=True
            )
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        server.terminate()
        server.wait(timeout=30)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="time this checkpoint's scoring modes instead ('default': the shipped one)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads with --model")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    parser.add_argument("--detection-views", type=int, default=1, choices=[1, 2, 4, 8])
    parser.add_argument(
        "--folder-sizes", type=int, nargs="+", default=[50, 200, 1000], help="folder-mode sizes timed with --model"
    )
    parser.add_argument(
        "--all-pairs",
        action="store_true",
        help="with --model, also time each folder above the peer sample against all its other images (the baseline)",
    )
    args = parser.parse_args()
    if args.model is not None:
        return model_modes(args)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(device, dtype)
    processor = LlavaOnevisionImageProcessorPil(
        size={"height": 384, "width": 384},
        image_grid_pinpoints=LLAVA_OV_GRID_PINPOINTS,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    rng = np.random.default_rng(0)
    h, w = args.image_size
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(args.images)]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def one_at_a_time():
        scores = []
        for image in images:
            px = processor([image], return_tensors="pt")
            scores.append(model.detect(px["pixel_values"].to(device), px["image_sizes"])[1])
        return torch.cat(scores)

    def batched():
        scores = []
        for start in range(0, len(images), args.batch_size):
            px = processor(images[start : start + args.batch_size], return_tensors="pt")
            scores.append(model.detect(px["pixel_values"].to(device), px["image_sizes"])[1])
        return torch.cat(scores)

    with torch.no_grad():
        model.detect(
            *(lambda p: (p["pixel_values"].to(device), p["image_sizes"]))(processor(images[:1], return_tensors="pt"))
        )  # warm-up
        timings = {}
        for name, fn in [("one at a time", one_at_a_time), (f"batches of {args.batch_size}", batched)]:
            sync()
            start = time.perf_counter()
            scores = fn()
            sync()
            timings[name] = (time.perf_counter() - start, scores)
    (t1, s1), (t2, s2) = timings.values()
    print(f"{args.images} images of {h}×{w}, tower SigLIP-so400m/384, device {device}, {dtype}")
    for name, (seconds, _) in timings.items():
        print(f"  {name:16s} {args.images / seconds:7.2f} images/s")
    print(f"batched / one at a time: {t1 / t2:.2f}×   (max |score difference| {float((s1 - s2).abs().max()):.1e})")
    if args.detection_views > 1:
        model.config.detection_views = args.detection_views
        with torch.no_grad():
            sync()
            start = time.perf_counter()
            batched()
            sync()
            t3 = time.perf_counter() - start
        print(
            f"  {f'{args.detection_views} views':16s} {args.images / t3:7.2f} images/s: {t3 / t2:.2f}× the time of one view"
        )


if __name__ == "__main__":
    main()
