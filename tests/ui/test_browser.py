"""The workbench in a real browser (Playwright driving Debian's chromium) over a temp copy of the demo project:
review captions, re-caption, train two subjects through the queue, and stack both LoRAs in a prompt."""

from __future__ import annotations

import csv
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml
from kedro_helpers import build_project

from lora_pipeline.core.files import newest_version
from lora_pipeline.prep.captions import split_tags

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def workbench(tmp_path, tiny_models, _demo_images_template, monkeypatch):
    """The demo project (tiny models, 2 training steps a subject) served on a free localhost port."""
    import uvicorn

    from lora_pipeline.ui.app import create_app

    root = build_project(tmp_path / "project", tiny_models, _demo_images_template)
    # The two SD1.x demo subjects, 2 steps each: generation reads every subject's export, so the SDXL and Flux
    # ones (which would triple the training time) are left out of this copy.
    (root / "conf/demo/subjects.yml").write_text(yaml.safe_dump({"subjects": {
        "demo_lora": {"trigger": "lorachar", "training": {"max_steps": 2}},
        "demo_stripes": {"trigger": "stripechar", "training": {"max_steps": 2}}}}))
    monkeypatch.chdir(root)
    monkeypatch.setenv("KEDRO_ENV", "demo")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # every run is its own torch process on a shared 2-core machine
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(root, "demo"), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield root, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def chromium_page():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e '.[test]')")
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium); Playwright's own download is not used")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser.new_page(viewport={"width": 1400, "height": 1000})
        browser.close()


def _reviewed(root: Path) -> dict[str, str]:
    with open(root / "data/01_raw/demo_lora/reviewed_captions.csv", newline="", encoding="utf-8") as handle:
        return {row["file_name"]: row["text"] for row in csv.DictReader(handle)}


def _card(page, name: str):
    return page.locator(f'#grid figure[data-name="{name}"]')


@pytest.mark.slow
def test_review_captions_train_and_generate_in_the_browser(workbench, chromium_page):
    root, url = workbench
    page = chromium_page
    page.set_default_timeout(30_000)
    # open the demo subject
    page.goto(f"{url}/captions/demo_lora")
    page.wait_for_selector('#grid figure[data-name="blue_square_0.png"]')
    assert page.locator("#grid figure").count() == 31
    # edit one caption
    _card(page, "blue_circle_0.jpg").locator("textarea").fill("lorachar, blue circle, drawn by hand")
    page.keyboard.press("Tab")  # the change event sends it
    page.wait_for_function("document.querySelector('#edit-status').textContent.includes('1 unsaved')")
    # replace a tag on all images
    page.select_option("#edit-scope", "all")
    page.select_option("#edit-op", "replace")
    page.fill("#edit-tag", "square")
    page.fill("#edit-replacement", "box")
    page.click("#edit-apply")
    page.wait_for_function("![...document.querySelectorAll('#filter-tag option')].some(o => o.value === 'square')")
    squares = ["blue_square_0.png", "red_square_0.png", "yellow_square_0.png"]  # their sidecars say "square, ..."
    for name in squares:
        value = _card(page, name).locator("textarea").input_value()
        assert "box" in value and "square" not in value, (name, value)
    # save, and check reviewed_captions.csv
    page.click("#save")
    page.wait_for_function("document.querySelector('#save').disabled")
    reviewed = _reviewed(root)
    assert reviewed["blue_circle_0.jpg"] == "lorachar, blue circle, drawn by hand"
    assert reviewed["grayscale.png"] == "lorachar, green square, monochrome, reviewed by hand"  # "green square" is
    assert all(reviewed[name].startswith("lorachar, box, ") for name in squares)  # another tag than "square"
    assert not any("square" in split_tags(text) for text in reviewed.values())
    # run captioning again: the edits hold, in the captions table and in the page
    page.click("#caption-new")
    page.wait_for_function("document.querySelector('#edit-status').textContent === 'captioning done'",
                           timeout=300_000)
    table = newest_version(root / "data/02_intermediate/demo_lora/captions.csv")
    with open(table, newline="", encoding="utf-8") as handle:
        captioned = {row["file_name"]: row for row in csv.DictReader(handle)}
    for name, text in reviewed.items():
        assert captioned[name]["text"] == text and captioned[name]["source"] == "reviewed"
    assert _card(page, "blue_circle_0.jpg").locator("textarea").input_value() == "lorachar, blue circle, drawn by hand"
    assert _card(page, "blue_circle_0.jpg").locator(".badge.reviewed").count() == 1
    assert _reviewed(root) == reviewed
    # queue a training run of two demo subjects; they run one after the other and reach "done"
    page.goto(f"{url}/subjects")
    page.check('#subjects input[value="demo_lora"]')
    page.check('#subjects input[value="demo_stripes"]')
    page.click("#train")
    page.wait_for_selector(".job", timeout=10_000)
    page.wait_for_function("[...document.querySelectorAll('.job[data-status=\"done\"] strong')]"
                           ".filter((label) => label.textContent.startsWith('train ')).length === 2", timeout=600_000)
    for subject in ("demo_lora", "demo_stripes"):
        shown = page.locator(".job", has_text=f"train {subject}").inner_text()
        assert "training 2/2" in shown and "loss " in shown and "img/s" in shown and "MLflow run" in shown, shown
    assert page.locator(".job .samples img").count() >= 2  # the samples each run logged to MLflow
    assert page.locator(".job .error").count() == 0
    page.reload()
    assert page.locator('#subjects tr[data-subject="demo_stripes"] td.same').count() == 1  # fingerprint recorded
    # generate one image with two stacked LoRAs, and see it in the page
    page.goto(f"{url}/library")
    names = {row.get_attribute("data-name") for row in page.locator("tr.lora").all()}
    assert {"demo_lora", "demo_stripes"} <= names, names  # what <lora:NAME> resolves, as generation indexes it
    page.fill("#prompt", "lorachar, circle <lora:demo_lora:0.6>, <lora:demo_stripes:0.8>")
    page.click("#generate")
    image = page.wait_for_selector("#gen-images img", timeout=300_000)
    page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=image)
    from PIL import Image

    path = root / image.get_attribute("alt")  # the file generation wrote, under the project's generated/ versions
    with Image.open(path) as written:
        assert page.evaluate("(img) => [img.naturalWidth, img.naturalHeight]", image) == list(written.size)
        assert written.info["parameters"] == page.locator("#gen-images .pnginfo").inner_text()
    info = page.locator("#gen-images .pnginfo").inner_text()
    assert "<lora:demo_lora:0.6> <lora:demo_stripes:0.8>" in info and "Lora hashes" in info
