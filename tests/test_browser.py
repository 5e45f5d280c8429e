"""The page of ``translate serve`` in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, which .ci/run installs) loads it, types a sentence, and reads the
translation and the attention heatmap. Skipped, with the reason, where no browser is installed."""

from __future__ import annotations

import shutil
import threading

import pytest

from translate.serve import RequestBatcher, make_server
from translate.translator import DecodeOptions, Translator

webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install '.[test]')")
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (BROWSER and DRIVER), reason="needs Chromium and its driver "
                                "(apt-get install chromium chromium-driver)")


@pytest.fixture()
def page_url(tiny_model, tokenizer):
    batcher = RequestBatcher(Translator(tiny_model, tokenizer, DecodeOptions(beam=2)), max_wait_ms=1)
    server = make_server(batcher, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", batcher.translator
    server.shutdown()
    server.server_close()
    batcher.close()


@pytest.fixture()
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    # a phone's screen (a headless window itself is never narrower than 500 pixels)
    options.add_experimental_option("mobileEmulation", {"deviceMetrics": {"width": 390, "height": 844,
                                                                          "pixelRatio": 2}})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def test_the_page_translates_what_is_typed(page_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, translator = page_url
    browser.get(url)
    Select(browser.find_element(By.ID, "beam")).select_by_value("1")
    source = browser.find_element(By.ID, "source")
    line = "El gato come pan. El perro bebe agua."  # two sentences: translated apart, joined, one heatmap
    source.send_keys(line)
    source.send_keys(Keys.CONTROL, Keys.ENTER)  # the keyboard alone
    WebDriverWait(browser, 30).until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "Score"))
    expected = translator.translate([line], DecodeOptions(beam=1))[0][0]
    assert browser.find_element(By.ID, "target").get_property("value") == expected.text
    cells = browser.find_elements(By.CSS_SELECTOR, "#heatmap td")
    assert len(cells) == (len(expected.tokens) + 1) * len(translator.tokenizer.src_pieces(line) + [0])
    screen, width = browser.execute_script("return [window.innerWidth, document.documentElement.scrollWidth]")
    assert screen == 390 and width <= screen  # nothing wider than the phone's screen (the heatmap scrolls)


def test_the_page_asks_for_a_key_where_the_server_wants_one(tiny_model, tokenizer, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    from translate.serve import Access

    translator = Translator(tiny_model, tokenizer, DecodeOptions(beam=2))
    batcher = RequestBatcher(translator, max_wait_ms=1)
    server = make_server(batcher, "127.0.0.1", 0, access=Access({"the-key": None}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/")
        key = browser.find_element(By.ID, "key")
        assert not key.is_displayed()  # until the server asks for one
        browser.find_element(By.ID, "source").send_keys("El gato come pan.")
        browser.find_element(By.ID, "go").click()
        wait = WebDriverWait(browser, 30)
        wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "API key"))
        assert key.is_displayed()
        key.send_keys("the-key")
        browser.find_element(By.ID, "go").click()
        wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "Score"))
        expected = translator.translate(["El gato come pan."], DecodeOptions(beam=5))[0][0].text  # the page's beam
        assert browser.find_element(By.ID, "target").get_property("value") == expected
    finally:
        server.shutdown()
        server.server_close()
        batcher.close()


def test_the_page_sends_a_glossary_and_shows_server_errors(page_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, translator = page_url
    browser.get(url)
    # keep each request's body, as the page sends it
    browser.execute_script("window.sent = []; const send = window.fetch;"
                           "window.fetch = (url, init) => { window.sent.push(init.body); return send(url, init); };")
    Select(browser.find_element(By.ID, "beam")).select_by_value("2")
    line = "El gato come pan."
    browser.find_element(By.ID, "glossary").send_keys("gato = perro")
    source = browser.find_element(By.ID, "source")
    source.send_keys(line)
    source.send_keys(Keys.CONTROL, Keys.ENTER)
    wait = WebDriverWait(browser, 30)
    wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "Score"))
    sent = browser.execute_script("return window.sent.map(body => JSON.parse(body))")
    assert [body.get("glossary") for body in sent] == [[["gato", "perro"]]]
    expected = translator.translate([line], DecodeOptions(beam=2, glossary=(("gato", "perro"),)))[0][0]
    assert browser.find_element(By.ID, "target").get_property("value") == expected.text
    missed = browser.find_element(By.ID, "missed").text
    assert "perro" in expected.text and expected.missed == () and missed == ""  # placed, so nothing reported
    glossary = browser.find_element(By.ID, "glossary")
    glossary.send_keys(Keys.ENTER, "pan =")  # an empty target term: the server's one-line error, as the page shows one
    source.send_keys(Keys.CONTROL, Keys.ENTER)
    wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "Error"))
    assert "empty target term" in browser.find_element(By.ID, "status").text
    glossary.send_keys(Keys.ENTER, "no sign")  # a line without "=" is refused before anything is sent
    source.send_keys(Keys.CONTROL, Keys.ENTER)
    wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "line 3: write source = target"))
    assert len(browser.execute_script("return window.sent")) == 2
    # a term the search could not place (this model places them all, so the server's answer is stood in for)
    browser.execute_script("window.fetch = async () => new Response(JSON.stringify({translations: ['A cat.'],"
                           "scores: [-1], attention: [null], missed_terms: [['perro']]}), {status: 200});")
    glossary.clear()
    glossary.send_keys("gato = perro")
    glossary.send_keys(Keys.CONTROL, Keys.ENTER)  # Ctrl+Enter translates from the glossary box too
    wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "missed"), "Not placed"))
    assert browser.find_element(By.ID, "missed").text == "Not placed: perro (line 1)"
