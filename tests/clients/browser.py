"""voxloop's browser page in a real headless Chromium, driven over WebDriver (selenium and
Debian's chromedriver), its microphone a WAV file (Chromium's fake capture device).

    python browser.py talk URL WAV        press Talk, hear the reply, press Stop
    python browser.py wrong-token URL WAV open the page with a token the server refuses
    python browser.py reconnect URL WAV MARKER
                                          press Talk; once listening, write MARKER and wait for
                                          the server to go away and come back

It prints one JSON object with what the page showed and `window.voxloopStats`; a failed wait is
an exception and a non-zero exit, with a screenshot in $VOXLOOP_ARTIFACTS (when set).
"""

import json
import os
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By


def browser(wav: str) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for flag in [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--autoplay-policy=no-user-gesture-required",
    ]:
        options.add_argument(flag)
    service = Service(executable_path=os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    return webdriver.Chrome(options=options, service=service)


def texts(driver, testid: str) -> list:
    items = driver.find_elements(By.CSS_SELECTOR, f'[data-testid="{testid}"] li')
    return [i.text for i in items]


def stats(driver) -> dict:
    return driver.execute_script("return Object.assign({}, window.voxloopStats || {})")


def wait(driver, what: str, check, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"{what} within {timeout} s; stats {stats(driver)}; "
                       f"message {driver.find_element(By.CSS_SELECTOR, '[data-testid=message]').text!r}")


def click(driver, testid: str) -> float:
    driver.find_element(By.CSS_SELECTOR, f'[data-testid="{testid}"]').click()
    return driver.execute_script("return performance.now()")


def talk(driver, url: str) -> dict:
    driver.get(url)
    wait(driver, "the page ready", lambda: stats(driver).get("state") == "idle", 20)
    click(driver, "talk")
    heard = wait(driver, "a transcript", lambda: texts(driver, "heard"), 90)
    tools = wait(driver, "a tool call", lambda: texts(driver, "tools"), 60)
    # 2 s of the reply decoded: 60 ms frames at 24 kHz.
    wait(driver, "2 s of decoded audio", lambda: stats(driver).get("framesDecoded", 0) * 0.06 >= 2.0, 60)
    before = stats(driver)
    stopped_at = click(driver, "stop")
    time.sleep(1.0)
    after = stats(driver)
    return {
        "heard": heard,
        "tools": tools,
        "reply": texts(driver, "reply"),
        "before_stop": before,
        "after_stop": after,
        "stopped_at_ms": stopped_at,
        # How long after the click the last frame arrived.
        "last_frame_after_stop_ms": (after.get("lastFrameMs") or 0) - stopped_at,
        "status": driver.find_element(By.CSS_SELECTOR, '[data-testid="status"]').text,
    }


def wrong_token(driver, url: str) -> dict:
    driver.get(f"{url}?access_token=not-a-valid-key")
    message = wait(driver, "a message about the token",
                   lambda: driver.find_element(By.CSS_SELECTOR, '[data-testid="message"]').text, 20)
    return {"message": message, "state": stats(driver).get("state"),
            "signin_shown": driver.find_element(By.ID, "signin").is_displayed()}


def reconnect(driver, url: str, marker: str) -> dict:
    driver.get(url)
    wait(driver, "the page ready", lambda: stats(driver).get("state") == "idle", 20)
    click(driver, "talk")
    wait(driver, "listening", lambda: stats(driver).get("state") == "listening", 30)
    with open(marker, "w") as f:
        f.write("listening\n")
    states = []

    def seen(state):
        current = stats(driver).get("state")
        if not states or states[-1] != current:
            states.append(current)
        return state in states

    wait(driver, "reconnecting shown", lambda: seen("reconnecting"), 30)
    wait(driver, "listening again", lambda: seen("reconnecting") and states[-1] == "listening", 90)
    return {"states": states, "stats": stats(driver)}


def main() -> None:
    mode, url, wav = sys.argv[1], sys.argv[2], sys.argv[3]
    driver = browser(wav)
    try:
        if mode == "talk":
            result = talk(driver, url)
        elif mode == "wrong-token":
            result = wrong_token(driver, url)
        elif mode == "reconnect":
            result = reconnect(driver, url, sys.argv[4])
        else:
            raise SystemExit(f"unknown mode {mode}")
        print(json.dumps(result))
    except BaseException:
        artifacts = os.environ.get("VOXLOOP_ARTIFACTS")
        if artifacts:
            os.makedirs(artifacts, exist_ok=True)
            driver.save_screenshot(os.path.join(artifacts, f"browser-{mode}.png"))
        raise
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
