"""Look at an MLflow run the way a person does: `mlflow server` on a store, the run page in
headless Chromium (Playwright driving the system's /usr/bin/chromium; no browser download).

    with mlflow_server("sqlite:////abs/mlflow.db") as base_url:
        text = check_run_in_ui(base_url, experiment_id, run_id, "demo", "loss", "validation",
                               Path("run.png"))

`check_run_in_ui` fails (an AssertionError naming what is missing, or a Playwright TimeoutError
naming the element it waited for) unless the run page shows the run name and the logged model,
and its Model metrics tab a chart of `metric` and the images card of `image_key`, whose step
slider moves to the last step and shows that step's image; it saves two screenshots.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from rfsr_ray.tracking import mlflow_run

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CARD = "[data-testid='experiment-view-compare-runs-card']"
PAGE_TIMEOUT_MS = 60_000  # the UI's JavaScript is large and a 2-core machine may be busy


def sqlite_store(folder: Path) -> str:
    """The URI of a new, empty SQLite store `folder/mlflow.db`, copied from one migrated once per
    MLflow version and machine: MLflow's ~60 schema migrations take 7 s on 2 cores, a copy none."""
    import mlflow
    from mlflow.tracking import MlflowClient

    template = Path(tempfile.gettempdir()) / f"rfsr_ray_mlflow_{mlflow.__version__}.db"
    if not template.is_file():
        building = template.with_suffix(f".{os.getpid()}.building")
        MlflowClient(f"sqlite:///{building}").search_experiments()
        building.replace(template)  # atomic: parallel sessions never see half a store
    path = Path(folder) / "mlflow.db"
    shutil.copyfile(template, path)
    return f"sqlite:///{path}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(
    backend_store_uri: str, artifacts_destination: Path | None = None, timeout: float = 120.0
) -> Iterator[str]:
    """`mlflow server` (one worker) on `backend_store_uri` at a free local port; yields its base
    URL once it answers, stops it on exit. Runs whose artifact URIs are local paths are served
    from there; `artifacts_destination` is only for `mlflow-artifacts:` locations."""
    port = free_port()
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    if artifacts_destination is not None:
        command += ["--artifacts-destination", Path(artifacts_destination).resolve().as_uri()]
    with tempfile.TemporaryFile() as log:  # the server's output, shown if it fails to start
        # Its own process group: the server's uvicorn workers stop with it.
        server = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            base_url = f"http://127.0.0.1:{port}"
            _wait_until_up(base_url, server, log, timeout)
            yield base_url
        finally:
            _stop(server)


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def _wait_until_up(base_url: str, server: subprocess.Popen, log: IO[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({server.returncode}):\n{_read(log)}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{base_url}/health", timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server did not answer within {timeout:.0f} s:\n{_read(log)}")


def _read(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-5000:]


@contextlib.contextmanager
def chromium_page(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A Playwright page in headless /usr/bin/chromium."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.is_file():
        raise FileNotFoundError(f"{CHROMIUM} is missing; install it with apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def check_run_in_ui(
    base_url: str,
    experiment_id: str,
    run_id: str,
    run_name: str,
    metric: str,
    image_key: str,
    screenshot: Path,
) -> str:
    """Open the run in the MLflow UI (Model training view) and assert what a person should see;
    returns the text of the pages visited. Screenshots: `screenshot` (overview with the logged
    model), `<stem>_metrics.png` (model-metrics tab: the chart of `metric` and the images card
    of `image_key` at its last step)."""
    screenshot = Path(screenshot)
    overview_url = mlflow_run.run_page_url(base_url, experiment_id, run_id)
    with chromium_page() as page:
        overview = _overview(page, overview_url, run_name, screenshot)
        page.goto(overview_url.replace("?", "/model-metrics?", 1))
        _close_assistant(page)
        # A real run logs dozens of metrics and the tab renders only the cards in view: search
        # for each card as a person would.
        _search_charts(page, metric)
        _metric_chart(page, metric)
        _search_charts(page, image_key)
        _stepped_image(page, image_key)
        page.screenshot(path=str(_beside(screenshot, "metrics")))
        return overview + "\n" + page.inner_text("body")


def _search_charts(page: Any, text: str) -> None:
    search = page.get_by_placeholder("Search metric charts")
    search.wait_for()
    search.fill(text)


def _beside(screenshot: Path, suffix: str) -> Path:
    return screenshot.with_name(f"{screenshot.stem}_{suffix}{screenshot.suffix}")


def _card(page: Any, title: str) -> Any:
    """The chart card whose title is exactly `title`."""
    title_element = page.locator(f"h4[title='{title}']")
    card = page.locator(CARD).filter(has=title_element).first
    card.wait_for()
    return card


def _close_assistant(page: Any) -> None:
    """Close MLflow's assistant side panel when it is open: it takes a third of the width."""
    close = page.locator("[data-component-id='mlflow.assistant.chat_panel.close']")
    if close.count():
        close.first.click()


def _overview(page: Any, url: str, run_name: str, screenshot: Path) -> str:
    """The run page: its name as the title and, in the overview, the logged model (Ready)."""
    page.goto(url)
    page.get_by_role("heading", name=run_name, exact=True).first.wait_for()
    _close_assistant(page)
    heading = page.get_by_role("heading", name=re.compile(r"^Logged models \(\d+\)$")).first
    heading.wait_for()
    heading.scroll_into_view_if_needed()
    models = heading.locator("xpath=../..")
    models.get_by_text("Ready", exact=True).first.wait_for()  # the table loads after the heading
    page.screenshot(path=str(screenshot))
    return page.inner_text("body")


def _metric_chart(page: Any, metric: str) -> None:
    """The card titled `metric` holds a Plotly line with points."""
    card = _card(page, metric)
    card.locator(".js-plotly-plot .scatterlayer path.js-line").first.wait_for()


def _stepped_image(page: Any, image_key: str) -> None:
    """The images card of `image_key` shows the image and a step slider; moving the slider to
    the last step shows the image logged at that step.

    MLflow 3.17 prints every run parameter above the image (the card's "Show run parameters"
    switch, on by default); with a full config logged as params that text pushes the image out
    of the card, so the check switches it off, as a person would, before looking."""
    card = _card(page, image_key)
    _hide_run_params(page, card)
    slider = card.get_by_role("slider").first
    slider.wait_for()
    last = int(slider.get_attribute("aria-valuemax"))
    step_box = card.locator("input[type='number']").first
    step_box.fill(str(last))
    step_box.blur()  # the slider's number box applies its value on blur
    logged = quote(f"images/{image_key.replace('/', '~')}+step+{last}+", safe="")
    image = card.locator(f"img[src*='{logged}']").first
    image.wait_for()
    assert slider.get_attribute("aria-valuenow") == str(last), "the step slider did not move"
    loaded = "img => img.complete && img.naturalWidth > 0"
    page.wait_for_function(loaded, arg=image.element_handle())
    image_box, card_box = image.bounding_box(), card.bounding_box()
    assert image_box and image_box["height"] >= 32, f"the {image_key} image is not drawn"
    inside = card_box["y"] <= image_box["y"] < card_box["y"] + card_box["height"]
    assert inside, f"the {image_key} image lies outside its card"


def _hide_run_params(page: Any, card: Any) -> None:
    card.locator("[data-testid='experiment-view-compare-runs-card-menu']").click()
    page.get_by_role("menuitem").filter(has_text="Configure").first.click()
    switch = page.get_by_role("switch", name="Show run parameters")
    if switch.get_attribute("aria-checked") == "true":
        switch.click()
    page.get_by_role("button", name="Save changes").click()
    page.get_by_role("dialog").wait_for(state="hidden")
