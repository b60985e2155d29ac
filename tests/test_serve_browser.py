"""The page at ``GET /`` in a real headless browser (Debian's chromium + chromedriver, driven by Selenium).

Choose the example face and a short speech file, press Start, wait for "done", then check that frames were
drawn: the canvas holds a non-blank picture and the screenshot shows it, and the finished mp4 plays inline.
Cancel stops a stream; a close without a message (1009: a file over the limit) is explained. Skips where
chromium is absent.
"""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")

from dheads.serve.config import ServeConfig
from dheads.serve.worker import EngineWorker

from _serve import FACE, free_port, running_server, short_speech

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")

SCREENSHOT_DIR = None  # set to a path to keep the screenshot for a look


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=900,900",
                "--autoplay-policy=no-user-gesture-required"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def last_frame(worker, wav):
    """The stream's last frame as the batcher makes it alone (the page asks for seed 0 and the engine's sampling)."""
    from dheads.engine.batcher import Batcher

    inputs = worker.head.prepare(FACE, wav)
    s = worker.new_stream(inputs.identity, type("O", (), {"sampler": worker.head.default_sampler, "seed": 0})(),
                          inputs.audio_emb, True)
    b, frames = Batcher(worker.head.denoiser), []
    while not s.done:
        frames += b.step([s])
    from dheads.serve.app import encode_frame

    jpeg = np.frombuffer(encode_frame(frames[-1].rgb, "jpeg"), np.uint8)  # what the page got
    return cv2.cvtColor(cv2.imdecode(jpeg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(int)


def test_page_streams_frames_into_the_canvas(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wav = short_speech(tmp_path / "speech.wav", 0.3)
    cfg = ServeConfig(port=free_port(), threads=1, token="s3cret")  # the page fetches a WebSocket ticket
    worker = EngineWorker(cfg)
    worker.start()
    try:
        with running_server(worker, cfg) as url:
            browser.get(url + "/")
            browser.find_element(By.ID, "face").send_keys(str(FACE))
            browser.find_element(By.ID, "audio").send_keys(str(wav))
            browser.find_element(By.ID, "token").send_keys("s3cret")  # sampler and steps: the engine's
            browser.find_element(By.ID, "start").click()
            status = browser.find_element(By.ID, "status")
            WebDriverWait(browser, 60).until(lambda d: status.text.startswith(("done", "connection")) or
                                             status.get_attribute("class") == "error")
            assert status.text == "done: 7 frames"
            canvas = browser.find_element(By.ID, "view")
            assert canvas.get_attribute("data-frames") == "7"
            # the canvas's own pixels are the last frame the server made, as JPEG (decoders differ by a level or two)
            rgba = browser.execute_script(
                "const c = arguments[0]; return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);",
                canvas)
            drawn = np.array(rgba, np.uint8).reshape(64, 64, 4)[..., :3].astype(int)
            assert drawn.std() > 10
            assert np.abs(drawn - last_frame(worker, wav)).mean() < 3
            link = browser.find_element(By.ID, "download")
            assert link.is_displayed() and "/v1/videos/" in link.get_attribute("href")
            player = browser.find_element(By.ID, "player")
            assert player.is_displayed() and player.get_attribute("src") == link.get_attribute("href")
            WebDriverWait(browser, 20).until(lambda d: d.execute_script("return arguments[0].readyState >= 1", player))
            assert browser.execute_script("return arguments[0].duration", player) == pytest.approx(0.28, abs=0.05)
            assert browser.find_element(By.ID, "start").is_enabled()
            assert not browser.find_element(By.ID, "cancel").is_enabled()
            png = browser.get_screenshot_as_png()
            if SCREENSHOT_DIR:
                (SCREENSHOT_DIR / "serve_page.png").write_bytes(png)
            shot = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
            r = canvas.rect
            area = shot[int(r["y"]) + 4 : int(r["y"] + r["height"]) - 4, int(r["x"]) + 4 : int(r["x"] + r["width"]) - 4]
            assert area.size and area.std() > 10, "the screenshot shows no frame where the canvas is"
            assert not np.all(area == area[0, 0])
    finally:
        worker.stop()


def run_page(browser, url, *files, token=None):
    from selenium.webdriver.common.by import By

    browser.get(url + "/")
    browser.find_element(By.ID, "face").send_keys(str(files[0]))
    browser.find_element(By.ID, "audio").send_keys(str(files[1]))
    if token:
        browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.ID, "start").click()
    return browser.find_element(By.ID, "status")


def test_cancel_stops_the_stream_and_a_bare_close_is_explained(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    long = short_speech(tmp_path / "long.wav", 3.0)  # 75 frames: still running when Cancel is pressed
    small_face = tmp_path / "face.jpg"
    cv2.imwrite(str(small_face), cv2.imread(str(FACE)), [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert small_face.stat().st_size < 25_000
    # the 96 KB speech, the last message the page sends, is over the WS limit (25 000 + 64 KiB): uvicorn closes 1009
    cfg = ServeConfig(port=free_port(), threads=1, max_upload_bytes=25_000)
    worker = EngineWorker(cfg)
    worker.start()
    try:
        with running_server(worker, cfg) as url:
            status = run_page(browser, url, small_face, long)
            WebDriverWait(browser, 30).until(lambda d: status.text.startswith("closed") or
                                             status.get_attribute("class") == "error")
            assert status.text == "closed (1009): a file is larger than this server takes (--max-upload-mb)"
            assert browser.find_element(By.ID, "start").is_enabled()
        cfg = ServeConfig(port=free_port(), threads=1)
        roomy = EngineWorker(cfg, head=worker.head, prep=worker.prep)
        roomy.start()
        try:
            with running_server(roomy, cfg) as url:
                status = run_page(browser, url, FACE, long)
                canvas = browser.find_element(By.ID, "view")
                WebDriverWait(browser, 60).until(lambda d: int(canvas.get_attribute("data-frames") or 0) >= 1)
                assert not browser.find_element(By.ID, "start").is_enabled()  # one stream at a time
                browser.find_element(By.ID, "cancel").click()
                WebDriverWait(browser, 10).until(lambda d: browser.find_element(By.ID, "start").is_enabled())
                assert status.text == "cancelled"
                WebDriverWait(browser, 10).until(
                    lambda d: roomy.metrics.registry.get_sample_value("dh_streams_total", {"result": "cancelled"}))
                assert int(canvas.get_attribute("data-frames")) < 75
        finally:
            roomy.stop()
    finally:
        worker.stop()
