"""The dashboard at /ui in headless Chromium (Debian's `chromium`, driven by Playwright), against uvicorn, a real
Celery worker and the real Redis, with real merge jobs on tiny OpenCLIP models. Each page is screenshotted into
$MERGELINE_SCREENSHOTS (default tests/.artifacts/ui) for a look by eye."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import httpx
import pytest
from svc_procs import Proc, start_api, start_worker
from test_service_e2e import make_inputs, spec, task

from service.client import MergelineClient

pytestmark = pytest.mark.e2e
TOKENS = "tok-acme=acme,tok-globex=globex"
SHOTS = Path(os.environ.get("MERGELINE_SCREENSHOTS") or Path(__file__).resolve().parents[1] / ".artifacts" / "ui")
WIDE = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
CHROMIUM = os.environ.get("MERGELINE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def cluster(redis_db, tmp_path_factory):
    """The API and one worker over a file store; lineage `vision` built by two merge jobs of tenant acme."""
    logs = tmp_path_factory.mktemp("ui-logs")
    inputs = make_inputs(tmp_path_factory.mktemp("ui-inputs"))
    prefix = f"ui{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "MERGELINE_BROKER_URL": redis_db, "MERGELINE_KEY_PREFIX": prefix, "MERGELINE_QUEUE": prefix,
           "MERGELINE_API_TOKENS": TOKENS, "MERGELINE_STORE": (tmp_path_factory.mktemp("ui-store")).as_uri(),
           "MERGELINE_ALLOWED_ROOTS": str(inputs["root"]), "MERGELINE_DEVICE": "cpu",
           "MERGELINE_CACHE_DIR": str(tmp_path_factory.mktemp("ui-cache")),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs: list[Proc] = []
    try:
        api, url = start_api(env, logs)
        procs.append(api)
        procs.append(start_worker(env, logs, "ui-worker"))
        with MergelineClient(url, "tok-acme") as acme:
            for body in (spec(inputs, "vision", [task(inputs, 0), task(inputs, 1)], method="task_arithmetic"),
                         spec(inputs, "vision", [task(inputs, 2)], method="task_arithmetic", with_base=False)):
                done = acme.wait(acme.submit(body)["id"], timeout=180, poll=0.2)
                assert done["status"] == "succeeded", done["error"]
        yield {"url": url, "inputs": inputs}
    finally:
        for proc in reversed(procs):
            proc.stop()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM:
        pytest.skip("no chromium: apt-get install chromium (or set MERGELINE_CHROMIUM)")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def acme(cluster):
    with MergelineClient(cluster["url"], "tok-acme") as client:
        yield client


def open_page(browser, viewport=WIDE):
    context = browser.new_context(viewport=viewport, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    return page


def sign_in(page, url: str, token: str, path: str = "/ui"):
    page.goto(f"{url}{path}")
    page.wait_for_url(re.compile(r"/ui/signin\?next="))
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(re.escape(path) + r"$"))


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def wait_for(page, check, timeout: float = 30.0) -> None:
    """Poll `check` from Python (the pages' CSP forbids the string evaluation that wait_for_function uses)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        page.wait_for_timeout(100)


def pct(x: float) -> str:
    """As the page writes it (JavaScript's toFixed rounds halves up)."""
    return f"{math.floor(x * 1000 + 0.5) / 10:.1f}%"


def test_sign_in_refuses_a_wrong_token_and_keeps_the_right_one_in_the_tab_only(cluster, browser):
    page = open_page(browser)
    page.goto(f"{cluster['url']}/ui/jobs")
    page.wait_for_url(re.compile(r"/ui/signin\?next=%2Fui%2Fjobs"))
    assert "Sign in to see this page" in page.inner_text("#alert")
    page.fill("#token", "not-a-token")
    page.click("button[type=submit]")
    page.wait_for_selector("#alert >> text=That token was not accepted")
    shot(page, "signin-refused")
    assert page.evaluate("sessionStorage.length") == 0

    page.fill("#token", "tok-acme")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/ui/jobs$"))
    page.wait_for_selector("#jobs tbody tr")
    assert page.evaluate("sessionStorage.getItem('mergeline.token')") == "tok-acme"
    assert page.evaluate("localStorage.length") == 0 and page.context.cookies() == []
    assert "tok-acme" not in page.url

    page.evaluate("sessionStorage.setItem('mergeline.token', 'revoked')")  # a token the API no longer knows
    page.goto(f"{cluster['url']}/ui")
    page.wait_for_selector("#alert >> text=Your API token was not accepted")
    assert page.is_hidden("#lineages") and page.evaluate("sessionStorage.length") == 0
    page.context.close()


def test_lineages_list_is_searchable(cluster, browser, acme):
    page = open_page(browser)
    sign_in(page, cluster["url"], "tok-acme")
    row = page.wait_for_selector("#lineages tbody tr")
    head = acme.lineage("vision")["versions"][-1]
    cells = [c.inner_text() for c in row.query_selector_all("td")]
    assert cells[:4] == ["vision", "v2", "task0, task1, task2", pct(head["metrics"]["avg_accuracy"])]
    shot(page, "lineages")
    page.fill("#search", "nothing-like-this")
    assert page.is_hidden("#lineages") and "No lineage matches" in page.inner_text("#empty")
    page.fill("#search", "TASK2")
    assert page.is_visible("#lineages tbody tr")
    page.context.close()


def test_lineage_page_charts_accuracy_and_serves_versions(cluster, browser, acme):
    lineage = acme.lineage("vision")
    page = open_page(browser)
    sign_in(page, cluster["url"], "tok-acme")
    page.click("#lineages a >> text=vision")
    page.wait_for_selector("#chart svg")
    series = {g.get_attribute("data-series"): len(g.query_selector_all("circle"))
              for g in page.query_selector_all("#chart g.series")}
    assert series == {"task0": 2, "task1": 2, "task2": 1, "average": 2}, "each task from its first version on"
    page.click("text=Accuracy as a table")
    for name, row in [("average", [v["metrics"]["avg_accuracy"] for v in lineage["versions"]])]:
        cells = page.query_selector_all(f'#accuracy tr[data-series="{name}"] td')
        assert [c.inner_text() for c in cells] == [pct(x) for x in row]
    task0 = [c.inner_text() for c in page.query_selector_all('#accuracy tr[data-series="task0"] td')]
    assert task0 == [pct(v["metrics"]["tasks"]["task0"]["accuracy"]) for v in lineage["versions"]]
    assert [li.get_attribute("data-version") for li in page.query_selector_all("#versions > li")] == ["2", "1"]
    shot(page, "lineage")

    v1 = page.locator('#versions > li[data-version="1"]')
    v1.locator("summary", has_text="Inputs").click()
    v1.locator("details.inputs dl").wait_for()
    assert lineage["versions"][0]["tasks"][0]["sha256"] in v1.locator("details.inputs").inner_text()
    v1.locator("summary", has_text="Manifest").click()
    manifest = json.loads(v1.locator("details.manifest pre").inner_text())
    assert manifest == lineage["versions"][0]
    entry = manifest["files"][0]
    with page.expect_download() as info:
        v1.locator(f'button[data-file="{entry["path"]}"]').click()
    assert hashlib.sha256(Path(info.value.path()).read_bytes()).hexdigest() == entry["sha256"]
    page.context.close()

    phone = open_page(browser, PHONE)
    sign_in(phone, cluster["url"], "tok-acme", "/ui/lineages/vision")
    phone.wait_for_selector("#chart svg")
    assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], "no sideways scrolling"
    shot(phone, "lineage-phone")
    phone.context.close()


def test_job_page_follows_a_running_job_live_and_cancels_it(cluster, browser, acme):
    inputs = cluster["inputs"]
    job = acme.submit(spec(inputs, "slow", [task(inputs, 0), task(inputs, 1)], steps=20_000))  # runs till cancelled
    try:
        page = open_page(browser)
        sign_in(page, cluster["url"], "tok-acme", f"/ui/jobs/{job['id']}")
        page.evaluate("window.stillTheSamePage = true")
        step = page.locator("#progress-text")
        shown_step = lambda: int(step.get_attribute("data-step") or 0)  # noqa: E731
        wait_for(page, lambda: "task 2/2" in step.inner_text() and shown_step() >= 2, timeout=120)
        first = shown_step()
        wait_for(page, lambda: shown_step() > first + 2 and "ETA –" not in step.inner_text())
        shown = r"task 2/2 · step \d+/20000 · pre [\d.e+-]+\s+post [\d.e+-]+ · ETA [\d.]+ (s|min|h)"  # both objectives
        assert re.search(shown, step.inner_text()), step.inner_text()
        assert page.evaluate("window.stillTheSamePage"), "progress moved without a reload"
        assert page.inner_text("#status") == "running" and "(live)" in page.inner_text("#live")
        page.wait_for_selector('#events li[data-type="task_started"]')
        shot(page, "job-running")

        page.focus("#cancel")
        page.keyboard.press("Enter")
        page.wait_for_selector("#status.cancelled", timeout=60_000)
        assert acme.get(job["id"])["status"] == "cancelled"
        page.wait_for_selector('#events li[data-type="cancelled"]')
        assert page.is_hidden("#cancel") and page.inner_text("#live") == ""
    finally:  # never leave the worker busy for the tests after this one
        if acme.get(job["id"])["status"] not in ("succeeded", "failed", "cancelled"):
            acme.cancel(job["id"])
    page.context.close()


def test_failed_job_shows_its_error_and_the_failing_field(cluster, browser, acme):
    inputs = cluster["inputs"]
    job = acme.submit(spec(inputs, "no-base-yet", [task(inputs, 0)], method="task_arithmetic", with_base=False))
    final = acme.wait(job["id"], timeout=120, poll=0.2)
    assert final["status"] == "failed"
    page = open_page(browser)
    sign_in(page, cluster["url"], "tok-acme", "/ui/jobs?status=failed")
    page.click(f"text={job['id']}")
    page.wait_for_selector("#error-box:not([hidden])")
    shown = dict(zip(page.locator("#error dt").all_inner_texts(), page.locator("#error dd").all_inner_texts(),
                     strict=True))
    assert shown == {"type": final["error"]["type"], "message": final["error"]["message"], "failing field": "base"}
    page.wait_for_selector('#events li[data-type="failed"]')
    shot(page, "job-failed")
    page.context.close()


def test_jobs_list_filters_by_status_and_works_from_the_keyboard(cluster, browser, acme):
    page = open_page(browser)
    sign_in(page, cluster["url"], "tok-acme", "/ui/jobs")
    page.wait_for_selector("#jobs tbody tr")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    for _ in range(3):
        page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Jobs"
    shot(page, "jobs")
    succeeded = page.locator(".filters a", has_text="Succeeded")
    succeeded.focus()
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"status=succeeded"))
    page.wait_for_selector("#jobs tbody tr")
    shown = page.locator("#jobs tbody tr").evaluate_all("rows => rows.map(r => r.dataset.job)")
    assert shown == [j["id"] for j in acme.list(status="succeeded", limit=50)["data"]] and len(shown) >= 2
    assert page.locator('.filters a[aria-current="true"]').inner_text() == "Succeeded"
    page.context.close()


def test_submit_shows_the_apis_own_errors_then_submits(cluster, browser, tmp_path):
    inputs = cluster["inputs"]
    bad = spec(inputs, "Not A Name", [task(inputs, 0)], method="task_arithmetic")
    expected = httpx.post(f"{cluster['url']}/v1/jobs", json=bad,
                          headers={"Authorization": "Bearer tok-acme"}).json()["error"]
    page = open_page(browser)
    sign_in(page, cluster["url"], "tok-acme", "/ui/submit")
    page.fill("#spec", json.dumps(bad, indent=2))
    page.click("button[type=submit]")
    page.wait_for_selector("#submit-error:not([hidden])")
    shown = dict(zip(page.locator("#submit-error dt").all_inner_texts(),
                     page.locator("#submit-error dd").all_inner_texts(), strict=True))
    assert shown == {"status": "422", "type": expected["type"], "message": expected["message"],
                     "field": expected["param"]}
    shot(page, "submit-refused")

    good = tmp_path / "job.json"
    good.write_text(json.dumps(spec(inputs, "from-the-ui", [task(inputs, 0)], method="task_arithmetic")))
    page.set_input_files("#spec-file", str(good))
    wait_for(page, lambda: "from-the-ui" in page.input_value("#spec"))
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r"/ui/jobs/job_"))
    page.wait_for_selector("#status.succeeded", timeout=120_000)
    page.context.close()


def test_another_tenant_sees_none_of_it(cluster, browser, acme):
    job = acme.list(lineage="vision", limit=1)["data"][0]
    page = open_page(browser)
    sign_in(page, cluster["url"], "tok-globex")
    page.wait_for_selector("#empty:not([hidden])")
    assert "No lineages yet" in page.inner_text("#empty") and page.is_hidden("#lineages")
    for path in ("/ui/lineages/vision", f"/ui/jobs/{job['id']}"):
        page.goto(f"{cluster['url']}{path}")
        page.wait_for_selector("#alert:not([hidden])")
        assert page.inner_text("#alert").startswith("Not found:")
        assert page.is_hidden("#lineage, #job") and "task0" not in page.content()
    shot(page, "other-tenant")
    page.goto(f"{cluster['url']}/ui/jobs")
    page.wait_for_selector("#empty:not([hidden])")
    assert page.locator("#jobs tbody tr").count() == 0
    page.context.close()


def test_ui_pages_are_outside_the_api_schema_and_send_a_strict_csp(cluster):
    schema = httpx.get(f"{cluster['url']}/openapi.json").json()
    assert not [p for p in schema["paths"] if p.startswith("/ui")]
    page = httpx.get(f"{cluster['url']}/ui")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    assert "<script>" not in page.text, "no inline script: the CSP forbids it"
    assert httpx.get(f"{cluster['url']}/ui/static/ui.js").headers["content-type"].startswith("text/javascript")
    assert httpx.get(f"{cluster['url']}/ui/static/..%2Fapp.py").status_code == 404



def test_every_page_and_static_file_is_package_data():
    """The wheel ships the templates and static files (pyproject's package-data names them by pattern)."""
    import fnmatch
    import tomllib

    import service.ui

    root = Path(service.ui.__file__).parent
    patterns = tomllib.loads((root.parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
             and p.suffix != ".py"]
    assert files and all(any(fnmatch.fnmatch(f, pat) for pat in patterns["service.ui"]) for f in files), files
