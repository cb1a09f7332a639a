"""Screenshot of the `vlmoe serve` page for the README: serve CHECKPOINT (and --compare),
click an example, ask its question, hover a word, save a PNG.

    python tools/serve_screenshot.py --checkpoint checkpoints/default \
        --compare checkpoints/dense --example 4 --out docs/serve.png

Needs the serve extra, selenium, and Chromium + ChromeDriver (tools/system-deps.sh).
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from vlmoe.serve.harness import chromium_driver, serve_process


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--compare", default=None)
    ap.add_argument("--example", type=int, default=0, help="which example image to ask about")
    ap.add_argument("--question", default=None, help="override the example's question")
    ap.add_argument("--out", default="docs/serve.png")
    ap.add_argument("--width", type=int, default=1500)
    ap.add_argument("--height", type=int, default=940)
    args = ap.parse_args()
    extra = ["--compare", args.compare] if args.compare else []
    with tempfile.TemporaryDirectory() as logs, serve_process(args.checkpoint, extra, logs) as srv:
        driver = chromium_driver(args.width, args.height)
        try:
            driver.set_window_size(args.width, args.height)
            wait = WebDriverWait(driver, 30)
            driver.get(srv.url)
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "body[data-ready='1']"))
            driver.find_element(By.CSS_SELECTOR, f'[data-example="{args.example}"]').click()
            box = driver.find_element(By.ID, "question")
            wait.until(lambda d: box.get_attribute("value"))
            if args.question:
                box.clear()
                box.send_keys(args.question)
            driver.find_element(By.ID, "ask").click()
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "body[data-state='done']"))
            canvases = driver.find_elements(By.CSS_SELECTOR, "canvas.heatmap")
            wait.until(lambda d: all(c.get_attribute("data-drawn") for c in canvases))
            words = driver.find_elements(By.CSS_SELECTOR, "#col-a .words .word")
            if len(words) > 2:
                ActionChains(driver).move_to_element(words[2]).perform()
                wait.until(lambda d: d.find_element(By.ID, "tooltip").is_displayed())
            driver.save_screenshot(args.out)
        finally:
            driver.quit()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
