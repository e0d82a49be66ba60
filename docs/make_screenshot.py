"""Remake docs/app_screenshot.png: the app on the shipped default model, two turns about examples/wood_stain.png.

python docs/make_screenshot.py [OUT.png]    # default: docs/app_screenshot.png; needs chromium and playwright, as tests/test_app_browser.py
"""

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from playwright.sync_api import sync_playwright
from test_app import free_port
from test_app_browser import CHROMIUM, CHROMIUM_ARGS, WAIT_MS

import app as appmod
from assistant import AnomalyAssistant

a = AnomalyAssistant.from_pretrained("default")
settings = appmod.AppSettings(port=free_port(), max_new_tokens=64)
demo = appmod.build_app(a, settings)
appmod.launch(demo, settings, block=False, quiet=True)
url = f"http://127.0.0.1:{settings.port}/"
try:
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = b.new_page(viewport={"width": 1400, "height": 950})
        page.goto(url, wait_until="domcontentloaded", timeout=WAIT_MS)
        page.wait_for_selector("#ask", timeout=WAIT_MS)
        page.locator("#image-input input[type=file]").set_input_files(str(ROOT / "examples" / "wood_stain.png"))
        page.wait_for_function(
            "() => (document.querySelector('#verdict')?.innerText || '').includes('score')", timeout=WAIT_MS
        )
        for i, q in enumerate(
            ["Is there any anomaly in this image? If so, where is it and what does it look like?", "How severe is it?"],
            1,
        ):
            page.fill("#question textarea", q)
            page.click("#ask")
            page.wait_for_function(
                f"() => document.querySelectorAll('#chatbot [data-testid=\"bot\"]').length === {i}", timeout=WAIT_MS
            )
            time.sleep(4)
        page.wait_for_function("() => document.querySelector('#overlay img')?.naturalWidth > 0", timeout=WAIT_MS)
        time.sleep(2)
        page.screenshot(
            path=sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "docs" / "app_screenshot.png"), full_page=True
        )
        b.close()
finally:
    demo.close()
