"""Inference latency at real base sizes: transformers vs. this model vs. the detection path.

    python bench/bench_inference.py                      # CPU, fp32, one 384×384 image, LLaVA-OneVision-0.5B
    python bench/bench_inference.py --device cuda        # on a GPU (bf16)
    python bench/bench_inference.py --image-size 768 512 --new-tokens 32 --repeats 3
    python bench/bench_inference.py --base qwen2_5_vl --device cuda          # Qwen2.5-VL-3B sizes
    python bench/bench_inference.py --base qwen2_5_vl --layers 2 --image-size 224 224   # a quick CPU check

Sizes are those of llava-onevision-qwen2-0.5b-ov (SigLIP-so400m-patch14-384 + Qwen2-0.5B) or of Qwen2.5-VL-3B-Instruct
(`--base qwen2_5_vl`), randomly initialised from the configs below — nothing is downloaded; latency does not depend
on weight values. `--layers N` keeps the widths and cuts both towers and the LLM to N blocks (a smoke run).
Three paths, measured in one process on the same weights and the same pixels:

  (i)   transformers' LlavaOnevisionForConditionalGeneration (or Qwen2_5_VLForConditionalGeneration).generate
  (ii)  this model: vision tower + anomaly expert (Anomaly-OV sizes) + look-twice tokens + the LLM
  (iii) the detection-only path: vision tower + expert + selector, no LLM

Time to first token (TTFT) is from pixel tensors to the first generated token; decode tokens/s is
over the remaining tokens. Targets: (ii)/(i) TTFT ≤ 1.15; (iii) ≥ 5× faster than (ii)'s TTFT.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LogitsProcessor,
    LogitsProcessorList,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from assistant.checkpoint import ANOMALY_OV_LAYERS, add_expert, compose_from_llava
from assistant.config import LLAVA_OV_GRID_PINPOINTS
from assistant.expert import ExpertConfig
from assistant.projector import num_crops, num_image_tokens
from assistant.selector import SelectorConfig

IMAGE_TOKEN, VIDEO_TOKEN = 151646, 151647


QWEN_IMAGE, QWEN_VIDEO, QWEN_VISION_START, QWEN_VISION_END = 151655, 151656, 151652, 151653


def qwen2_5_vl_3b_config(layers: int | None = None):
    """Qwen2.5-VL-3B-Instruct's sizes; `layers` cuts the tower and the LLM to that many blocks."""
    from transformers import Qwen2_5_VLConfig

    depth = layers or 32
    vision = {
        "depth": depth,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "tokens_per_second": 2,
        "hidden_act": "silu",
        "fullatt_block_indexes": [i for i in (7, 15, 23, 31) if i < depth] or [depth - 1],
    }
    text = {
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": layers or 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    }
    return Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=QWEN_IMAGE,
        video_token_id=QWEN_VIDEO,
        vision_start_token_id=QWEN_VISION_START,
        vision_end_token_id=QWEN_VISION_END,
        tie_word_embeddings=True,
    )


def llava_onevision_05b_config() -> LlavaOnevisionConfig:
    vision = SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=26,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
        layer_norm_eps=1e-6,
    )
    text = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=LLAVA_OV_GRID_PINPOINTS,
        tie_word_embeddings=True,
    )


class FirstTokenClock(LogitsProcessor):
    """Records when each next-token distribution is ready (the first one = end of prefill)."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        if scores.is_cuda:
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return scores


def prompt_ids(
    text_len: int,
    n_image: int,
    marker_len: int = 0,
    n_anomaly: int = 0,
    seed: int = 0,
    image_token: int = IMAGE_TOKEN,
    opening: list[int] = (),
) -> torch.Tensor:
    """A chat-shaped prompt: text, [opening,] image placeholders, [marker text, look-twice placeholders], text."""
    rng = np.random.default_rng(seed)
    text = lambda n: rng.integers(1000, 150000, n).tolist()  # noqa: E731
    ids = text(text_len // 2) + list(opening) + [image_token] * n_image
    if n_anomaly:
        ids += text(marker_len) + [image_token] * n_anomaly
    ids += text(text_len - text_len // 2)
    return torch.tensor([ids])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_generate(generate, new_tokens: int, device) -> tuple[float, float]:
    clock = FirstTokenClock()
    sync(device)
    start = time.perf_counter()
    generate(LogitsProcessorList([clock]), new_tokens)
    sync(device)
    ttft = clock.stamps[0] - start
    decode = (new_tokens - 1) / (clock.stamps[-1] - clock.stamps[0]) if len(clock.stamps) > 1 else float("nan")
    return ttft, decode


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--image-size", type=int, nargs=2, default=[384, 384], metavar=("H", "W"))
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs per path after one warm-up; the median is reported"
    )
    parser.add_argument(
        "--text-tokens", type=int, default=30, help="prompt text around the image (chat template + question)"
    )
    parser.add_argument(
        "--expert-views",
        default="base",
        choices=["base", "all"],
        help="the expert scores the base view only (detection runs the tower on one crop) or every tile",
    )
    parser.add_argument("--base", default="llava_onevision", choices=["llava_onevision", "qwen2_5_vl"])
    parser.add_argument(
        "--layers", type=int, default=None, help="qwen2_5_vl: blocks per tower and LLM (default: the real depth)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    setup = setup_qwen if args.base == "qwen2_5_vl" else setup_llava
    ours, run_reference, run_ours, detect_inputs = setup(args, device, dtype)
    common = dict(do_sample=False, min_new_tokens=args.new_tokens, pad_token_id=0, eos_token_id=None)

    def run_detect():
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            ours.detect(*detect_inputs)
        sync(device)
        return time.perf_counter() - start

    results = {"i": [], "ii": [], "iii": []}
    for repeat in range(args.repeats + 1):  # the first round warms up allocator and kernels
        round_ = {
            "i": timed_generate(lambda p, n: run_reference(p, n, common), args.new_tokens, device),
            "ii": timed_generate(lambda p, n: run_ours(p, n, common), args.new_tokens, device),
            "iii": (run_detect(), float("nan")),
        }
        if repeat:
            for key, value in round_.items():
                results[key].append(value)
    report(results, "Qwen2_5_VL" if args.base == "qwen2_5_vl" else "LlavaOnevision")


def built(start: float, ours, sizes: str, device, dtype) -> None:
    print(
        f"built random {sizes} models in {time.perf_counter() - start:.0f} s "
        f"({sum(p.numel() for p in ours.parameters()) / 1e6:.0f}M parameters incl. expert; device {device}, {dtype})"
    )


def random_image(args) -> Image.Image:
    height, width = args.image_size
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def runners(reference, ours, plain_ids, ours_ids, pixel_values, sizes, **reference_inputs):
    """(run (i), run (ii)): `reference.generate` on the plain prompt with the base's own image inputs, and ours on
    the prompt with the look-twice placeholders from the same pixels."""

    def run_reference(processors, n, common):
        with torch.no_grad():
            reference.generate(
                input_ids=plain_ids,
                attention_mask=torch.ones_like(plain_ids),
                pixel_values=pixel_values,
                max_new_tokens=n,
                logits_processor=processors,
                **reference_inputs,
                **common,
            )

    def run_ours(processors, n, common):
        with torch.no_grad():
            visual = ours.encode_images(pixel_values, sizes)
            ours.generate(ours_ids, visual=visual, max_new_tokens=n, logits_processor=processors, **common)

    return run_reference, run_ours


def setup_qwen(args, device, dtype):
    """(ours, run (i), run (ii), detection inputs) at Qwen2.5-VL-3B sizes; ours shares every module of (i)."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from assistant.qwen import compose_from_qwen2_5_vl

    build = time.perf_counter()
    reference = Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_3b_config(args.layers)).to(device, dtype).eval()
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    ours = compose_from_qwen2_5_vl(reference, processor)
    visual = ours.vision_tower  # the reference runs its tower through `model.visual`, as transformers does
    reference.model.visual = visual
    depth = ours.config.vision_config.depth
    layers = [max(1, round(depth * (i + 1) / 4)) for i in range(4)]
    add_expert(
        ours,
        ExpertConfig(feature_layers=sorted(set(layers)), embedding_dim=512, class_dim=512, predictor_dim=512),
        SelectorConfig(mode="pool", grid=2, attention_dim=512),
        seed=0,
    )
    ours.eval()
    built(build, ours, "Qwen2.5-VL-3B-size", device, dtype)
    height, width = args.image_size
    pixels = processor([random_image(args)], return_tensors="pt")
    pixel_values, grid = pixels["pixel_values"].to(device, dtype), pixels["image_grid_thw"].to(device)
    n_image = int(grid.prod()) // 4
    n_anomaly = ours.selector.config.tokens_per_image(1)
    plain_ids = prompt_ids(args.text_tokens, n_image, image_token=QWEN_IMAGE, opening=[QWEN_VISION_START]).to(device)
    ours_ids = prompt_ids(
        args.text_tokens,
        n_image,
        marker_len=7,
        n_anomaly=n_anomaly,
        image_token=QWEN_IMAGE,
        opening=[QWEN_VISION_START],
    ).to(device)
    types = (plain_ids == QWEN_IMAGE).int()
    print(
        f"image {height}×{width}: grid {grid.tolist()[0]}, {n_image} image tokens "
        f"(+{n_anomaly} look-twice tokens for (ii))"
    )
    sizes = [(height, width)]

    run_reference, run_ours = runners(
        reference, ours, plain_ids, ours_ids, pixel_values, sizes, image_grid_thw=grid, mm_token_type_ids=types
    )
    return ours, run_reference, run_ours, (pixel_values, sizes)


def setup_llava(args, device, dtype):
    """(ours, run (i), run (ii), detection inputs) at LLaVA-OneVision-0.5B sizes; ours shares every module of (i)."""
    build = time.perf_counter()
    reference = LlavaOnevisionForConditionalGeneration(llava_onevision_05b_config()).to(device, dtype).eval()
    ours = compose_from_llava(reference)  # shares every module with `reference`: one copy of the weights
    add_expert(
        ours,
        ExpertConfig(
            feature_layers=ANOMALY_OV_LAYERS,
            embedding_dim=512,
            class_dim=512,
            predictor_dim=512,
            views=args.expert_views,
        ),
        SelectorConfig(mode="pool", grid=2, attention_dim=512),
        seed=0,
    )
    ours.eval()
    built(build, ours, "0.5B-size", device, dtype)
    height, width = args.image_size
    image = random_image(args)
    processor = LlavaOnevisionImageProcessorPil(
        size={"height": 384, "width": 384},
        image_grid_pinpoints=LLAVA_OV_GRID_PINPOINTS,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    pixels = processor([image], return_tensors="pt")
    pixel_values, image_sizes = pixels["pixel_values"].to(device, dtype), pixels["image_sizes"].to(device)
    config = ours.config
    n_image = num_image_tokens(
        (height, width), config.image_grid_pinpoints, 384, config.llm_patches_per_side, config.vision_aspect_ratio
    )
    crops = num_crops((height, width), config.image_grid_pinpoints, 384)
    n_anomaly = ours.selector.config.tokens_per_image(1 if args.expert_views == "base" else crops)
    plain_ids = prompt_ids(args.text_tokens, n_image).to(device)
    ours_ids = prompt_ids(args.text_tokens, n_image, marker_len=7, n_anomaly=n_anomaly).to(device)
    print(
        f"image {height}×{width}: {crops} crops, {n_image} image tokens (+{n_anomaly} look-twice tokens for (ii)); "
        f"expert views: {args.expert_views}"
    )

    run_reference, run_ours = runners(
        reference, ours, plain_ids, ours_ids, pixel_values, image_sizes, image_sizes=image_sizes
    )
    return ours, run_reference, run_ours, (pixel_values, image_sizes)


def report(results: dict, family: str) -> None:
    med = {k: (statistics.median(t for t, _ in v), statistics.median(d for _, d in v)) for k, v in results.items()}
    names = {
        "i": f"(i)   transformers {family}",
        "ii": "(ii)  ours: expert + look-twice",
        "iii": "(iii) detection only (no LLM)",
    }
    print(f"\n{'path':36s} {'TTFT s':>8s} {'decode tok/s':>13s}")
    for key, (ttft, decode) in med.items():
        print(
            f"{names[key]:36s} {ttft:8.2f} {decode:13.1f}"
            if decode == decode
            else f"{names[key]:36s} {ttft:8.2f} {'-':>13s}"
        )
    ratio_ii = med["ii"][0] / med["i"][0]
    speedup_iii = med["ii"][0] / med["iii"][0]
    decode_ratio = med["ii"][1] / med["i"][1]
    print(
        f"\n(ii)/(i) time to first token: {ratio_ii:.3f}   (target ≤ 1.15: {'met' if ratio_ii <= 1.15 else 'NOT met'})"
    )
    print(f"(ii)/(i) decode tokens/s:     {decode_ratio:.3f}")
    print(
        f"(iii) vs (ii) TTFT speed-up:  {speedup_iii:.2f}×   (target ≥ 5: {'met' if speedup_iii >= 5 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
