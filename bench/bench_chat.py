"""Chat latency: (a) a cached follow-up turn vs. transformers re-running the conversation, (b) the endpoint under load.

    python bench/bench_chat.py                        # both parts on CPU; (a) takes several minutes on 2 cores
    python bench/bench_chat.py --skip-05b             # (b) only, a minute
    python bench/bench_chat.py --model ./my-checkpoint --clients 20 --requests 3   # (b) with a real checkpoint
    python bench/bench_chat.py --device cuda          # (a) on a GPU (bf16)

(a) At LLaVA-OneVision-0.5B sizes (SigLIP-so400m + Qwen2-0.5B, random weights from
    `bench_inference.llava_onevision_05b_config`, plus an Anomaly-OV-sized expert). One conversation:
    the question, the model's own answer, a follow-up question. Time to first token (TTFT) of the
    follow-up is the wall time of a call that generates exactly one token:
      cached    `AnomalyAssistant.chat(messages, image, max_new_tokens=1)` after turn 1 ran in the
                same session: the encoded image and the conversation's KV cache are reused, so only
                the tokens after the cached prefix are prefilled;
      baseline  `LlavaOnevisionForConditionalGeneration.generate(pixel_values=..., input_ids=<the
                whole conversation>, max_new_tokens=1)`: vision tower and full prefill again.
    Both run on the very same modules (`compose_from_llava` shares them: one copy of the weights),
    and turn 1 warms them. The tokenizer is this project's small random BPE (`train_tokenizer`) with
    the chat and image tokens; the model keeps Qwen2's 151936-word vocabulary (latency depends on
    shapes, not on which ids are used), turn 1 is kept to the tokenizer's ids (`suppress_tokens`) so
    its answer is real text, and `<image>` is the tokenizer's id. The figure is a ratio from one run.

(b) The OpenAI-compatible endpoint (`assistant.server`) in this process on a free loopback port; N
    client threads with the official `openai` client, each with its own random image, send requests
    at the same moment; p50/p95 of the full-response latency. A tiny random model unless --model.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_inference, next to this file

FIRST_QUESTION = "Is there any anomaly in this image? If so, where is it and what does it look like?"
FOLLOW_UP = "How severe is it, and what is the likely cause?"


def random_image(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


# -- (a) ---------------------------------------------------------------------------------------------------
def follow_up_ttft(args) -> None:
    from bench_inference import llava_onevision_05b_config
    from transformers import GenerationConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    from assistant.checkpoint import ANOMALY_OV_LAYERS, add_expert, compose_from_llava
    from assistant.config import LLAVA_OV_GRID_PINPOINTS
    from assistant.expert import ExpertConfig
    from assistant.inference import AnomalyAssistant
    from assistant.processing import AssistantProcessor, as_chat
    from assistant.selector import SelectorConfig
    from assistant.testing import train_tokenizer

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tokenizer = train_tokenizer()
    config = llava_onevision_05b_config()
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config.video_token_id = tokenizer.convert_tokens_to_ids("<video>")

    build = time.perf_counter()
    torch.manual_seed(0)
    reference = LlavaOnevisionForConditionalGeneration(config).to(device, dtype).eval()
    model = compose_from_llava(reference)
    add_expert(
        model,
        ExpertConfig(feature_layers=ANOMALY_OV_LAYERS, embedding_dim=512, class_dim=512, predictor_dim=512),
        SelectorConfig(mode="pool", grid=2, attention_dim=512),
        seed=0,
    )
    model.to(device, dtype).eval()
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": 384, "width": 384},
        image_grid_pinpoints=LLAVA_OV_GRID_PINPOINTS,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    processor = AssistantProcessor(tokenizer, image_processor, model.config)
    assistant = AnomalyAssistant(model, processor, GenerationConfig(), "llava-ov-0.5b-random", "assistant")
    print(f"(a) built random 0.5B-size models in {time.perf_counter() - build:.0f} s on {device} ({dtype})", flush=True)

    height, width = args.image_size
    image = random_image(height, width, seed=0)
    first = [{"role": "user", "content": FIRST_QUESTION}]
    outside_vocab = list(range(len(tokenizer), config.text_config.vocab_size))
    start = time.perf_counter()
    answer = assistant.chat(
        first, image, stream=False, max_new_tokens=args.answer_tokens, session="bench", suppress_tokens=outside_vocab
    )
    print(
        f"    turn 1 ({args.answer_tokens} tokens, fills both caches) took {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    conversation = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": FOLLOW_UP}]

    hits = assistant.kv_cache.hits
    sync()
    start = time.perf_counter()
    assistant.chat(conversation, image, stream=False, max_new_tokens=1, session="bench")
    sync()
    cached = time.perf_counter() - start
    reused = assistant.kv_cache.hits - hits

    # the baseline's prompt: the same conversation, `<image>` expanded to LLaVA-OneVision's image tokens only
    prompt = processor(processor.render(as_chat(conversation)), [image], pixels=processor.preprocess([image]))
    ids = prompt["input_ids"].to(device)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        reference.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=prompt["pixel_values"].to(device, dtype),
            image_sizes=prompt["image_sizes"].to(device),
            max_new_tokens=1,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    sync()
    baseline = time.perf_counter() - start

    print(
        f"    image {height}×{width}; follow-up prompt {ids.shape[1]} tokens for transformers (KV cache reused: {'yes' if reused else 'NO'})"
    )
    print(f"    follow-up TTFT, cached (AnomalyAssistant.chat):          {cached:8.2f} s")
    print(f"    follow-up TTFT, transformers re-running the conversation: {baseline:8.2f} s")
    print(f"    ratio baseline / cached: {baseline / cached:.1f}×", flush=True)


# -- (b) ---------------------------------------------------------------------------------------------------
def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def endpoint_latency(args) -> None:
    import openai
    import uvicorn

    from assistant.inference import AnomalyAssistant
    from assistant.server import ServerSettings, build_app
    from assistant.testing import tiny_assistant

    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or str(tiny_assistant(Path(scratch) / "tiny"))
        assistant = AnomalyAssistant.from_pretrained(model, device=args.device)
    label = args.model or "tiny random model (CLIP + Llama)"
    # served as "m": the model name the clients below ask for
    settings = ServerSettings(
        api_key="bench", max_tokens=args.max_tokens, queue_size=max(64, args.clients), model_name="m"
    )

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(assistant, settings), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)

    images = [_data_url(random_image(*args.load_image_size, seed=100 + i)) for i in range(args.clients)]
    latencies, failures = [], []
    lock, barrier = threading.Lock(), threading.Barrier(args.clients)

    def run_client(i: int) -> None:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=600)
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": FIRST_QUESTION},
                    {"type": "image_url", "image_url": {"url": images[i]}},
                ],
            }
        ]
        barrier.wait()
        for _ in range(args.requests):
            start = time.perf_counter()
            try:
                client.chat.completions.create(
                    model="m", messages=messages, max_tokens=args.max_tokens, user=f"client-{i}"
                )
            except openai.APIError as error:
                with lock:
                    failures.append(repr(error))
                continue
            with lock:
                latencies.append(time.perf_counter() - start)

    try:
        # one request first, so that the load does not include the first call's one-time costs
        warm = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=600)
        warm.chat.completions.create(
            model="m",
            max_tokens=args.max_tokens,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": images[0]}}],
                }
            ],
        )
        start = time.perf_counter()
        threads = [threading.Thread(target=run_client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()

    p50, p95 = (float(np.percentile(latencies, q)) for q in (50, 95)) if latencies else (float("nan"),) * 2
    print(
        f"(b) endpoint, {label}, {args.clients} clients × {args.requests} requests, max_tokens {args.max_tokens}, "
        f"images {args.load_image_size[0]}×{args.load_image_size[1]}:"
    )
    print(
        f"    latency p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms (mean {statistics.fmean(latencies) * 1000:.0f} ms); "
        f"{len(latencies) / wall:.1f} requests/s; {len(failures)} failed"
        + (f" (first: {failures[0]})" if failures else "")
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--skip-05b", action="store_true", help="skip (a), the 0.5B-size follow-up comparison (minutes on CPU)"
    )
    parser.add_argument("--skip-load", action="store_true", help="skip (b), the endpoint under load")
    parser.add_argument(
        "--image-size", type=int, nargs=2, default=[384, 384], metavar=("H", "W"), help="(a) image size"
    )
    parser.add_argument("--answer-tokens", type=int, default=16, help="(a) length of turn 1's answer")
    parser.add_argument("--model", default=None, help="(b) a checkpoint to serve instead of a tiny random one")
    parser.add_argument("--clients", type=int, default=20, help="(b) concurrent clients")
    parser.add_argument("--requests", type=int, default=3, help="(b) requests per client")
    parser.add_argument("--max-tokens", type=int, default=16, help="(b) max_tokens per request")
    parser.add_argument(
        "--load-image-size", type=int, nargs=2, default=[64, 64], metavar=("H", "W"), help="(b) image size"
    )
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    if not args.skip_load:
        endpoint_latency(args)
    if not args.skip_05b:
        follow_up_ttft(args)


if __name__ == "__main__":
    main()
