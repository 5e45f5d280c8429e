"""Makes docs/serve-page.png, docs/serving.md's picture of the page that ``translate serve`` shows:
serves CHECKPOINT on a free local port, opens the page in headless Chromium, translates the
sentences given, and saves the window.

    python docs/screenshot.py checkpoints/default "¿Dónde está la estación de tren?"
"""

from __future__ import annotations

import argparse
import shutil
import threading
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from translate.runtime import configure_process
from translate.serve import RequestBatcher, make_server
from translate.translator import Translator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("sentences", nargs="+")
    parser.add_argument("-o", "--output", default=str(Path(__file__).with_name("serve-page.png")))
    parser.add_argument("--size", default="1000,760", help="window width,height in pixels")
    args = parser.parse_args()
    configure_process()
    translator = Translator.load(args.checkpoint)
    batcher = RequestBatcher(translator)
    server = make_server(batcher, "127.0.0.1", 0,
                         languages=(translator.config.data.src_lang, translator.config.data.tgt_lang))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={args.size}",
                 "--hide-scrollbars"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/")
        browser.find_element(By.ID, "source").send_keys("\n".join(args.sentences))
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 60).until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "Score"))
        browser.save_screenshot(args.output)
    finally:
        browser.quit()
        server.shutdown()
        batcher.close()
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
