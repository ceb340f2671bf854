"""The chat page in a real headless Chromium (selenium) against a server process: the stage picker is filled from
/v1/models, a reply streams in and equals the API's greedy reply, the second turn sends the history, Stop cancels
the request (the server frees the row), an error reply is shown, New chat clears; loading the page logs no console
error.

Needs the Debian packages chromium and chromium-driver: skipped without them, failed under CI=true (`.ci/run`
installs them)."""
from __future__ import annotations

import os
import time

import httpx
import pytest
from serve_fixtures import server, tiny_run

from babyllama.commands.screenshot import ask, browser_missing, chromium_driver


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    out = tmp_path_factory.mktemp("web") / "out"
    tiny_run(out, context=8192)  # room for a reply long enough (seconds) to be stopped midway on a fast CPU
    with server(out) as u:
        yield u


def need_browser() -> None:
    missing = browser_missing()
    if missing:
        pytest.fail(missing) if os.environ.get("CI") else pytest.skip(missing)


@pytest.fixture(scope="module")
def page(url):
    need_browser()
    driver = chromium_driver()
    driver.get(url)
    yield driver
    driver.quit()


def greedy(url: str, messages: list[dict], max_tokens: int) -> str:
    body = {"model": "sft", "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]["content"]


def set_field(page, field: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    page.find_element(By.ID, field).clear()
    page.find_element(By.ID, field).send_keys(value)


def test_page_loads_without_console_errors(url):
    """Nothing the page asks for fails (a missing favicon was a 404 on every load) and no script error is logged.
    A browser of its own: one asks for a page's icon only once. Chromium's driver keeps the console's SEVERE
    entries without any logging preference."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    need_browser()
    driver = chromium_driver()
    try:
        driver.get(url)
        WebDriverWait(driver, 10).until(lambda _: Select(driver.find_element(By.ID, "model")).options)  # scripts ran
        time.sleep(0.5)  # the icon is asked for after the page's load event
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()
    assert errors == [], errors


def test_chat_page(page, url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    picker = Select(page.find_element(By.ID, "model"))
    WebDriverWait(page, 10).until(lambda _: picker.options)
    assert [o.text for o in picker.options] == ["pretrain", "sft", "dpo"]
    assert picker.first_selected_option.text == "sft"
    set_field(page, "temperature", "0")
    set_field(page, "max-tokens", "12")

    first = ask(page, "Who are you?")
    assert first == greedy(url, [{"role": "user", "content": "Who are you?"}], 12) and first
    second = ask(page, "And then?")  # sent with the first exchange
    history = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "And then?"}]
    assert second == greedy(url, history, 12) != greedy(url, history[2:], 12)

    # a long reply: it streams in, Stop ends it and the server gives its row back
    set_field(page, "max-tokens", "8000")
    page.find_element(By.ID, "input").send_keys("Tell me everything.\n")
    reply = lambda: page.find_elements(By.CSS_SELECTOR, ".msg.assistant .content")[-1].text  # noqa: E731
    WebDriverWait(page, 30, poll_frequency=0.02).until(lambda _: len(reply()) > 0)
    seen = len(reply())
    WebDriverWait(page, 30, poll_frequency=0.02).until(lambda _: len(reply()) > seen)  # more arrives: it streams
    page.find_element(By.ID, "stop").click()
    last = page.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    WebDriverWait(page, 10).until(lambda _: last.get_attribute("data-finish"))
    assert last.get_attribute("data-finish") == "stopped", (len(reply()), last.get_attribute("data-finish"))
    stopped = reply()
    time.sleep(0.3)
    assert reply() == stopped and "(stopped)" in last.text
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/health").json()["decoding"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{url}/health").json()["decoding"] == 0

    # an error reply is shown in words
    set_field(page, "max-tokens", "9000")
    page.find_element(By.ID, "input").send_keys("again\n")
    error = page.find_element(By.ID, "error")
    WebDriverWait(page, 10).until(lambda _: error.is_displayed())
    assert "error 400 invalid_value: 'max_tokens' is 9000, above this server's limit of 8192 tokens" in error.text

    page.find_element(By.ID, "new-chat").click()
    assert page.find_elements(By.CSS_SELECTOR, ".msg") == [] and not error.is_displayed()
