"""The chat app in a real browser: headless Chromium (the system package) driven by Playwright.

Install for this test: `apt-get install -y --no-install-recommends chromium` and `pip install playwright`
(Playwright's own browser download, `playwright install`, is not needed: the system browser is used).
Set CHROMIUM=/path/to/chromium to use another binary.
"""

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image
from test_app import MAX_NEW_TOKENS, ROOT, running_app

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 60_000

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).is_file(),
    reason=f"no Chromium at {CHROMIUM}: apt-get install -y --no-install-recommends chromium",
)


@pytest.fixture(scope="module")
def assistant(clip_llama):
    from assistant.inference import AnomalyAssistant

    return AnomalyAssistant.from_pretrained(str(clip_llama))


def _bot_answers(page) -> list[str]:
    labels = page.locator('#chatbot [data-testid="bot"]').evaluate_all(
        "els => els.map(e => e.getAttribute('aria-label'))"
    )
    return [label.removeprefix("bot's message: ") for label in labels]


def _wait_for_answers(page, answers: list[str]) -> None:
    page.wait_for_function(
        """expected => {
            const got = [...document.querySelectorAll('#chatbot [data-testid="bot"]')]
                .map(e => (e.getAttribute('aria-label') || '').replace("bot's message: ", ''));
            return got.length === expected.length && got.every((text, i) => text === expected[i]);
        }""",
        arg=answers,
        timeout=WAIT_MS,
    )


def _wait_for_verdict(page, score: float) -> None:
    page.wait_for_function(
        "text => (document.querySelector('#verdict')?.innerText || '').includes(text)",
        arg=f"score {score:.3f}",
        timeout=WAIT_MS,
    )


def test_upload_ask_twice_and_see_the_evidence(assistant, tmp_path):
    from playwright.sync_api import sync_playwright

    examples = ROOT / "examples"
    pill, good, wood = examples / "pill_contamination.png", examples / "pill_good.png", examples / "wood_stain.png"
    image = Image.open(pill).convert("RGB")
    questions = ["Is this pill defective?", "Where is it?"]
    history, answers = [], []
    for question in questions:  # what the app must show: the same greedy answers as in-process
        history.append({"role": "user", "content": question})
        answers.append(assistant.chat(history, image, stream=False, max_new_tokens=MAX_NEW_TOKENS).strip())
        history.append({"role": "assistant", "content": answers[-1]})
    assert all(answers)

    with running_app(assistant) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 950})
            page.goto(url, wait_until="domcontentloaded", timeout=WAIT_MS)
            page.wait_for_selector("#ask", timeout=WAIT_MS)

            page.locator("#image-input input[type=file]").set_input_files(str(pill))
            _wait_for_verdict(page, assistant.detect(image).pred_score)  # shown on upload, before any question
            for turn, question in enumerate(questions, start=1):
                page.fill("#question textarea", question)
                page.click("#ask")
                _wait_for_answers(page, answers[:turn])
            assert page.locator('#chatbot [data-testid="user"]').count() == 2

            overlay = page.locator("#overlay img")
            overlay.wait_for(timeout=WAIT_MS)
            page.wait_for_function("() => document.querySelector('#overlay img')?.naturalWidth > 0", timeout=WAIT_MS)
            assert overlay.evaluate("img => img.naturalWidth") == image.width  # the overlay of this image
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)

            # the examples, one click each: new evidence, a new chat; the first brings a normal reference along
            page.get_by_text("pill, contamination (+ a good reference)", exact=True).click()
            _wait_for_verdict(page, assistant.detect(image, [Image.open(good)]).pred_score)
            page.wait_for_function("() => !document.querySelector('#chatbot [data-testid=\"bot\"]')", timeout=WAIT_MS)
            page.get_by_text("wood, stain", exact=True).click()
            _wait_for_verdict(page, assistant.detect(Image.open(wood)).pred_score)
            assert _bot_answers(page) == []
        finally:
            browser.close()

    with Image.open(tmp_path / "app.png") as shot:
        assert shot.width >= 1400 and shot.height >= 600
