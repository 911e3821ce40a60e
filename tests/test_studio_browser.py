"""difflab studio end to end in a real headless browser (Playwright driving Debian's Chromium,
/usr/bin/chromium, which .ci/run installs): the page loads, generates digits with live progress,
cancels, shows the gallery, inpaints under a mask painted on its canvas, loads the parameters of a
dropped PNG and reproduces its pixels, keeps two tabs' jobs apart, and answers every bad input with
a message in the page while the server keeps serving.

Screenshots go to $STUDIO_SCREENSHOTS when set (docs/images holds the ones in docs/studio.md)."""
import base64
import io
import json
import os
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from difflab.studio import make_server

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
UPLOAD_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def studio(studio_models, tmp_path_factory):
    server = make_server(studio_models, tmp_path_factory.mktemp("gallery"), port=0, max_upload_bytes=UPLOAD_LIMIT)
    server.serve_in_thread()
    yield server
    server.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium), as .ci/run does"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)  # Playwright gives it a fresh profile
        yield b
        b.close()


@pytest.fixture
def context(browser):
    ctx = browser.new_context(viewport={"width": 1100, "height": 820}, bypass_csp=True)  # lets the test evaluate JS
    ctx.set_default_timeout(30_000)
    yield ctx
    ctx.close()


def shot(page, name: str, tmp_path) -> None:
    folder = Path(os.environ.get("STUDIO_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"studio_{name}.png"))


def open_page(context, studio):
    page = context.new_page()
    page.goto(studio.url)
    page.wait_for_selector("body[data-ready='1']")
    return page


def results(page) -> list[str]:
    return page.eval_on_selector_all("#results figure.result img", "imgs => imgs.map(i => i.dataset.name)")


def wait_results(page, count: int) -> list[str]:
    page.wait_for_function(f"document.querySelectorAll('#results figure.result img').length >= {count}")
    return results(page)


def fetch(studio, name: str) -> bytes:
    return urllib.request.urlopen(f"{studio.url}gallery/{name}").read()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def drop_file(page, name: str, data: bytes, mime: str = "image/png") -> None:
    """Drop a file on the page's drop zone, as a user dragging it from a file manager does."""
    transfer = page.evaluate_handle(
        """([b64, name, mime]) => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
           const dt = new DataTransfer(); dt.items.add(new File([bytes], name, {type: mime})); return dt; }""",
        [base64.b64encode(data).decode(), name, mime])
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


def generate_digits(page, *, label: str, seed: int, batch: int, steps: int = 4, sampler: str = "ddim") -> None:
    page.select_option("#model", "digits")
    page.select_option("#sampler", sampler)
    page.select_option("#class_label", label)
    page.fill("#steps", str(steps))
    page.fill("#guidance", "2")
    page.fill("#seed", str(seed))
    page.fill("#batch_size", str(batch))
    page.click("#generate")


def test_generate_digits_with_progress_cancel_and_gallery(context, studio, tmp_path):
    page = open_page(context, studio)
    assert page.title() == "difflab studio"
    # a long job: its progress and preview show while it runs, then Cancel stops it
    generate_digits(page, label="5", seed=3, batch=16, steps=1000, sampler="heun")  # 2000 evaluations: seconds at least
    page.wait_for_function("document.getElementById('progress').value > 0 && !document.getElementById('preview').hidden")
    assert page.eval_on_selector("#progress", "p => p.value") < 1
    assert page.get_attribute("#preview", "src").startswith("data:image/png;base64,")
    expect(page.locator("#status")).to_contain_text("step")
    shot(page, "progress", tmp_path)
    page.click("#cancel")
    expect(page.locator("#status")).to_have_text("cancelled")
    assert results(page) == []
    # a short one: its images arrive with their parameters
    generate_digits(page, label="7", seed=1, batch=3)
    names = wait_results(page, 3)
    titles = page.eval_on_selector_all("#results figure.result img", "imgs => imgs.map(i => i.title)")
    assert all("Class: 7" in t and "Seed: 1" in t for t in titles)
    assert [json.loads(fetch(studio, n.replace(".png", ".json")))["batch_pos"] for n in names] == [0, 1, 2]
    shot(page, "generate", tmp_path)
    # the gallery lists them, newest first
    page.click("#open_gallery")
    page.wait_for_selector("#gallery figure.gallery-item")
    gallery = page.eval_on_selector_all("#gallery img", "imgs => imgs.map(i => i.dataset.name)")
    assert set(names) <= set(gallery) and gallery == sorted(gallery, reverse=True)
    shot(page, "gallery", tmp_path)


def test_dropped_png_loads_its_parameters_and_reproduces_its_pixels(context, studio, tmp_path):
    page = open_page(context, studio)
    generate_digits(page, label="4", seed=9, batch=3, steps=5)
    first = wait_results(page, 3)
    original = fetch(studio, first[2])  # image 2 of its batch
    page.fill("#seed", "0")
    page.fill("#batch_size", "1")
    page.select_option("#class_label", "none")
    drop_file(page, "digit.png", original)
    expect(page.locator("#notice")).to_contain_text("image 2 of its batch")
    assert page.input_value("#seed") == "9" and page.input_value("#batch_size") == "3"
    assert page.input_value("#class_label") == "4" and page.input_value("#steps") == "5"
    page.click("#generate")
    again = wait_results(page, 6)
    new = [n for n in again if n not in first]
    assert len(new) == 3
    assert np.array_equal(pixels(fetch(studio, sorted(new)[2])), pixels(original))
    assert not np.array_equal(pixels(fetch(studio, sorted(new)[0])), pixels(original))


def test_inpaint_with_a_mask_painted_on_the_canvas(context, studio, tmp_path):
    page = open_page(context, studio)
    page.select_option("#model", "text16")
    page.select_option("#mode", "inpaint")
    source = Image.fromarray((np.add.outer(np.arange(16), np.arange(16)) * 7).astype(np.uint8))
    page.set_input_files("#image_file", files=[{"name": "source.png", "mimeType": "image/png", "buffer": png_bytes(source)}])
    page.wait_for_function("document.getElementById('source').complete && document.getElementById('source').naturalWidth == 16")
    box = page.locator("#mask").bounding_box()
    page.mouse.move(box["x"] + 20, box["y"] + 20)  # paint a stroke across the top-left quarter
    page.mouse.down()
    for step in range(1, 11):
        page.mouse.move(box["x"] + 20 + step * 9, box["y"] + 20 + step * 9)
    page.mouse.up()
    page.fill("#prompt", "the digit 3")
    page.fill("#steps", "3")
    shot(page, "inpaint_mask", tmp_path)
    page.click("#generate")
    (name,) = wait_results(page, 1)
    params = json.loads(fetch(studio, name.replace(".png", ".json")))
    assert params["mode"] == "inpaint" and params["mask_image"] and params["init_image"]
    mask = np.asarray(Image.open(studio.gallery.input_file(params["mask_image"]))) > 127
    assert mask[3, 3] and not mask[15, 15] and 0 < mask.mean() < 0.5  # painted top-left only
    out = pixels(fetch(studio, name))
    assert np.array_equal(out[~mask], np.asarray(source)[~mask])  # known pixels kept exactly
    assert not np.array_equal(out[mask], np.asarray(source)[mask])  # the painted region was filled anew
    shot(page, "inpaint_result", tmp_path)


def test_two_tabs_submitting_at_once_get_their_own_results(context, studio):
    one, two = open_page(context, studio), open_page(context, studio)
    for page, label, seed in ((one, "1", 11), (two, "2", 22)):
        generate_digits(page, label=label, seed=seed, batch=2, steps=6)
    for page, label, seed in ((one, "1", 11), (two, "2", 22)):
        wait_results(page, 2)
        page.wait_for_timeout(600)  # a few more polls: nothing of the other tab may arrive
        titles = page.eval_on_selector_all("#results figure.result img", "imgs => imgs.map(i => i.title)")
        assert len(titles) == 2 and all(f"Class: {label}," in t and f"Seed: {seed}," in t for t in titles)
    assert one.evaluate("sessionStorage.getItem('studio-client')") != two.evaluate("sessionStorage.getItem('studio-client')")


def test_bad_inputs_are_answered_in_the_page_and_the_server_keeps_serving(context, studio, tmp_path):
    page = open_page(context, studio)
    error = page.locator("#error")

    def submit_expecting(fragment: str) -> None:
        page.evaluate("document.getElementById('error').hidden = true")
        page.click("#generate")
        expect(error).to_be_visible()
        expect(error).to_contain_text(fragment)

    page.select_option("#model", "digits")
    page.evaluate("document.getElementById('model').options[0].value = '../digits'")  # a path out of the folder
    submit_expecting("never by a path")
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    page.select_option("#model", "digits")
    for steps, fragment in (("0", "steps=0"), ("10000", "steps=10000")):
        page.fill("#steps", steps)
        submit_expecting(fragment)
    page.fill("#steps", "3")
    page.evaluate("const s = document.getElementById('sampler'); s.append(new Option('nope', 'nope')); s.value = 'nope'")
    submit_expecting("sampler 'nope' is unknown")
    page.select_option("#sampler", "ddim")
    page.select_option("#model", "text16")
    page.select_option("#mode", "img2img")
    page.set_input_files("#image_file", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image at all"}])
    submit_expecting("not an image")
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))
    page.set_input_files("#image_file", files=[{"name": "big.png", "mimeType": "image/png", "buffer": png_bytes(big)}])
    submit_expecting("too large")
    shot(page, "bad_input", tmp_path)
    drop_file(page, "notes.txt", b"hello", "text/plain")
    expect(error).to_contain_text("not an image")
    # still serving: a good request goes through
    page.select_option("#mode", "txt2img")
    page.fill("#prompt", "a seven")
    page.click("#generate")
    wait_results(page, 1)
