"""The atlas in a real browser: headless Chromium (Debian's, driven by Selenium) opens the site over
file:// and finds every concept, a search hit for a concept and for a neuron, shaded tokens, no
console error, no broken link and no request that leaves the file system.

Set STEER_EXPERTS_SCREENSHOTS to a folder to keep screenshots of the index, a concept page and a
neuron page (kept out of the repository)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ..conftest import in_ci

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        reason = ("Chromium and its driver are not installed (apt-get install chromium chromium-driver; "
                  ".ci/install.sh does it as root)")
        if in_ci():
            pytest.fail(f"{reason}: CI must run the browser tests.")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _open(driver, path: Path):
    driver.get(path.resolve().as_uri())
    return driver


def _requests(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def _shot(driver, name: str) -> None:
    folder = os.environ.get("STEER_EXPERTS_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(folder) / f"{name}.png"))


def test_every_page_opens_clean_and_stays_on_the_file_system(browser, site):
    """Every page of the site, opened in turn: its links point at files that exist, the console stays
    free of errors and warnings, and every request is for a file:// or data: URL."""
    report = site[0]
    browser.get_log("browser"), browser.get_log("performance")  # start from empty logs
    pages = sorted(report.folder.rglob("*.html"))
    for page in pages:
        _open(browser, page)
        hrefs = browser.execute_script(  # absolute, as the browser resolves them; SVG links included
            "return [...document.querySelectorAll('a[href]')].map(a => new URL(a.getAttribute('href'), "
            "document.baseURI).href)")
        for href in hrefs:
            assert href.startswith("file://"), f"{page.name} links off the file system: {href}"
            target = Path(href.removeprefix("file://").split("#")[0])
            assert target.is_file(), f"{page.name} links to a missing page: {href}"
        problems = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert not problems, f"{page.name}: {problems}"
    urls = _requests(browser)
    assert len(urls) >= len(pages)
    assert all(u.startswith(("file://", "data:")) for u in urls), [u for u in urls if not u.startswith("file")]


def test_index_lists_concepts_and_search_finds_a_concept_and_a_neuron(browser, site):
    from selenium.webdriver.common.by import By

    report, _, _, experts = site
    driver = _open(browser, report.folder / "index.html")
    listed = [a.text for a in driver.find_elements(By.CSS_SELECTOR, "table a")]
    assert listed == experts.concepts
    _shot(driver, "index")
    box = driver.find_element(By.ID, "search")
    box.send_keys("mus")
    hits = driver.find_elements(By.CSS_SELECTOR, "#results a")
    assert [h.text for h in hits][:1] == ["music (concept)"]
    sel = experts.select("rain", k=1)
    box.clear()
    box.send_keys(f"{sel.layer[0]}/{sel.neuron[0]}")
    hits = driver.find_elements(By.CSS_SELECTOR, "#results a")
    assert len(hits) == 1 and hits[0].text.startswith(f"L{sel.layer[0]}/N{sel.neuron[0]} (")
    hits[0].click()
    assert driver.title == f"Neuron L{sel.layer[0]}/N{sel.neuron[0]}"
    assert "rain" in driver.find_element(By.TAG_NAME, "table").text
    _shot(driver, "neuron")


def test_a_concept_page_shows_shaded_tokens(browser, site):
    from selenium.webdriver.common.by import By

    report = site[0]
    driver = _open(browser, report.folder / "concepts" / "dogs.html")
    tokens = driver.find_elements(By.CSS_SELECTOR, ".sentence .tok")
    assert tokens and all(t.is_displayed() for t in tokens)
    shades = {t.value_of_css_property("background-color") for t in tokens}
    assert any(s not in ("rgba(230, 126, 34, 0)", "rgba(0, 0, 0, 0)") for s in shades)  # some token is shaded
    charts = driver.find_elements(By.CSS_SELECTOR, "svg[role=img]")
    assert charts and all(c.find_element(By.TAG_NAME, "title").get_attribute("textContent") for c in charts)
    _shot(driver, "concept")
