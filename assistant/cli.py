"""`anomaly-assistant`: ask about an image from the command line.

    anomaly-assistant ask part.png                       # the embedded default model
    anomaly-assistant ask part.png -q "Where is the defect?" --heatmap overlay.png
    anomaly-assistant ask part.png --model ./my-checkpoint --reference good1.png good2.png --json
    anomaly-assistant ask part.png --server http://127.0.0.1:8000   # a running `serve` answers: no model loads here
    ANOMALY_ASSISTANT_SERVER=http://127.0.0.1:8000 anomaly-assistant ask part.png   # the same, for every `ask`
    anomaly-assistant inspect ./parts --reference ./good --model ./my-checkpoint --out ./inspection [--recursive]
    anomaly-assistant convert-expert --base ./llava-onevision-qwen2-0.5b-ov-hf --expert pretrained_expert_05b.pth --out ./anomaly-ov-0.5b
    anomaly-assistant serve --model ./my-checkpoint --api-key-env ANOMALY_KEY    # OpenAI-compatible, http://127.0.0.1:8000/v1

Bad input (unreadable image, bad model path, an over-long question, an output file that already exists
without --overwrite) prints one line on stderr and exits with code 2 (`assistant.errors.run_main`); nothing
the user gave is written over. A question left out or blank asks the default question, as in the app.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import UsageError, checked_question, run_main

#: a running server's address that every `ask` uses unless --server or --local says otherwise
SERVER_ENV = "ANOMALY_ASSISTANT_SERVER"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomaly-assistant", description="Visual anomaly inspection with an LLM that shows its evidence."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer a question about one image, with score, heatmap and boxes")
    ask.add_argument("image", help="the image to inspect")
    ask.add_argument(
        "-q", "--question", default=None, help="question (left out or blank: is there an anomaly, where, what)"
    )
    ask.add_argument("--model", default="default", help="checkpoint folder, hub id, or 'default' (the embedded model)")
    ask.add_argument(
        "--expert", default=None, help="Anomaly-OV expert weights (.pth) to add to a LLaVA-OneVision model"
    )
    ask.add_argument(
        "--reference",
        nargs="+",
        default=[],
        metavar="IMG",
        help="images of the same object known to be normal, or folders of them",
    )
    ask.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ask.add_argument(
        "--heatmap", default=None, metavar="OUT.png", help="write the overlay (heatmap, contours, boxes) here"
    )
    ask.add_argument(
        "--overwrite", action="store_true", help="let --heatmap replace an existing file (its folder is created)"
    )
    ask.add_argument("--max-new-tokens", type=int, default=128)
    ask.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ask.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ask.add_argument("--temperature", type=float, default=0.7)
    ask.add_argument("--top-p", type=float, default=0.9)
    ask.add_argument("--seed", type=int, default=0, help="random seed for --sample")
    ask.add_argument(
        "--server",
        default=None,
        metavar="URL",
        help="ask a running `anomaly-assistant serve` at this address (e.g. http://127.0.0.1:8000) instead of "
        f"loading the model here: no torch or transformers to import, an answer in about a second (default: "
        f"${SERVER_ENV} when set)",
    )
    ask.add_argument("--local", action="store_true", help=f"load the model here even when ${SERVER_ENV} names a server")
    ask.add_argument(
        "--api-key-env",
        metavar="VAR",
        default=None,
        help="with --server: the server's API key, read from this variable",
    )

    inspect = sub.add_parser("inspect", help="score every image of a folder: scores.csv, overlays, an HTML gallery")
    inspect.add_argument("folder", help="the folder of images to inspect")
    inspect.add_argument(
        "--out", required=True, help="new (or empty) folder for scores.csv, reports.jsonl, overlays/, index.html"
    )
    inspect.add_argument(
        "--reference", default=None, metavar="DIR", help="a folder of images of the same object known to be normal"
    )
    inspect.add_argument(
        "--model", default="default", help="checkpoint folder, hub id, or 'default' (the embedded model)"
    )
    inspect.add_argument(
        "--expert", default=None, help="Anomaly-OV expert weights (.pth) to add to a LLaVA-OneVision model"
    )
    inspect.add_argument("--recursive", action="store_true", help="also inspect images in subfolders")
    inspect.add_argument("--batch-size", type=int, default=8, help="images through the tower and expert at a time")
    inspect.add_argument(
        "--zero-shot",
        choices=["auto", "single", "batch"],
        default="auto",
        help="without --reference: score each image on its own (single) or against the folder's other images (batch, "
        "MuSc-style); auto: batch from 8 images on",
    )
    inspect.add_argument(
        "--save-maps",
        action="store_true",
        help="also write each anomaly map to maps/ as a 16-bit grey PNG at the image's size (value x 65535)",
    )
    inspect.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])

    convert = sub.add_parser(
        "convert-expert", help="LLaVA-OneVision base + Anomaly-OV expert .pth → a safetensors checkpoint"
    )
    convert.add_argument("--base", required=True, help="llava-hf LLaVA-OneVision checkpoint folder or hub id")
    convert.add_argument("--expert", required=True, help="pretrained_expert_05b.pth or pretrained_expert_7b.pth")
    convert.add_argument("--out", required=True, help="new folder for the converted checkpoint")

    serve = sub.add_parser("serve", help="an OpenAI-compatible chat-completions endpoint (POST /v1/chat/completions)")
    serve.add_argument(
        "--model", default="default", help="checkpoint folder, hub id, or 'default' (the embedded model)"
    )
    serve.add_argument(
        "--expert", default=None, help="Anomaly-OV expert weights (.pth) to add to a LLaVA-OneVision model"
    )
    serve.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    key = serve.add_mutually_exclusive_group()
    key.add_argument(
        "--api-key-env",
        metavar="VAR",
        default=None,
        help="require 'Authorization: Bearer <key>', the key read from this environment variable",
    )
    key.add_argument("--api-key-file", metavar="FILE", default=None, help="the same, the key read from this file")
    serve.add_argument("--max-request-mb", type=float, default=20.0, help="largest request body, in MiB (413 above)")
    serve.add_argument(
        "--max-tokens", type=int, default=512, help="cap on generated tokens; larger max_tokens are clamped"
    )
    serve.add_argument(
        "--max-prompt-chars", type=int, default=16_000, help="cap on the text of all messages together (400 above)"
    )
    serve.add_argument(
        "--max-images", type=int, default=5, help="cap on images per request: the inspected one plus references"
    )
    serve.add_argument("--queue-size", type=int, default=8, help="requests waiting or running before new ones get 429")
    return parser


def _check_output(path: str | None, overwrite: bool) -> Path | None:
    if path is None:
        return None
    out = Path(path)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
        raise UsageError(f"--heatmap must end in .png, .jpg, .webp or .bmp: '{path}'")
    if out.is_dir():
        raise UsageError(f"--heatmap '{path}' is a folder")
    if out.exists() and not overwrite:
        raise UsageError(f"'{path}' already exists; pass --overwrite to replace it")
    if out.parent.exists() and not out.parent.is_dir():
        raise UsageError(f"the folder for --heatmap is a file: '{out.parent}'")
    return out


def _reference_paths(entries: list[str]) -> list[Path]:
    """`ask --reference` entries as image paths: a folder stands for the image files in it (as `inspect --reference`)."""
    from .batch import find_images

    paths = []
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            found = find_images(path)
            if not found:
                raise UsageError(f"no image files in --reference '{entry}'")
            paths.extend(found)
        else:
            paths.append(path)
    return paths


def _ask(args) -> int:
    from .limits import MAX_QUESTION_CHARS

    question = checked_question(args.question, MAX_QUESTION_CHARS)  # left out or blank: the default question
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    heatmap = _check_output(args.heatmap, args.overwrite)
    args.server_from_env = args.server is None and not args.local
    args.server = _server_of(args)
    if args.server is not None:
        return _ask_server(args, question, heatmap)
    if args.api_key_env is not None:
        raise UsageError("--api-key-env is the key of a server: give --server too")
    from .imageio import load_image

    image = load_image(args.image)
    references = [load_image(path) for path in _reference_paths(args.reference)]

    _quiet_libraries()  # inputs are checked above before torch and transformers load (seconds)
    from .inference import AnomalyAssistant

    assistant = AnomalyAssistant.from_pretrained(args.model, device=args.device, expert=args.expert)
    generate = {}
    if args.sample:
        import torch

        torch.manual_seed(args.seed)
        generate = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    report = assistant.analyze(image, question, references=references, max_new_tokens=args.max_new_tokens, **generate)

    written = None
    if heatmap is not None:
        if report.anomaly_map is None:
            _no_heatmap(args.model)
        else:
            written = _write_heatmap(heatmap, assistant.visualize(report).save)
    _print_answer(report.answer, report.evidence(), written, args.json)
    return 0


def _server_of(args) -> str | None:
    """The server `ask` talks to: --server, else $ANOMALY_ASSISTANT_SERVER unless --local; None: load the model here."""
    if args.local:
        if args.server is not None:
            raise UsageError("--local loads the model here and --server asks a server: give one of them")
        return None
    if args.server is not None:
        return args.server
    return os.environ.get(SERVER_ENV, "").strip() or None


def _ask_server(args, question: str | None, heatmap: Path | None) -> int:
    """`ask --server`: the same command, answered by a running server (`assistant.client`); no model loads here."""
    from .client import ask_server
    from .limits import DEFAULT_QUESTION

    if args.expert is not None or args.device != "cpu":
        where = f"${SERVER_ENV} (add --local to load the model here)" if args.server_from_env else "--server"
        raise UsageError(f"--expert and --device choose a model loaded here; with {where} the server's model answers")
    api_key = None
    if args.api_key_env is not None:
        api_key = os.environ.get(args.api_key_env, "").strip()
        if not api_key:
            raise UsageError(f"the environment variable {args.api_key_env} given to --api-key-env is unset or empty")
    from .imageio import load_image

    references = _reference_paths(args.reference)
    for path in [args.image, *references]:
        load_image(path)  # a bad file is refused here, as a local run would, before anything is sent
    answer, report = ask_server(
        args.server,
        Path(args.image),
        references,
        question or DEFAULT_QUESTION,
        model=None if args.model == "default" else args.model,  # left as is: whatever the server serves
        api_key=api_key,
        max_tokens=args.max_new_tokens,
        temperature=args.temperature if args.sample else 0.0,
        top_p=args.top_p,
        seed=args.seed,
    )
    png = report.pop("heatmap_png", None)
    written = None
    if heatmap is not None:
        if png is None:
            _no_heatmap(report.get("model") or args.server)
        else:
            written = _write_heatmap(heatmap, lambda path: _save_png(png, path))
    _print_answer(answer, report, written, args.json)
    return 0


def _save_png(png_base64: str, path: Path) -> None:
    import base64

    data = base64.b64decode(png_base64)
    if path.suffix.lower() == ".png":
        path.write_bytes(data)
        return
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.convert("RGB").save(path)


def _no_heatmap(model: str) -> None:
    print(f"note: the model '{model}' has no anomaly expert, so there is no heatmap to write", file=sys.stderr)


def _write_heatmap(heatmap: Path, save) -> str:
    """Write the overlay through a temporary file beside `heatmap`, so a failed write leaves nothing half done."""
    heatmap.parent.mkdir(parents=True, exist_ok=True)
    tmp = heatmap.with_name(f".{heatmap.name}.partial{heatmap.suffix}")
    save(tmp)
    os.replace(tmp, heatmap)
    return str(heatmap)


def _print_answer(answer: str, evidence: dict, heatmap: str | None, as_json: bool) -> None:
    """What `ask` prints, the same whether the model ran here or on a server: `evidence` is `AnomalyReport.evidence`."""
    if as_json:
        from .jsonutil import answer_record

        print(json.dumps(answer_record(answer, evidence, heatmap)))
        return
    for warning in evidence.get("warnings") or []:
        print(f"warning: {warning}", file=sys.stderr)
    if evidence.get("score") is not None:
        verdict = "ANOMALOUS" if evidence["anomalous"] else "normal"
        where = f", {evidence['location']}" if evidence.get("location") else ""
        from .calibration import shown

        score, threshold = shown(evidence["score"], evidence["threshold"])
        print(f"verdict: {verdict} (score {score}, threshold {threshold}{where})")
    print(answer)
    if heatmap:
        print(f"heatmap: {heatmap}")


def _inspect(args) -> int:
    from .batch import find_images, inspect_folder
    from .imageio import ImageInputError, load_image

    folder, out = Path(args.folder), Path(args.out)
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if not folder.is_dir():
        raise UsageError(f"'{args.folder}' is not a folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out '{args.out}' already exists and is not an empty folder; choose a new one")
    images = find_images(folder, args.recursive, exclude=out)
    if not images:
        raise UsageError(
            f"no image files in '{args.folder}'" + ("" if args.recursive else " (use --recursive for subfolders)")
        )
    references = []
    if args.reference is not None:
        if not Path(args.reference).is_dir():
            raise UsageError(f"--reference '{args.reference}' is not a folder")
        reference_files = find_images(Path(args.reference))
        if not reference_files:
            raise UsageError(f"no image files in --reference '{args.reference}'")
        try:
            references = [load_image(path) for path in reference_files]
        except ImageInputError as error:
            raise UsageError(f"a reference image is unusable: {error}") from error

    _quiet_libraries()  # inputs are checked above before torch and transformers load (seconds)
    from .inference import AnomalyAssistant

    assistant = AnomalyAssistant.from_pretrained(args.model, device=args.device, expert=args.expert)
    if not assistant.has_expert:
        raise UsageError(
            f"the model '{args.model}' has no anomaly expert, so it cannot score images; give --expert or another --model"
        )
    results = inspect_folder(
        assistant,
        folder,
        out,
        references,
        recursive=args.recursive,
        batch_size=args.batch_size,
        zero_shot=args.zero_shot,
        save_maps=args.save_maps,
    )
    failed = sum(item.error is not None for item in results)
    anomalous = sum(bool(item.label) for item in results)
    print(
        f"{len(results) - failed} images scored, {anomalous} anomalous, {failed} unreadable; see {out / 'index.html'}"
    )
    warned = [item for item in results if item.warnings]
    if warned:
        print(
            f"note: {len(warned)} of {len(results) - failed} reports carry a warning (the first: {warned[0].warnings[0]}); "
            f"all in {out / 'warnings.txt'}",
            file=sys.stderr,
        )
    return 0


def _convert(args) -> int:
    _quiet_libraries()
    from .checkpoint import convert_anomaly_ov

    out = convert_anomaly_ov(args.base, args.expert, args.out)
    print(f"wrote {out}")
    return 0


def _api_key(args) -> str | None:
    if args.api_key_env is not None:
        key = os.environ.get(args.api_key_env, "").strip()
        if not key:
            raise UsageError(f"the environment variable {args.api_key_env} given to --api-key-env is unset or empty")
        return key
    if args.api_key_file is not None:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(
                f"cannot read --api-key-file '{args.api_key_file}': {getattr(error, 'strerror', None) or error}"
            ) from error
        if not key:
            raise UsageError(f"--api-key-file '{args.api_key_file}' is empty")
        return key
    return None


def _serve(args) -> int:
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be between 1 and 65535, not {args.port}")
    for flag, value in (
        ("--max-tokens", args.max_tokens),
        ("--max-prompt-chars", args.max_prompt_chars),
        ("--max-images", args.max_images),
        ("--queue-size", args.queue_size),
    ):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1")
    if not args.max_request_mb > 0:
        raise UsageError("--max-request-mb must be above 0")
    key = _api_key(args)
    if key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} with no API key: anyone who can reach it can use it", file=sys.stderr)

    _quiet_libraries()  # inputs are checked above before torch and transformers load (seconds)
    from .server import ServerSettings, serve

    settings = ServerSettings(
        api_key=key,
        max_request_bytes=int(args.max_request_mb * 1024 * 1024),
        max_tokens=args.max_tokens,
        default_max_tokens=min(256, args.max_tokens),
        max_prompt_chars=args.max_prompt_chars,
        max_images=args.max_images,
        queue_size=args.queue_size,
    )
    serve(args.model, args.host, args.port, settings, device=args.device, expert=args.expert)
    return 0


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    return {"ask": _ask, "inspect": _inspect, "convert-expert": _convert, "serve": _serve}[args.command](args)


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
