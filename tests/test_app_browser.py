"""The app in a real browser (issue 11): Chromium from the OS packages, driven by Selenium, headless. Upload the
example sketch, name its two colours, type the prompt, generate, wait for both images, save a screenshot.

`.ci/run` installs Chromium and sets ATTNCTL_BROWSER_TESTS=required, so there this test runs or fails; elsewhere it
is skipped, with the reason shown, when Chromium or its driver is missing. ATTNCTL_SCREENSHOT=PATH also saves the
screenshot there (the README's picture)."""

import os
import shutil
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
STEPS = "25" if os.environ.get("ATTNCTL_SCREENSHOT") else "4"  # the README's picture at the model's own steps


@pytest.fixture
def browser():
    if not (CHROMIUM and DRIVER):
        reason = ("Chromium and its driver are not installed: apt-get install chromium chromium-driver (.ci/run "
                  "installs them)")
        if os.environ.get("ATTNCTL_BROWSER_TESTS") == "required":
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # the sketch canvas draws with WebGL: headless Chromium has it only in software (SwiftShader), when asked
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,2000",
                     "--enable-unsafe-swiftshader"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def app_url():
    """`attnctl app` as users start it (its console script, a free port), on the built-in MMDiT (relocation with the
    model's recommendation: the contrast locator and compose, its objects' own runs included)."""
    from conftest import served_app

    with served_app("--model", "builtin:shapes-mmdit") as url:
        yield url


def test_sketch_upload_to_both_images_in_chromium(browser, app_url, tmp_path):
    try:
        use_the_page(browser, app_url)
    except Exception:
        browser.save_screenshot(str(tmp_path / "failed.png"))
        print(f"the page when the test failed: {tmp_path / 'failed.png'}")
        raise
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(tmp_path / "app.png"))
    if os.environ.get("ATTNCTL_SCREENSHOT"):
        shutil.copy(tmp_path / "app.png", os.environ["ATTNCTL_SCREENSHOT"])


def use_the_page(browser, url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as shown
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)
    browser.get(url)
    # the page is live once its first check has run (on load): it says that the layout has no regions
    wait.until(shown.text_to_be_present_in_element((By.ID, "message"), "the layout has no regions"))
    wait.until(shown.presence_of_element_located((By.CSS_SELECTOR, "#sketch canvas")))  # the editor is drawn
    upload = "input[type=file][data-testid=file-upload]"  # the page's one upload: the sketch's
    browser.find_element(By.CSS_SELECTOR, upload).send_keys(str(EXAMPLES / "sketch.png"))
    # the sketch's two colours get their phrase boxes, largest first: blue (24%), then red (17%)
    for n, phrase in ((1, "a blue square"), (2, "a red circle")):
        box = wait.until(shown.visibility_of_element_located((By.CSS_SELECTOR, f"#phrase-{n} textarea")))
        box.send_keys(phrase)
    assert "#0082c8" in browser.find_element(By.ID, "swatch-1").text
    browser.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys("a red circle and a blue square")
    steps = browser.find_element(By.CSS_SELECTOR, "#steps input")
    steps.clear()
    steps.send_keys(STEPS)
    wait.until(shown.text_to_be_present_in_element((By.ID, "message"), "ready"))
    browser.find_element(By.ID, "generate").click()
    wait.until(shown.text_to_be_present_in_element((By.ID, "message"), "done"))
    command = browser.find_element(By.CSS_SELECTOR, "#command textarea").get_attribute("value")
    assert command == (f"attnctl generate --method relocation --model builtin:shapes-mmdit --layout layout.json "
                       f"--steps {STEPS} --maps --out out/app")
    for image in ("plain", "controlled", "maps"):
        picture = wait.until(shown.visibility_of_element_located((By.CSS_SELECTOR, f"#{image} img")))
        wait.until(lambda _, picture=picture: browser.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", picture))
        assert browser.execute_script("return arguments[0].naturalWidth", picture) >= 256
