"""The demo in a real browser: start ``python app.py`` on a free port, drive every tab with Playwright and Debian's
Chromium, check that the outputs and numbers appear, and screenshot each tab.

Screenshots go to a temporary folder; refresh the ones in the README with
``DEMO_SCREENSHOT_DIR=docs python -m pytest -q tests/test_app_browser.py``.
Needs ``/usr/bin/chromium`` (``apt-get install chromium``; .ci/run installs it) and the ``playwright`` package
(in the ``dev`` extra); without either the tests skip and say which is missing.
"""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # the machine has no internet: no background connections to refuse
    "--disable-component-update",
    "--disable-sync",
]
ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 240  # importing torch, diffusers and gradio on a busy 2-core machine
GENERATE_TIMEOUT_MS = 400_000  # 10 digits x 50 steps, twice, on a busy 2-core CPU (a few seconds when idle)

pytest.importorskip("gradio", reason="the demo needs gradio: pip install -e '.[demo]'")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser test needs playwright: pip install -e '.[dev]'"
)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.is_file(),
        reason=f"Debian's Chromium is not installed at {CHROMIUM} (apt-get install -y chromium; .ci/run does this)",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory) -> Path:
    from tiny_pipelines import build_pipeline

    folder = tmp_path_factory.mktemp("pipelines") / "tiny-dit"
    build_pipeline("dit").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        app = subprocess.Popen(
            [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if app.poll() is not None:
                pytest.fail(f"app.py exited with {app.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"app.py did not answer on {url} within {START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(1)
        yield url
    finally:
        app.terminate()
        try:
            app.wait(timeout=20)
        except subprocess.TimeoutExpired:
            app.kill()
            app.wait()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, app_url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(app_url, wait_until="domcontentloaded")
    page.wait_for_selector("#image-generate", timeout=60_000)
    yield page
    page.close()


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("DEMO_SCREENSHOT_DIR") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _wait_for_text(page, selector: str, text: str, timeout: int = 60_000) -> str:
    page.wait_for_function(
        "([selector, text]) => (document.querySelector(selector)?.innerText || '').includes(text)",
        arg=[selector, text],
        timeout=timeout,
    )
    return page.inner_text(selector)


def _wait_for_images(page, key: str, names=("baseline", "accelerated", "difference", "heatmap")) -> None:
    for name in names:
        page.wait_for_function(
            "(selector) => { const img = document.querySelector(selector); return img && img.complete "
            "&& img.naturalWidth > 0; }",
            arg=f"#{key}-{name} img",
            timeout=60_000,
        )


def _check_numbers(metrics: str) -> None:
    assert re.search(r"wall-clock\s+\d+\.\d\d s\s+\d+\.\d\d s", metrics), metrics
    assert re.search(r"speed-up\s+1\.00x\s+\d+\.\d\dx", metrics), metrics
    assert re.search(r"\d+\.\d% saved", metrics), metrics
    assert re.search(r"PSNR vs baseline\s+inf\s+(\d+\.\d\d dB|inf)", metrics), metrics


def test_images_tab_generates_side_by_side(page, screenshot_dir):
    sparse = page.locator("#image-sparse")
    if sparse.count():  # installs with sparse attention: turn it on beside the default cache
        sparse.get_by_text("Block-sparse attention").click()
        sparse.get_by_label("also make self-attention block-sparse").check()
    page.click("#image-generate")
    metrics = _wait_for_text(page, "#image-metrics", "speed-up", GENERATE_TIMEOUT_MS)
    _check_numbers(metrics)
    assert re.search(r"SSIM vs baseline\s+1\s+\d\.\d{4}", metrics), metrics
    assert re.search(r"classifier accuracy \(shipped CNN\)\s+\d+%\s+\d+%", metrics), metrics
    assert "BWCacheConfig(" in metrics
    _wait_for_images(page, "image")
    if sparse.count():
        assert re.search(r"attention key blocks kept \(sparse steps\)\s+100%\s+\d+\.\d%", metrics), metrics
        _wait_for_images(page, "image", ("mask",))
    page.screenshot(path=str(screenshot_dir / "demo-images.png"), full_page=True)


def test_video_tab_plays_both_clips(page, screenshot_dir):
    if not page.get_by_role("tab", name="Video (moving digits)").count():
        pytest.skip("this install has no trained video model (models/digits-video)")
    page.get_by_role("tab", name="Video (moving digits)").click()
    page.click("#video-generate")
    metrics = _wait_for_text(page, "#video-metrics", "speed-up", GENERATE_TIMEOUT_MS)
    _check_numbers(metrics)
    assert re.search(r"classifier accuracy per frame\s+\d+%\s+\d+%", metrics), metrics
    assert re.search(r"clips moving as asked \(centroid\)\s+\d+%\s+\d+%", metrics), metrics
    assert re.search(r"clips moving along the asked line, either way\s+\d+%\s+\d+%", metrics), metrics
    _wait_for_images(page, "video")
    assert page.eval_on_selector("#video-baseline img", "img => img.src").endswith(".gif")  # a playing animation
    page.screenshot(path=str(screenshot_dir / "demo-video.png"), full_page=True)


def test_any_pipeline_tab_loads_and_generates(page, dit_folder, screenshot_dir):
    page.get_by_role("tab", name="Any pipeline").click()
    page.click("#pipeline-generate")  # nothing loaded yet: a message, not a traceback
    page.get_by_text("Load a pipeline first.").wait_for(timeout=60_000)
    page.click("[data-testid=toast-close]")

    page.fill("#pipeline-source textarea", str(dit_folder.parent / "no-such-folder"))
    page.click("#pipeline-load")
    assert "No folder at" in _wait_for_text(page, "#pipeline-status", "Cannot use this pipeline")

    page.fill("#pipeline-source textarea", str(dit_folder))
    page.click("#pipeline-load")
    status = _wait_for_text(page, "#pipeline-status", "Loaded")
    assert "DiTPipeline" in status and "family dit" in status

    page.fill("#pipeline-prompt textarea", "1, 2, 3")
    page.locator("#pipeline-policy").get_by_text("Static schedule").click()  # shows the static schedule's controls
    page.click("#pipeline-generate")
    metrics = _wait_for_text(page, "#pipeline-metrics", "speed-up", GENERATE_TIMEOUT_MS)
    _check_numbers(metrics)
    assert "StaticScheduleConfig(" in metrics and "interval=3" in metrics
    assert "0.0% saved" not in metrics
    _wait_for_images(page, "pipeline")
    page.screenshot(path=str(screenshot_dir / "demo-pipeline.png"), full_page=True)


POLICY_TAB = "Robot policy (Meta-World)"


def _set_slider(page, selector: str, value: int) -> None:
    box = page.locator(f"{selector} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_policy_tab_rolls_out_both(page, screenshot_dir):
    if not page.get_by_role("tab", name=POLICY_TAB).count():
        pytest.skip("this install has no shipped policy or no Meta-World")
    page.get_by_role("tab", name=POLICY_TAB).click()
    page.locator("#policy-policy").get_by_text("Uniform schedule").click()
    # one episode of 48 environment steps (6 chunks), 10 DDPM steps per chunk: seconds, not minutes, on a CPU
    for selector, value in (("#policy-episodes", 1), ("#policy-env-steps", 48), ("#policy-steps", 10)):
        _set_slider(page, selector, value)
    _set_slider(page, "#policy-updates", 3)
    page.click("#policy-generate")
    metrics = _wait_for_text(page, "#policy-metrics", "speed-up", GENERATE_TIMEOUT_MS)
    assert re.search(r"success\s+\d+/1 \(\d+%\)\s+\d+/1 \(\d+%\)", metrics), metrics
    assert re.search(r"chunk latency p50\s+\d+\.\d ms\s+\d+\.\d ms", metrics), metrics
    assert re.search(r"control frequency achieved \(whole loop\)\s+\d+\.\d Hz\s+\d+\.\d Hz", metrics), metrics
    assert "70.0% saved" in metrics  # 3 of 10 steps per sub-block: the sliders' values reached the run
    assert re.search(r"relative L2 of the actions vs baseline\s+0\s+\d+\.\d{4}", metrics), metrics
    assert "DDPM 10 steps per chunk" in metrics
    _wait_for_images(page, "policy", ("trajectories", "heatmap"))
    page.screenshot(path=str(screenshot_dir / "demo-policy.png"), full_page=True)
