"""Screenshots of the workbench's three pages for the README, from a running workbench:

    lora-pipeline ui --env demo &                       # after `make demo`
    .venv/bin/python docs/screenshots.py http://127.0.0.1:7860 [--prompt "..."]

Writes docs/workbench_captions.png, docs/workbench_subjects.png and docs/workbench_library.png. The library page
is shot after one generation through its prompt box, so the picture shows an image with its PNG info.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

DOCS = Path(__file__).resolve().parent
PROMPT = "lorachar, circle <lora:demo_lora:0.6>, <lora:demo_stripes:0.8>"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", nargs="?", default="http://127.0.0.1:7860")
    parser.add_argument("--subject", default="demo_lora")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{args.url}/captions/{args.subject}")
        page.wait_for_selector("#grid figure")
        page.wait_for_load_state("networkidle")  # the thumbnails in view
        page.screenshot(path=DOCS / "workbench_captions.png")
        page.goto(f"{args.url}/subjects")
        page.wait_for_selector("#jobs .job, #jobs p")
        page.screenshot(path=DOCS / "workbench_subjects.png", full_page=True)
        page.goto(f"{args.url}/library")
        page.fill("#prompt", args.prompt)
        page.click("#generate")
        page.wait_for_selector("#gen-images img, #gen-error:not(:empty)", timeout=600_000)
        page.wait_for_load_state("networkidle")
        page.screenshot(path=DOCS / "workbench_library.png", full_page=True)
        browser.close()
    print("\n".join(str(DOCS / f"workbench_{name}.png") for name in ("captions", "subjects", "library")))


if __name__ == "__main__":
    main()
