"""Screenshot of the chat page answering a real run, for docs/serve.md (headless Chromium driven by selenium).

    babyllama screenshot --out out --name baby            # writes docs/serve_chat.png

Starts `babyllama serve` on a free loopback port, asks two questions (the second uses the first's answer), saves
the page. Needs the Debian packages chromium and chromium-driver (`.ci/run` installs them).
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from babyllama.cli import ArgumentParser
from babyllama.shipped import REPO_ROOT

CHROMIUM, CHROMEDRIVER = "chromium", "chromedriver"


def browser_missing() -> str | None:
    """Why no browser can be started (None when both programs are on PATH)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]
    return (f"{' and '.join(missing)} not found: apt-get install -y chromium chromium-driver" if missing else None)


def chromium_driver(width: int = 1100, height: int = 760):
    """A headless Chromium under selenium, with no network access beyond what the page asks of its own server."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--no-first-run", "--disable-extensions",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which(CHROMEDRIVER)), options=options)


def ask(driver, text: str, timeout: float = 120) -> str:
    """Type `text` into the page, wait for the reply to finish, return it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    done = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-finish]"))
    driver.find_element(By.ID, "input").send_keys(text, Keys.ENTER)
    WebDriverWait(driver, timeout).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-finish]")) > done)
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .content")[-1].text


def main(argv: list[str] | None = None) -> None:
    from babyllama.serve.process import serve_in_background as server

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out", help="output root of the training runs (default: out)")
    parser.add_argument("--name", default="baby", help="run whose sft stage answers (default: baby)")
    parser.add_argument("--dest", default=str(REPO_ROOT / "docs" / "serve_chat.png"),
                        help="PNG file to write (default: docs/serve_chat.png)")
    parser.add_argument("--questions", nargs="+",
                        default=["床前明月光，疑是地上霜。下一句是什么？", "这首诗的作者是谁？"],
                        help="messages asked in turn, in one conversation (default: a line of 静夜思, then its author)")
    args = parser.parse_args(argv)
    if browser_missing():
        sys.exit(f"error: {browser_missing()}")
    from selenium.webdriver.common.by import By

    with server(Path(args.out), "--name", args.name, "--stage", "sft") as url:
        driver = chromium_driver()
        try:
            driver.get(url)
            driver.find_element(By.ID, "system").send_keys("You are a helpful assistant.")
            for field, value in (("temperature", "0.7"), ("max-tokens", "96")):
                driver.find_element(By.ID, field).clear()
                driver.find_element(By.ID, field).send_keys(value)
            for question in args.questions:
                print(f"user> {question}\nassistant> {ask(driver, question)}")
            driver.save_screenshot(args.dest)
        finally:
            driver.quit()
    print(f"wrote {args.dest}")

