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
`--concurrency` at a time; the server binds to loopback unless told otherwise. The upload checks live
in `assistant/app_uploads.py`, the HTTP hardening in `assistant/app_http.py`. An upload or question
refused on purpose is an error in the page and no traceback in the log. A blank question asks the
default question, as the CLI does. A bad model path prints one line on stderr and exits with code 2,
before gradio is imported (`assistant.errors.run_main`, as every entry point).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from assistant.app_http import RefuseFileURLs
from assistant.app_uploads import UploadRejected, read_upload, upload_key
from assistant.calibration import shown
from assistant.errors import UsageError, checked_question, run_main

if TYPE_CHECKING:  # the app imports PIL, torch and gradio only once it runs
    from PIL import Image

    from assistant.inference import AnomalyReport

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


# -- command line ------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Chat with the anomaly inspection assistant in the browser.")
    parser.add_argument(
        "--model", default="default", help="checkpoint folder, hub id, or 'default' (the embedded model)"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--host", default=AppSettings.host, help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=AppSettings.port)
    parser.add_argument("--auth", default=None, metavar="USER:PASS", help=f"require a login (or set {AUTH_ENV})")
    parser.add_argument(
        "--max-upload-mb", type=float, default=AppSettings.max_upload_mb, help="largest upload accepted"
    )
    parser.add_argument(
        "--concurrency", type=int, default=AppSettings.concurrency, help="model calls at once (default 1)"
    )
    parser.add_argument("--queue-size", type=int, default=AppSettings.queue_size, help="requests allowed to wait")
    parser.add_argument(
        "--max-new-tokens", type=int, default=AppSettings.max_new_tokens, help="longest answer, in tokens"
    )
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
        key = (upload_key(image), tuple(upload_key(ref) for ref in references))
        if session is not None and session.key == key and session.image is not None:
            return session
        picture = read_upload(image, self.cache_dir, self.settings.max_upload_bytes, "image")
        normals = [read_upload(ref, self.cache_dir, self.settings.max_upload_bytes, "references") for ref in references]
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
            return (
                session.image,
                "**No verdict**: this model has no anomaly expert (no score or heatmap).",
                report.to_dict(),
            )
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
            gr.Warning(error.message)  # on purpose: a warning in the page, nothing in the log
            cleared = (None, gr.skip()) if error.field == "image" else (gr.skip(), None)
            return *cleared, *fresh
        return gr.skip(), gr.skip(), [], *self._panel(session), session

    # chat ------------------------------------------------------------------------------------------
    def respond(self, question, image, references, session: Session):
        """Stream the answer to one more question about the session's image."""
        import gradio as gr

        question = _question(question)
        try:
            session = self._prepare(image, references, session)
        except UploadRejected as error:
            raise _refusal(error.message) from None
        asked = sum(message["role"] == "user" for message in session.messages)
        if asked >= self.settings.max_questions:
            raise _refusal(f"This chat has {asked} questions already; press New chat to start over.")

        messages = [*session.messages, {"role": "user", "content": question}]
        overlay, verdict, report = self._panel(session)
        chunks = self.assistant.chat(
            messages, session.image, session.references, stream=True, max_new_tokens=self.settings.max_new_tokens
        )
        yield "", _display(messages, ""), overlay, verdict, report, session
        answer = ""
        for chunk in chunks:
            answer += chunk
            yield gr.skip(), _display(messages, answer), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        answer = answer.strip()
        session = dataclasses.replace(session, messages=[*messages, {"role": "assistant", "content": answer}])
        yield (
            gr.skip(),
            _display(session.messages, None),
            gr.skip(),
            gr.skip(),
            self._report(session, answer).to_dict(),
            session,
        )

    @staticmethod
    def new_chat(session: Session):
        return [], "", dataclasses.replace(session, messages=[])

    # API -------------------------------------------------------------------------------------------
    def analyze(self, image, question, references):
        """One question, one answer: (answer, overlay image, JSON report)."""
        question = _question(question)
        try:
            session = self._prepare(image, references, None)
        except UploadRejected as error:
            raise _refusal(error.message) from None
        report = self.assistant.analyze(
            session.image, question, session.references, max_new_tokens=self.settings.max_new_tokens
        )
        overlay = self.assistant.visualize(report) if report.anomaly_map is not None else session.image
        return report.answer, overlay, report.to_dict()


def _refusal(message: str):
    """An error shown in the page for input refused on purpose: gradio logs no traceback for it."""
    import gradio as gr

    return gr.Error(message, print_exception=False)


def _question(question) -> str:
    """The question to ask, by the CLI's rule: left out or blank asks the default question."""
    from assistant.inference import DEFAULT_QUESTION
    from assistant.limits import MAX_QUESTION_CHARS

    try:
        return checked_question(question, MAX_QUESTION_CHARS) or DEFAULT_QUESTION
    except UsageError as error:
        message = str(error)
        raise _refusal(f"{message[0].upper()}{message[1:]}.") from None


def _verdict(report) -> str:
    words = "**ANOMALOUS**" if report.pred_label else "**Normal**"
    where = f" · {report.location}" if report.location else ""
    warnings = "".join(f"\n\n⚠ {warning}" for warning in report.warnings)
    score, threshold = shown(report.pred_score, report.threshold)
    return f"{words} · score {score} (threshold {threshold}){where}{warnings}"


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
                    label="Image to inspect",
                    type="filepath",
                    image_mode=None,
                    sources=["upload", "clipboard"],
                    height=300,
                    elem_id="image-input",
                )
                references = gr.File(
                    label="Normal references (optional)",
                    file_count="multiple",
                    file_types=["image"],
                    height=150,
                    elem_id="references",
                )
            with gr.Column(scale=5, min_width=320):
                chatbot = gr.Chatbot(label="Chat", height=420, latex_delimiters=[], elem_id="chatbot")
                with gr.Row():
                    question = gr.Textbox(
                        show_label=False,
                        placeholder="Ask about the image, e.g. Is there a defect? Where?",
                        scale=5,
                        elem_id="question",
                    )
                    ask = gr.Button("Ask", variant="primary", scale=1, min_width=80, elem_id="ask")
                new_chat = gr.Button("New chat", size="sm", elem_id="new-chat")
            with gr.Column(scale=3, min_width=260):
                overlay = gr.Image(
                    label="Evidence: heatmap, contours, boxes",
                    type="pil",
                    format="png",
                    interactive=False,
                    height=300,
                    elem_id="overlay",
                )
                verdict = gr.Markdown(elem_id="verdict")
                report = gr.JSON(label="Report", open=True, max_height=260, elem_id="report")
        gr.Examples(
            examples=[
                [
                    str(EXAMPLES / "pill_contamination.png"),
                    [str(EXAMPLES / "pill_good.png")],
                    "Is this pill defective? Where?",
                ],
                [str(EXAMPLES / "wood_stain.png"), None, "Is there any anomaly on this wood surface?"],
                [str(EXAMPLES / "cap_cut_paste.png"), None, "Describe anything unusual on this cap."],
                [str(EXAMPLES / "pill_good.png"), None, "Is this pill OK?"],
            ],
            inputs=[image, references, question],
            example_labels=[
                "pill, contamination (+ a good reference)",
                "wood, stain",
                "cap, misplaced patch",
                "pill, good",
            ],
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


def _main(argv: list[str] | None) -> int:
    args, settings = parse_settings(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    from assistant.inference import AnomalyAssistant

    # a bad model is a ModelLoadError: one line and exit 2, before gradio loads
    assistant = AnomalyAssistant.from_pretrained(args.model, device=args.device)
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


def main(argv: list[str] | None = None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
