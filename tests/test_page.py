"""GET /: the page in a real headless Chromium, and what curl and programs get instead."""

import json
import os
import shutil

import pytest
from conftest import DATA, ROOT, nifti_bytes, serve, stop
from test_app import request

import greengrassBrainSegmentationApp as app_module

CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1100,950",
]
TOKEN = "page-test-token"
# Set PAGE_SCREENSHOT=docs/page.png to save what the browser shows after the whole ICBM volume.
SCREENSHOT = os.environ.get("PAGE_SCREENSHOT")


@pytest.fixture(scope="module")
def token_server(model):
    """A real server that needs API_TOKEN, as a box on a shared network would."""
    settings = app_module.Settings(host="127.0.0.1", port=0, api_token=TOKEN, max_upload_mb=4)
    server, url = serve(settings, model)
    yield url
    stop(server)


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium from Debian's packages, a fresh profile, driven by Selenium."""
    if not (CHROMIUM and DRIVER):
        pytest.skip(
            "chromium and chromedriver are not installed: apt-get install -y chromium "
            "chromium-driver (.ci/run does this)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def test_curl_and_programs_still_get_json(token_server, server_url):
    status, headers, body = request(server_url + "/", headers={"Accept": "*/*"})
    assert status == 200 and "volumes" in json.loads(body)
    status, headers, body = request(server_url + "/")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert request(token_server + "/", headers={"Accept": "*/*"})[0] == 401
    status, headers, body = request(token_server + "/", headers={"Accept": "text/html"})
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'data-token-required="yes"' in body
    assert b"http://" not in body and b"https://" not in body  # nothing from elsewhere
    assert "default-src 'none'" in headers["Content-Security-Policy"]


def upload(driver, path):
    """Choose `path` in the page's file input and wait for the result (or an error)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    field = driver.find_element(By.ID, "file")
    # A hidden input takes no keys; an emptied one fires "change" for the same file again.
    driver.execute_script(
        "arguments[0].hidden = false; arguments[0].value = ''; document.body.dataset.state = ''",
        field,
    )
    field.send_keys(str(path))
    WebDriverWait(driver, 120).until(
        lambda d: d.execute_script("return document.body.dataset.state") in ("shown", "error")
    )
    return driver.execute_script("return document.body.dataset.state")


def overlay_pixels(driver):
    """How many canvas pixels are clearly orange (grey matter) and clearly blue (CSF)."""
    return driver.execute_script(
        """
        const canvas = document.getElementById("view");
        const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        let orange = 0, blue = 0;
        for (let p = 0; p < data.length; p += 4) {
          if (data[p] > data[p + 2] + 60) orange += 1;
          if (data[p + 2] > data[p] + 60) blue += 1;
        }
        return [orange, blue];
        """
    )


def volume_table(driver):
    """{tissue: mL} as the page's table shows it."""
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#volumes tbody tr")
    return {
        row.get_attribute("data-tissue"): float(row.find_elements(By.TAG_NAME, "td")[1].text)
        for row in rows
    }


def move(driver, slider, value):
    """Set a range input as a person dragging it would."""
    driver.execute_script(
        "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
        slider,
        value,
    )


def test_page_segments_a_volume_and_a_slice_in_a_real_browser(
    browser, token_server, icbm_slab, icbm_nifti, tmp_path
):
    from selenium.webdriver.common.by import By

    # the browser uploads from a file, as a person does
    volume = tmp_path / ("icbm2009a_2mm.nii.gz" if SCREENSHOT else "slab.nii.gz")
    volume.write_bytes(icbm_nifti if SCREENSHOT else nifti_bytes(*icbm_slab))
    browser.get(token_server + "/")
    assert browser.find_element(By.ID, "token").is_displayed()
    assert upload(browser, volume) == "error"  # no token yet: the server's 401, in words
    assert "Authorization" in browser.find_element(By.ID, "status").text

    browser.find_element(By.ID, "token").send_keys(TOKEN)
    assert upload(browser, volume) == "shown"
    table = volume_table(browser)
    assert set(table) == {"csf", "grey_matter", "white_matter", "brain (all three)"}
    assert min(table["grey_matter"], table["white_matter"]) > table["csf"] > 0
    assert table["brain (all three)"] == pytest.approx(
        table["csf"] + table["grey_matter"] + table["white_matter"], abs=0.2
    )
    orange, blue = overlay_pixels(browser)
    assert orange > 1000 and blue > 0
    slider = browser.find_element(By.ID, "slice")
    assert slider.get_attribute("max") == str((94 if SCREENSHOT else 12) - 1)
    assert "axial" in browser.find_element(By.ID, "slice-label").text
    move(browser, slider, 0)
    assert browser.find_element(By.ID, "slice-label").text.startswith("1 of")
    move(browser, slider, int(slider.get_attribute("max")) // 2)
    opacity = browser.find_element(By.ID, "opacity")
    move(browser, opacity, 0)
    assert overlay_pixels(browser)[0] < orange / 10  # no overlay left to see
    move(browser, opacity, 60)
    link = browser.find_element(By.ID, "download")
    assert link.get_attribute("download") == "labels.nii.gz"
    assert link.get_attribute("href").startswith("blob:")
    if SCREENSHOT:
        browser.save_screenshot(str(ROOT / SCREENSHOT))

    assert upload(browser, DATA / "icbm2009a_axial100.png") == "shown"
    assert browser.find_element(By.ID, "amount-head").text == "Share of the slice"
    assert overlay_pixels(browser)[0] > 1000
    assert browser.find_element(By.ID, "download").get_attribute("download") == "mask.png"
