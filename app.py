"""The chat app: upload an image (and optional normal references), chat about it, see the evidence.

    python app.py                                   # the embedded default model, http://127.0.0.1:7860
    python app.py --model ./my-checkpoint --port 8080
    python app.py --model ./my-checkpoint --host 0.0.0.0 --auth inspector:s3cret --max-upload-mb 5

The same `AnomalyAssistant` as the CLI answers; the score, verdict and overlay come from its anomaly
expert. A named API endpoint serves scripts:

    from gradio_client import Client, handle_file
    answer, overlay_png, report = Client("http://127.0.0.1:7860").predict(
        handle_file("part.png"), "Is there a defect?", [], api_name="/analyze")

Safety: every conversation lives in its own session state; uploads are capped in bytes and decoded
only by the image decoders `assistant.imageio.image_from_upload` allows, whatever their names say;
file paths and URLs from clients are refused; requests wait in a bounded queue and model calls run
`--concurrency` at a time; the server binds to loopback unless told otherwise. A bad model path
prints one line on stderr and exits with code 2, before gradio is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the app imports PIL, torch and gradio only once it runs
    from PIL import Image

    from assistant.inference import AnomalyReport

EXIT_BAD_INPUT = 2
EXAMPLES = Path(__file__).resolve().parent / "examples"
AUTH_ENV = "ANOMALY_ASSISTANT_AUTH"  # "user:pass", read when --auth is not given (keeps it out of `ps`)


@dataclass(frozen=True)
class AppSettings:
    host: str = "127.0.0.1"
    port: int = 7860
    auth: tuple[str, str] | None = None
    max_upload_mb: float = 10.0
    concurrency: int = 1  # model calls at once, shared by every session and endpoint
    queue_size: int = 32  # requests waiting beyond that; more are turned away
    max_new_tokens: int = 256
    max_references: int = 8
    max_questions: int = 20  # per chat; "New chat" starts over

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


@dataclass
class Session:
    """One browser session's conversation: lives in `gr.State`, never shared."""

    key: tuple = ()  # the uploads (gradio's paths) the fields below were made from
    image: Image.Image | None = None  # decoded and checked by `image_from_upload`
    references: list[Image.Image] = field(default_factory=list)
    evidence: AnomalyReport | None = None  # from detection (no answer); None for a model without an expert
    messages: list[dict] = field(default_factory=list)  # [{"role", "content": str}], as `chat` takes them


class UsageError(ValueError):
    """Bad command-line input: one line on stderr, exit code 2."""


# -- command line ------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Chat with the anomaly inspection assistant in the browser.")
    parser.add_argument("--model", default="default", help="checkpoint folder, hub id, or 'default' (the embedded model)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--host", default=AppSettings.host, help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=AppSettings.port)
    parser.add_argument("--auth", default=None, metavar="USER:PASS", help=f"require a login (or set {AUTH_ENV})")
    parser.add_argument("--max-upload-mb", type=float, default=AppSettings.max_upload_mb, help="largest upload accepted")
    parser.add_argument("--concurrency", type=int, default=AppSettings.concurrency, help="model calls at once (default 1)")
    parser.add_argument("--queue-size", type=int, default=AppSettings.queue_size, help="requests allowed to wait")
    parser.add_argument("--max-new-tokens", type=int, default=AppSettings.max_new_tokens, help="longest answer, in tokens")
    return parser


def parse_settings(argv: list[str] | None = None, environ=os.environ) -> tuple[argparse.Namespace, AppSettings]:
    args = _parser().parse_args(argv)
    auth_text = args.auth if args.auth is not None else environ.get(AUTH_ENV)
    auth = None
    if auth_text is not None:
        user, sep, password = auth_text.partition(":")
        if not (sep and user and password):
            raise UsageError("--auth must be USER:PASS with both parts non-empty")
        auth = (user, password)
    for name in ("concurrency", "queue_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.max_upload_mb <= 1024:
        raise UsageError("--max-upload-mb must be above 0 and at most 1024")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a port number")
    settings = AppSettings(
        host=args.host,
        port=args.port,
        auth=auth,
        max_upload_mb=args.max_upload_mb,
        concurrency=args.concurrency,
        queue_size=args.queue_size,
        max_new_tokens=args.max_new_tokens,
    )
    return args, settings


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- uploads -----------------------------------------------------------------------------------------
class UploadRejected(ValueError):
    """An upload the app will not use; `field` says which box it came from ("image" or "references")."""

    def __init__(self, field: str, message: str):
        super().__init__(field, message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return self.message


def _upload_path(value, cache_dir: str, field: str) -> Path:
    """The local file behind an uploaded-file payload; anything else (a URL, a path elsewhere) is refused.

    Gradio itself refuses local paths outside its upload folder; this also says no to what it lets
    through (URLs, inline data) and checks the folder again.
    """
    if not isinstance(value, dict) or not isinstance(value.get("path"), str):
        raise UploadRejected(field, "Upload images as files (drag them in, browse, or paste).")
    path, url = value["path"], value.get("url") or ""
    if "://" in path or path.startswith("data:") or url.startswith("data:"):
        raise UploadRejected(field, "Images must be uploaded as files; URLs and inline data are not accepted.")
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(Path(cache_dir).resolve()) or not resolved.is_file():
        raise UploadRejected(field, "Images must be uploaded as files; that path is not an upload.")
    return resolved


def _read_upload(value, cache_dir: str, settings: AppSettings, field: str):
    """Decode one upload with `image_from_upload`: capped in bytes and pixels, format from the bytes."""
    from assistant.imageio import ImageInputError, image_from_upload
    from assistant.limits import MAX_IMAGE_PIXELS

    path = _upload_path(value, cache_dir, field)
    with open(path, "rb") as stream:  # one byte over the cap is enough to refuse it
        data = stream.read(settings.max_upload_bytes + 1)
    try:
        return image_from_upload(data, max_bytes=settings.max_upload_bytes, max_pixels=MAX_IMAGE_PIXELS)
    except ImageInputError as error:  # the reason only: the client's file name stays out of the page
        what = "image" if field == "image" else "reference image"
        raise UploadRejected(field, f"The {what} was rejected: {error.reason}.") from None


def _upload_key(value) -> str | None:
    return value.get("path") if isinstance(value, dict) else None


class RefuseFileURLs:
    """ASGI middleware: refuse requests that name a file by URL instead of uploading it.

    Gradio would fetch a public URL given as a file's path before any handler runs; the app takes
    images as uploads only. Bodies other than uploads are also capped (files travel as uploads).
    """

    def __init__(self, app, max_json_bytes: int = 1_000_000):
        self.app = app
        self.max_json_bytes = max_json_bytes

    async def __call__(self, scope, receive, send):
        headers = dict(scope.get("headers") or []) if scope["type"] == "http" else {}
        # every POST but file uploads, whatever content type the client claims
        if scope["type"] != "http" or scope["method"] != "POST" or headers.get(b"content-type", b"").startswith(b"multipart/"):
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_json_bytes:
                return await _reply(send, 413, "request body too large")
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            payload = None  # not ours to judge: the app answers it
        if payload is not None and _names_file_by_url(payload):
            return await _reply(send, 400, "files must be uploaded; URLs and paths are not accepted")
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def _names_file_by_url(payload) -> bool:
    """Whether any gradio file reference in a JSON payload has a URL (or inline data) as its path."""
    stack = [payload]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            meta = item.get("meta")
            path = item.get("path")
            if isinstance(meta, dict) and meta.get("_type") == "gradio.FileData" and isinstance(path, str):
                if "://" in path or path.startswith("data:"):
                    return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


async def _reply(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


# -- the app -----------------------------------------------------------------------------------------
class InspectionApp:
    """The event handlers. Holds the model and the settings only; conversations live in `Session`s."""

    def __init__(self, assistant, settings: AppSettings, cache_dir: str):
        self.assistant = assistant
        self.settings = settings
        self.cache_dir = cache_dir

    # evidence --------------------------------------------------------------------------------------
    def _prepare(self, image, references, session: Session | None) -> Session:
        """The session for these uploads: the same one if they did not change, else a fresh validated one."""
        if image is None:
            raise UploadRejected("image", "Upload an image first (or click an example).")
        references = list(references or [])
        if len(references) > self.settings.max_references:
            raise UploadRejected("references", f"At most {self.settings.max_references} reference images, please.")
        key = (_upload_key(image), tuple(_upload_key(ref) for ref in references))
        if session is not None and session.key == key and session.image is not None:
            return session
        picture = _read_upload(image, self.cache_dir, self.settings, "image")
        normals = [_read_upload(ref, self.cache_dir, self.settings, "references") for ref in references]
        evidence = self.assistant.detect(picture, normals) if self.assistant.has_expert else None
        return Session(key=key, image=picture, references=normals, evidence=evidence)

    def _report(self, session: Session, answer: str = ""):
        """The session's evidence as an `AnomalyReport` carrying `answer`."""
        from assistant.inference import AnomalyReport

        if session.evidence is None:  # a model without an anomaly expert
            return AnomalyReport(answer, None, None, None, None, model=self.assistant.name, image=session.image)
        return dataclasses.replace(session.evidence, answer=answer)

    def _panel(self, session: Session, answer: str = ""):
        """Overlay, verdict line and JSON report for a session."""
        report = self._report(session, answer)
        if report.pred_score is None:
            return session.image, "**No verdict**: this model has no anomaly expert (no score or heatmap).", report.to_dict()
        return self.assistant.visualize(report), _verdict(report), report.to_dict()

    def inspect(self, image, references, session: Session):
        """A new image or new references: reset the chat and show the evidence at once.

        A rejected upload is cleared from its box with a warning; the clearing fires this again, harmlessly.
        """
        import gradio as gr

        fresh = [], None, "", None, Session()  # chat, overlay, verdict, report, session
        if image is None:
            return gr.skip(), gr.skip(), *fresh
        try:
            session = self._prepare(image, references, None)
        except UploadRejected as error:
            gr.Warning(error.message)
            cleared = (None, gr.skip()) if error.field == "image" else (gr.skip(), None)
            return *cleared, *fresh
        return gr.skip(), gr.skip(), [], *self._panel(session), session

    # chat ------------------------------------------------------------------------------------------
    def respond(self, question, image, references, session: Session):
        """Stream the answer to one more question about the session's image."""
        import gradio as gr

        from assistant.limits import MAX_QUESTION_CHARS

        question = (question or "").strip()
        if not question:
            raise gr.Error("Type a question first.")
        if len(question) > MAX_QUESTION_CHARS:
            raise gr.Error(f"The question is too long ({len(question)} characters; at most {MAX_QUESTION_CHARS}).")
        try:
            session = self._prepare(image, references, session)
        except UploadRejected as error:
            raise gr.Error(error.message) from None
        asked = sum(message["role"] == "user" for message in session.messages)
        if asked >= self.settings.max_questions:
            raise gr.Error(f"This chat has {asked} questions already; press New chat to start over.")

        messages = [*session.messages, {"role": "user", "content": question}]
        overlay, verdict, report = self._panel(session)
        chunks = self.assistant.chat(messages, session.image, session.references, stream=True, max_new_tokens=self.settings.max_new_tokens)
        yield "", _display(messages, ""), overlay, verdict, report, session
        answer = ""
        for chunk in chunks:
            answer += chunk
            yield gr.skip(), _display(messages, answer), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        answer = answer.strip()
        session = dataclasses.replace(session, messages=[*messages, {"role": "assistant", "content": answer}])
        yield gr.skip(), _display(session.messages, None), gr.skip(), gr.skip(), self._report(session, answer).to_dict(), session

    @staticmethod
    def new_chat(session: Session):
        return [], "", dataclasses.replace(session, messages=[])

    # API -------------------------------------------------------------------------------------------
    def analyze(self, image, question, references):
        """One question, one answer: (answer, overlay image, JSON report)."""
        import gradio as gr

        from assistant.inference import DEFAULT_QUESTION
        from assistant.limits import MAX_QUESTION_CHARS

        question = (question or "").strip() or DEFAULT_QUESTION
        if len(question) > MAX_QUESTION_CHARS:
            raise gr.Error(f"The question is too long ({len(question)} characters; at most {MAX_QUESTION_CHARS}).")
        try:
            session = self._prepare(image, references, None)
        except UploadRejected as error:
            raise gr.Error(error.message) from None
        report = self.assistant.analyze(session.image, question, session.references, max_new_tokens=self.settings.max_new_tokens)
        overlay = self.assistant.visualize(report) if report.anomaly_map is not None else session.image
        return report.answer, overlay, report.to_dict()


def _verdict(report) -> str:
    words = "**ANOMALOUS**" if report.pred_label else "**Normal**"
    where = f" · {report.location}" if report.location else ""
    return f"{words} · score {report.pred_score:.3f} (threshold {report.threshold:.2f}){where}"


def _display(messages: list[dict], pending: str | None) -> list[dict]:
    """Chatbot messages: the conversation, plus the answer being streamed."""
    shown = [{"role": message["role"], "content": message["content"]} for message in messages]
    if pending is not None:
        shown.append({"role": "assistant", "content": pending or "…"})
    return shown


def build_app(assistant, settings: AppSettings):
    """The Blocks app, queued; launch it with `launch` (or in tests with `launch(..., block=False)`)."""
    import gradio as gr

    with gr.Blocks(title="Anomaly inspection assistant", analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        gr.Markdown(
            "## Anomaly inspection assistant\n"
            "Upload a picture of a part (optionally a few pictures of good parts as references) and ask about it. "
            "The verdict and heatmap come from the anomaly expert; the chat explains them."
        )
        session = gr.State(Session(), time_to_live=2 * 3600)
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=260):
                image = gr.Image(
                    label="Image to inspect", type="filepath", image_mode=None, sources=["upload", "clipboard"], height=300, elem_id="image-input"
                )
                references = gr.File(label="Normal references (optional)", file_count="multiple", file_types=["image"], height=150, elem_id="references")
            with gr.Column(scale=5, min_width=320):
                chatbot = gr.Chatbot(label="Chat", height=420, latex_delimiters=[], elem_id="chatbot")
                with gr.Row():
                    question = gr.Textbox(show_label=False, placeholder="Ask about the image, e.g. Is there a defect? Where?", scale=5, elem_id="question")
                    ask = gr.Button("Ask", variant="primary", scale=1, min_width=80, elem_id="ask")
                new_chat = gr.Button("New chat", size="sm", elem_id="new-chat")
            with gr.Column(scale=3, min_width=260):
                overlay = gr.Image(label="Evidence: heatmap, contours, boxes", type="pil", format="png", interactive=False, height=300, elem_id="overlay")
                verdict = gr.Markdown(elem_id="verdict")
                report = gr.JSON(label="Report", open=True, max_height=260, elem_id="report")
        gr.Examples(
            examples=[
                [str(EXAMPLES / "pill_contamination.png"), [str(EXAMPLES / "pill_good.png")], "Is this pill defective? Where?"],
                [str(EXAMPLES / "wood_stain.png"), None, "Is there any anomaly on this wood surface?"],
                [str(EXAMPLES / "cap_cut_paste.png"), None, "Describe anything unusual on this cap."],
                [str(EXAMPLES / "pill_good.png"), None, "Is this pill OK?"],
            ],
            inputs=[image, references, question],
            example_labels=["pill, contamination (+ a good reference)", "wood, stain", "cap, misplaced patch", "pill, good"],
            cache_examples=False,
            label="Examples (one click)",
        )
        with gr.Column(visible=False):  # the components of the API endpoint `analyze`
            api_image = gr.Image(label="image", type="filepath", image_mode=None, sources=["upload"])
            api_question = gr.Textbox(label="question")
            api_references = gr.File(label="references", file_count="multiple")
            api_answer = gr.Textbox(label="answer")
            api_overlay = gr.Image(label="overlay", type="pil", format="png")
            api_report = gr.JSON(label="report")
            api_button = gr.Button("analyze")

        handlers = InspectionApp(assistant, settings, cache_dir=image.GRADIO_CACHE)
        model = {"concurrency_id": "model", "concurrency_limit": settings.concurrency, "preprocess": False}
        panel = [overlay, verdict, report]
        gr.on(
            [image.change, references.change],
            handlers.inspect,
            [image, references, session],
            [image, references, chatbot, *panel, session],
            api_name="inspect",
            api_visibility="undocumented",
            **model,
        )
        gr.on(
            [ask.click, question.submit],
            handlers.respond,
            [question, image, references, session],
            [question, chatbot, *panel, session],
            api_name="ask",
            api_visibility="undocumented",
            **model,
        )
        new_chat.click(handlers.new_chat, [session], [chatbot, question, session], api_visibility="private")
        chatbot.clear(handlers.new_chat, [session], [chatbot, question, session], api_visibility="private")
        api_button.click(
            handlers.analyze,
            [api_image, api_question, api_references],
            [api_answer, api_overlay, api_report],
            api_name="analyze",
            api_description="Answer one question about an image (optionally with normal references): the answer, the overlay and the JSON report.",
            **model,
        )
    demo.queue(default_concurrency_limit=settings.concurrency, max_size=settings.queue_size, api_open=False)
    return demo


def launch(demo, settings: AppSettings, block: bool = True, quiet: bool = False):
    """Serve `demo` with the settings' address, login and upload cap; `block=False` returns at once."""
    from starlette.middleware import Middleware

    return demo.launch(
        app_kwargs={"middleware": [Middleware(RefuseFileURLs)]},
        server_name=settings.host,
        server_port=settings.port,
        auth=settings.auth,
        max_file_size=settings.max_upload_bytes,
        share=False,
        ssr_mode=False,
        mcp_server=False,
        run_history=False,
        show_error=False,
        prevent_thread_lock=not block,
        quiet=quiet,
    )


def _stop(signum, frame):
    raise KeyboardInterrupt  # gradio closes the server on it and `launch` returns


def main(argv: list[str] | None = None) -> int:
    try:
        args, settings = parse_settings(argv)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
        from assistant.checkpoint import ModelLoadError
        from assistant.inference import AnomalyAssistant

        try:
            assistant = AnomalyAssistant.from_pretrained(args.model, device=args.device)
        except ModelLoadError as error:
            raise UsageError(str(error)) from None
    except UsageError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not _is_loopback(settings.host) and settings.auth is None:
        print(f"warning: serving on {settings.host} with no login; pass --auth USER:PASS", file=sys.stderr)
    private_cache = None
    if not os.environ.get("GRADIO_TEMP_DIR"):
        # uploads and overlays go to a folder of this server alone (mode 0700), removed when it stops:
        # gradio's shared /tmp/gradio is readable by other users, and a server cleaning up its files
        # there deletes the same-named files of another server
        private_cache = tempfile.mkdtemp(prefix="anomaly-app-")
        os.environ["GRADIO_TEMP_DIR"] = private_cache
    signal.signal(signal.SIGTERM, _stop)  # `kill`, docker stop and systemd shut down like Ctrl-C does
    try:
        launch(build_app(assistant, settings), settings)
    finally:
        if private_cache is not None:
            shutil.rmtree(private_cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
