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
#: Refreshing the docs' screenshots runs the video tab at its defaults (the model at its best: minutes on a CPU),
#: the test alone at 4 steps.
SCREENSHOTS_FOR_DOCS = bool(os.environ.get("DEMO_SCREENSHOT_DIR"))

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


def _set_slider(page, selector: str, value) -> None:
    box = page.locator(f"{selector} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _no_error_badges(page, key: str) -> None:
    """No output of the tab shows Gradio's red error state (left by an event that raised)."""
    for name in ("baseline", "accelerated", "difference", "metrics"):
        assert page.locator(f"#{key}-{name} .error").count() == 0, name


def test_images_tab_cache_then_distilled_student(page, screenshot_dir):
    _set_slider(page, "#image-steps", 10)  # small settings: seconds on a CPU
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

    # The distilled student beside the teacher: the cache controls hide, the labels and the table say who is who.
    method = page.locator("#image-method")
    if not method.count():
        pytest.skip("this install ships no distilled image student")
    method.get_by_text("distilled student").click()
    page.locator("#image-policy").wait_for(state="hidden")
    page.click("#image-generate")
    metrics = _wait_for_text(page, "#image-metrics", "PSNR vs teacher", GENERATE_TIMEOUT_MS)
    assert re.search(r"speed-up\s+1\.00x\s+\d+\.\d\dx", metrics), metrics
    assert re.search(r"transformer forwards per image \(CFG counts 2\)\s+20\s+8 \(8 steps", metrics), metrics
    assert re.search(r"PSNR vs teacher\s+inf\s+\d+\.\d\d dB", metrics), metrics
    assert re.search(r"classifier accuracy \(shipped CNN\)\s+\d+%\s+\d+%", metrics), metrics
    page.get_by_text("distilled student (8 steps)", exact=True).wait_for()  # the picture's label
    page.screenshot(path=str(screenshot_dir / "demo-images.png"), full_page=True)


def test_video_tab_defaults_caption_and_clips(page, screenshot_dir):
    if not page.get_by_role("tab", name="Video (moving digits)").count():
        pytest.skip("this install has no trained video model (models/digits-video)")
    page.get_by_role("tab", name="Video (moving digits)").click()
    # Defaults: the model's best evaluated settings, and a caption saying what the numbers mean.
    assert page.locator("#video-steps input[type=number]").input_value() == "50"
    checked = page.locator("#video-digits label:has(input:checked)")
    assert sorted(checked.nth(i).inner_text().strip() for i in range(checked.count())) == ["2", "5"]
    caption = page.inner_text("#video-caption")
    assert "What the numbers mean" in caption and "99.1% per frame" in caption
    assert page.locator("#video-method").count() == (1 if (ROOT / "models" / "digits-video-distilled").is_dir() else 0)
    if not SCREENSHOTS_FOR_DOCS:  # small settings for the test: seconds, not minutes, on a CPU
        _set_slider(page, "#video-steps", 4)
    page.click("#video-generate")
    timeout = 3 * GENERATE_TIMEOUT_MS if SCREENSHOTS_FOR_DOCS else GENERATE_TIMEOUT_MS
    metrics = _wait_for_text(page, "#video-metrics", "speed-up", timeout)
    _check_numbers(metrics)
    assert re.search(r"classifier accuracy per frame\s+\d+%\s+\d+%", metrics), metrics
    assert re.search(r"clips moving as asked \(centroid\)\s+\d+%\s+\d+%", metrics), metrics
    assert re.search(r"clips moving along the asked line, either way\s+\d+%\s+\d+%", metrics), metrics
    _wait_for_images(page, "video")
    assert page.eval_on_selector("#video-baseline img", "img => img.src").endswith(".gif")  # a playing animation
    page.screenshot(path=str(screenshot_dir / "demo-video.png"), full_page=True)


def test_any_pipeline_tab_offline_choices_messages_and_noise(page, screenshot_dir):
    page.get_by_role("tab", name="Any pipeline").click()
    page.click("#pipeline-generate")  # nothing loaded yet: a message where the numbers go, no red badge
    _wait_for_text(page, "#pipeline-metrics", "Load a pipeline first.")
    _no_error_badges(page, "pipeline")

    source = page.locator("#pipeline-source input")
    source.fill("/no/such/folder")
    source.press("Enter")
    page.click("#pipeline-load")
    status = _wait_for_text(page, "#pipeline-status", "Cannot use this pipeline")
    assert "No folder at" in status and "Traceback" not in status and "Error:" not in status

    source.click()  # the list offers the shipped models and the tiny random-weight DiT
    options = page.locator("[role=option]")
    options.first.wait_for()
    offered = [options.nth(i).inner_text() for i in range(options.count())]
    assert "models/digits-image" in offered and any("tiny random-weight DiT" in o for o in offered), offered
    page.get_by_role("option", name=re.compile("tiny random-weight DiT")).click()
    page.click("#pipeline-load")
    status = _wait_for_text(page, "#pipeline-status", "Loaded")
    assert "DiTPipeline" in status and "family dit" in status
    # The prompt field now asks for class labels, and the earlier message is gone.
    assert "class labels" in page.inner_text("#pipeline-prompt")
    assert "Load a pipeline first." not in page.inner_text("#pipeline-metrics")

    policy = page.locator("#pipeline-policy")
    policy.get_by_text("Static schedule").click()
    page.click("#pipeline-generate")
    metrics = _wait_for_text(page, "#pipeline-metrics", "speed-up", GENERATE_TIMEOUT_MS)
    _check_numbers(metrics)
    assert "StaticScheduleConfig(" in metrics and "interval=3" in metrics
    assert page.locator("#pipeline-metrics strong", has_text=re.compile(r"^\d+\.\d\dx$")).count() == 1  # bold win
    _wait_for_images(page, "pipeline")
    page.screenshot(path=str(screenshot_dir / "demo-pipeline.png"), full_page=True)

    # Nothing skipped (every block at every step): the speed-up is named timing noise, never bold.
    _set_slider(page, "#pipeline-interval", 1)
    page.click("#pipeline-generate")
    metrics = _wait_for_text(page, "#pipeline-metrics", "timing noise", GENERATE_TIMEOUT_MS)
    assert re.search(r"speed-up\s+1\.00x\s+\d+\.\d\dx \(no blocks skipped: timing noise\)", metrics), metrics
    assert page.locator("#pipeline-metrics strong", has_text=re.compile(r"^\d+\.\d\dx$")).count() == 0
    _no_error_badges(page, "pipeline")


POLICY_TAB = "Robot policy (Meta-World)"


def test_policy_tab_rolls_out_both(page, screenshot_dir):
    if not page.get_by_role("tab", name=POLICY_TAB).count():
        pytest.skip("this install has no shipped policy or no Meta-World")
    page.get_by_role("tab", name=POLICY_TAB).click()
    # The defaults: one reach episode, seed 2 (both runs succeed there), at most 64 steps, BAC.
    assert page.locator("#policy-seed input").input_value() == "2"
    assert page.locator("#policy-env-steps input[type=number]").input_value() == "64"
    page.locator("#policy-policy").get_by_text("Uniform schedule").click()
    # one episode of 48 environment steps (6 chunks), 10 DDPM steps per chunk: seconds, not minutes, on a CPU
    for selector, value in (("#policy-episodes", 1), ("#policy-env-steps", 48), ("#policy-steps", 10)):
        _set_slider(page, selector, value)
    _set_slider(page, "#policy-updates", 3)
    page.click("#policy-generate")
    metrics = _wait_for_text(page, "#policy-metrics", "speed-up", GENERATE_TIMEOUT_MS)
    assert re.search(r"success\s+\d+/1 \(\d+%\)\s+\d+/1 \(\d+%\)", metrics), metrics
    # The closest approach agrees with the success flags (reach: success within 5 cm, exact fingertips' centre).
    found = re.search(
        r"success\s+(\d)/1 \(\d+%\)\s+(\d)/1.*?closest approach[^\n]*?(\d+\.\d\d) cm\s+(\d+\.\d\d) cm", metrics, re.S
    )
    assert found, metrics
    for succeeded, closest in ((found[1], found[3]), (found[2], found[4])):
        assert (succeeded == "1") == (float(closest) <= 5.0), metrics
    assert re.search(r"chunk latency p50\s+\d+\.\d ms\s+\d+\.\d ms", metrics), metrics
    assert re.search(r"control frequency achieved \(whole loop\)\s+\d+\.\d Hz\s+\d+\.\d Hz", metrics), metrics
    assert "70.0% saved" in metrics  # 3 of 10 steps per sub-block: the sliders' values reached the run
    assert re.search(r"relative L2 of the actions vs baseline\s+0\s+\d+\.\d{4}", metrics), metrics
    assert "DDPM 10 steps per chunk" in metrics
    _wait_for_images(page, "policy", ("trajectories", "heatmap"))
    page.screenshot(path=str(screenshot_dir / "demo-policy.png"), full_page=True)
