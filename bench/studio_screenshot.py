"""A screenshot of difflab studio generating with a real model (docs/images/studio_digits_demo_model.png).

    python bench/studio_screenshot.py --models FOLDER_WITH_A_DIGITS_RUN --out docs/images/studio_digits_demo_model.png

FOLDER holds a run folder named ``digits`` (e.g. ``difflab demo``'s output copied there). Drives
Debian's Chromium (/usr/bin/chromium) with Playwright, as tests/test_studio_browser.py does.
"""
import argparse
import tempfile

import torch
from playwright.sync_api import sync_playwright

from difflab.studio import make_server


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--label", default="3")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as gallery:
        server = make_server(args.models, gallery, port=0)
        server.serve_in_thread()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1100, "height": 560}, bypass_csp=True)
            page.goto(server.url)
            page.wait_for_selector("body[data-ready='1']")
            page.select_option("#model", "digits")
            page.select_option("#class_label", args.label)
            for field, value in (("#steps", "20"), ("#guidance", "2"), ("#seed", "7"), ("#batch_size", "8")):
                page.fill(field, value)
            page.click("#generate")
            page.wait_for_function("document.querySelectorAll('#results figure.result img').length >= 8", timeout=120_000)
            page.wait_for_timeout(500)
            page.screenshot(path=args.out)
            browser.close()
        server.close()


if __name__ == "__main__":
    main()
