"""The dashboard in a real browser: Debian's Chromium driven by Playwright against the real service.

`modelpress run` (API + a real Celery worker, embedded deployment) on a free port; a key made with
`modelpress keys create`; then, as a user would in the browser: sign in, upload a model with the
progress bar, start a quantize.int8_dynamic job from the form built from the methods' JSON Schemas,
watch the jobs list until it succeeds (no reload), open the report, read its charts, download the
compressed model and check its sha256. Screenshots go to the test's own folder; with MODELPRESS_SAVE_SCREENS=1 they
replace the README's in bench/screens (a run of the suite leaves the tracked files as they are).

With CI=true a missing Chromium or Playwright fails the test; elsewhere it skips and says why
(`make test` installs Chromium through scripts/services.sh).
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import ROOT, SHARED_MODELS, mlp_onnx_bytes
from tests.stack import BIN, base_env, free_port, logs, modelpress, processes, wait_ready


@pytest.fixture
def screens(tmp_path) -> Path:
    """Where the screenshots go: bench/screens (tracked, the README shows them) only when asked for."""
    return ROOT / "bench" / "screens" if os.environ.get("MODELPRESS_SAVE_SCREENS") == "1" else tmp_path


JOB_TIMEOUT_S = 150


@pytest.fixture
def service(tmp_path):
    """The embedded deployment on real processes, and an API key made with the documented CLI."""
    data_dir = tmp_path / "mp"
    port = free_port()
    env = base_env(data_dir)
    with processes([str(BIN / "modelpress"), "run", "--port", str(port)], env=env, log_dir=tmp_path) as procs:
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base, procs)
            created = modelpress("keys", "create", "--tenant", "dashboard", env=env).stdout
            key = re.search(r"api key: (\S+)", created).group(1)
            yield {"base": base, "key": key}
        except BaseException:
            print(logs(tmp_path))
            raise


def _model_file(tmp_path: Path) -> Path:
    yolox = SHARED_MODELS / "yolox-nano" / "yolox_nano.onnx"
    if yolox.is_file():
        return yolox
    path = tmp_path / "mlp.onnx"
    path.write_bytes(mlp_onnx_bytes())
    return path


def _texts(page, selector: str) -> list[str]:
    return page.locator(selector).all_text_contents()


def test_dashboard_is_served_by_the_app_alone(client):
    """GET /ui needs no key; every asset it loads comes from the app; nothing points at another origin."""
    from app.ui import STATIC_DIR

    page = client.get("/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/ui/").status_code == 200
    assets = re.findall(r'<(?:link|script|img)\b[^>]*?(?:src|href)="([^"]+)"', page.text)
    assert "/ui/static/js/app.js" in assets and "/ui/static/app.css" in assets
    for asset in assets:
        assert asset.startswith("/ui/static/"), asset
        assert client.get(asset).status_code == 200, asset
    sources = [p for p in STATIC_DIR.rglob("*") if p.suffix in {".html", ".css", ".js", ".svg"}]
    for source in sources:
        text = source.read_text()
        # The SVG namespace is a name, not a fetch.
        urls = [u for u in re.findall(r"https?://[^\s\"'`)]+", text) if u != "http://www.w3.org/2000/svg"]
        assert not urls, (source.name, urls)
        for module in re.findall(r'^import .* from "(\.{1,2}/[^"]+)";', text, flags=re.M):
            target = (source.parent / module).resolve()
            assert target.is_file(), (source.name, module)
            assert client.get("/ui/static/" + target.relative_to(STATIC_DIR).as_posix()).status_code == 200
    # The page is not an API route: no key, and not in the OpenAPI document.
    assert not [p for p in client.get("/openapi.json").json()["paths"] if p.startswith("/ui")]


@pytest.mark.integration
def test_dashboard_upload_compress_watch_report_download(browser, service, tmp_path, screens):
    base, key = service["base"], service["key"]
    api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    model_path = _model_file(tmp_path)

    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True, reduced_motion="reduce")
    page = context.new_page()
    problems: list[str] = []
    foreign: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    # Every asset comes from the app itself: no CDN, no external font.
    page.on("request", lambda req: foreign.append(req.url)
            if not req.url.startswith((base, "data:", "blob:")) else None)

    # Sign in: the page asks for a key and keeps it in sessionStorage only.
    page.goto(f"{base}/ui")
    page.wait_for_selector("#api-key")
    assert "#/signin" in page.url
    page.fill("#api-key", "mp_not-a-key")
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#signin-form .error")
    assert "not valid" in page.inner_text("#signin-form .error")
    problems.clear()  # the browser logs the refused key's 401
    page.fill("#api-key", key)
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#jobs-table")
    assert page.evaluate("sessionStorage.getItem('modelpress.apiKey')") == key
    assert page.evaluate("localStorage.length") == 0

    # Upload with a progress bar (XMLHttpRequest upload events).
    page.click("nav >> text=Upload")
    page.wait_for_selector("#model-file")
    page.evaluate("""() => {
        window.__uploadProgress = [];
        const bar = document.querySelector('#model-form [role=progressbar]');
        new MutationObserver(() => window.__uploadProgress.push(Number(bar.getAttribute('aria-valuenow'))))
            .observe(bar, {attributes: true, attributeFilter: ['aria-valuenow']});
    }""")
    page.set_input_files("#model-file", str(model_path))
    page.click("#model-upload")
    page.wait_for_selector("#model-result [data-model-id]", timeout=60_000)
    model_id = page.get_attribute("#model-result [data-model-id]", "data-model-id")
    progress = page.evaluate("window.__uploadProgress")
    assert progress and progress[-1] == 100, progress
    assert page.get_attribute("#model-form [role=progressbar]", "aria-valuenow") == "100"
    assert "uploaded and checked" in page.inner_text("#model-form .upload-progress")
    uploaded = api.get(f"/v1/models/{model_id}").json()
    assert uploaded["sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()

    # Start a job from the form generated from GET /v1/methods and the EvaluateSpec schema.
    page.click("#compress-uploaded")
    page.wait_for_selector("#job-form")
    assert page.input_value("#job-model") == model_id
    assert page.is_checked("#mode-goal") and page.is_visible("#goal")  # a goal is offered first
    page.check("#mode-steps")
    page.select_option("#steps select.method-select", "quantize.int8_dynamic")
    # The params form follows the method's JSON Schema: an enum is a select, a boolean a checkbox.
    assert page.locator("select[name='step1.weight_type'] option").count() >= 3
    assert page.is_checked("input[name='step1.per_channel']")
    page.fill("#job-name", "dashboard test")
    page.fill("input[name='evaluate.batch_sizes']", "1")
    page.fill("input[name='evaluate.warmup']", "2")
    page.fill("input[name='evaluate.iterations']", "10")
    page.click("#start-job")
    page.wait_for_url(re.compile(r".*#/jobs\?new=.+"))
    job_id = page.url.split("new=")[1]
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["name"] == "dashboard test" and job["model_id"] == model_id
    assert [s["method"] for s in job["steps"]] == ["quantize.int8_dynamic"]
    assert job["evaluate"]["batch_sizes"] == [1] and job["evaluate"]["iterations"] == 10

    # A second tab on the job's own page (the key is per tab: it signs in, then goes where it was sent).
    job_tab = context.new_page()
    job_tab.on("pageerror", lambda exc: problems.append(f"job tab: page error: {exc}"))
    job_tab.goto(f"{base}/ui#/jobs/{job_id}")
    job_tab.wait_for_selector("#api-key")
    job_tab.fill("#api-key", key)
    job_tab.click("#signin-form button[type=submit]")
    job_tab.wait_for_selector("#job-status[data-first-status]")

    # The jobs list follows the job to the end without a reload.
    page.evaluate("window.__sameDocument = true")
    row = f"#jobs-table tr[data-job-id='{job_id}']"
    page.wait_for_selector(row)
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        state = (page.get_attribute(row, "data-status"), page.get_attribute(f"{row} [role=progressbar]", "aria-valuenow"))
        if not seen or seen[-1] != state:
            seen.append(state)
        if state[0] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.25)
    assert seen[-1] == ("succeeded", "100"), (seen, api.get(f"/v1/jobs/{job_id}").json())
    assert seen[0][0] in ("queued", "running"), seen  # it was seen before it finished, then updated in place
    assert page.evaluate("window.__sameDocument") is True
    assert "succeeded" in page.inner_text(f"{row} .badge")
    screens.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(screens / "jobs-list.png"), full_page=True)

    # The job tab followed the job live: events streamed with fetch (text/event-stream), then the report.
    job_tab.wait_for_selector("#report[data-ready=true]", timeout=30_000)
    card = job_tab.locator("#job-status")
    if card.get_attribute("data-first-status") in ("queued", "running"):
        assert card.get_attribute("data-live") == "stream"
        assert int(card.get_attribute("data-streamed") or 0) >= 1
    assert "succeeded" in job_tab.inner_text(".badge")
    job_tab.close()

    # The report page: charts with their labels, the figures the API reports.
    job = api.get(f"/v1/jobs/{job_id}").json()
    report = api.get(f"/v1/jobs/{job_id}/report").json()
    summary = job["summary"]
    page.click(f"{row} a.job-link")
    page.wait_for_selector("#report[data-ready=true]", timeout=30_000)
    latency = page.locator("#latency-chart svg")
    assert latency.count() == 1
    latency_text = " ".join(_texts(page, "#latency-chart svg text"))
    for label in ("original", "compressed", "orig.", "comp.", "batch 1", "p50 latency (ms"):
        assert label in latency_text, (label, latency_text)
    p50 = report["measurement"]["latency"]["batch_sizes"][0]
    assert len(page.locator("#latency-chart svg .bars rect[fill^='url(#']").all()) == 1  # compressed: hatched
    value_labels = _texts(page, "#latency-chart .value-label")
    assert len(value_labels) == 2 and all(re.fullmatch(r"[\d.,]+", v) for v in value_labels), value_labels
    shown = [float(v.replace(",", "")) for v in value_labels]
    assert shown == [pytest.approx(p50["baseline"]["p50_ms"], rel=0.01), pytest.approx(p50["result"]["p50_ms"], rel=0.01)]
    ci_text = summary["speedup_ci"]["1"]
    assert ci_text in " ".join(_texts(page, "#speedup-chart svg text"))  # "1.83x (1.79-1.88)"
    assert ci_text in latency_text
    assert "no change" in page.inner_text("#speedup-chart")
    size_text = " ".join(_texts(page, "#size-chart svg text"))
    assert "×" + str(report["measurement"]["size"]["ratio"]) in size_text
    if summary["energy_j_per_inference"] is None:
        assert summary["energy_note"] in page.inner_text("#energy-null")
    else:
        assert page.locator("#energy-chart svg").count() == 1
    assert "cosine" in page.inner_text("#quality")
    # The report leads with the verdict and its reason; the Pareto front is a table and a chart readable without
    # colour (filled / hollow markers, a star on the front, every point named).
    verdict = summary["verdict"]
    assert page.locator("#report > section").first.get_attribute("id") == "verdict"
    assert page.get_attribute("#verdict", "data-verdict") == verdict["verdict"]
    assert verdict["reason"] in page.inner_text("#verdict .verdict-reason")
    assert page.locator("#verdict-checks tbody tr").count() == len(verdict["checks"])
    names = [p["name"] for p in report["pareto"]]
    assert _texts(page, "#pareto-table tbody td:first-child") == names
    assert page.locator("#pareto-chart svg g.point").count() == len(names)
    chart_text = " ".join(_texts(page, "#pareto-chart svg text"))
    assert all(name in chart_text for name in names) and "Pareto front" in chart_text and "★" in chart_text
    events = api.get(f"/v1/jobs/{job_id}/events").json()
    assert page.locator("#events tbody tr").count() == len(events)
    assert page.inner_text("#events tbody tr:last-child").count("succeeded") >= 1
    page.screenshot(path=str(screens / "report.png"), full_page=True)

    # Download: fetched with the Authorization header, saved through an object URL.
    artifacts = {a["name"]: a for a in api.get(f"/v1/jobs/{job_id}/artifacts").json()}
    assert page.locator("#artifacts button.download").count() == len(artifacts)
    with page.expect_download() as download_info:
        page.click("#artifacts button[data-artifact='model.onnx']")
    download = download_info.value
    assert download.suggested_filename == "model.onnx"
    saved = Path(download.path()).read_bytes()
    assert hashlib.sha256(saved).hexdigest() == artifacts["model.onnx"]["sha256"]
    page.wait_for_selector("#artifacts [data-artifact-row='model.onnx'] .download-status:has-text('sha256 verified')")

    # The model page charts its measurements across jobs.
    page.goto(f"{base}/ui#/models/{model_id}")
    page.wait_for_selector("#model-measurements figure[data-metric='p50_ms'] svg")
    p50_chart = " ".join(_texts(page, "#model-measurements figure[data-metric='p50_ms'] svg text"))
    assert "batch 1" in p50_chart and "job (oldest first)" in p50_chart

    _goal_from_the_form(page, api, base, tmp_path, screens)
    assert not foreign, foreign
    assert not problems, problems
    context.close()


def _goal_from_the_form(page, api: httpx.Client, base: str, tmp_path: Path, screens: Path) -> None:
    """A goal from the form built from GoalSpec (families as checkboxes, datasets by role from the uploads); the job
    page leads with the verdict, then the search and every candidate with its download."""
    mlp = api.post("/v1/models", files={"file": ("mlp.onnx", mlp_onnx_bytes())}).json()["id"]
    page.goto(f"{base}/ui#/jobs/new?model={mlp}")
    page.wait_for_selector("#goal input[name='goal.time_budget_s']")
    assert page.is_checked("#mode-goal") and page.is_disabled("#job-target")
    assert not page.is_visible("input[name='evaluate.min_cosine']")  # a steps job's budget: the goal has its own
    assert page.input_value("input[name='goal.min_cosine']") == "0.99"
    assert page.locator("input[name='goal.families']").count() >= 5
    assert page.locator("select[name='goal.datasets.calibration_dataset_id']").count() == 1
    page.check("input[name='goal.families'][value='quantize']")
    page.fill("input[name='goal.time_budget_s']", "60")
    page.fill("#job-name", "dashboard goal")
    page.screenshot(path=str(screens / "new-job-goal.png"), full_page=True)
    page.click("#start-job")
    page.wait_for_url(re.compile(r".*#/jobs\?new=.+"))
    job_id = page.url.split("new=")[1]
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["steps"] == [] and job["target"] is None
    assert job["goal"]["families"] == ["quantize"] and job["goal"]["time_budget_s"] == 60
    assert job["goal"]["min_cosine"] == 0.99 and job["goal"]["objective"] == "latency"

    page.goto(f"{base}/ui#/jobs/{job_id}")
    page.wait_for_selector("#report[data-ready=true]", timeout=JOB_TIMEOUT_S * 1000)
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    report = api.get(f"/v1/jobs/{job_id}/report").json()
    search = report["search"]
    assert [s.get_attribute("id") for s in page.locator("#report > section").all()[:2]] == ["verdict", "search"]
    assert page.get_attribute("#verdict", "data-verdict") == report["verdict"]["verdict"]
    facts = page.inner_text("#search dl")
    assert "of the 60 s budget" in facts
    assert (search["result_artifact"] in facts) if search["result_artifact"] else (search["closest"] in facts)
    rows = page.locator("#candidates-table tbody tr")
    assert rows.evaluate_all("rows => rows.map(r => r.dataset.candidate)") == [c["name"] for c in report["candidates"]]
    for candidate in report["candidates"]:
        row = page.inner_text(f"#candidates-table tr[data-candidate='{candidate['name']}']")
        if candidate["status"] == "measured":
            assert candidate["summary"]["speedup_ci"]["1"] in row
    artifacts = {a["name"]: a for a in api.get(f"/v1/jobs/{job_id}/artifacts").json()}
    first = report["candidates"][0]["artifact"]
    with page.expect_download() as download_info:
        page.click(f"#candidates-table button[data-artifact='{first}']")
    saved = Path(download_info.value.path()).read_bytes()
    assert hashlib.sha256(saved).hexdigest() == artifacts[first]["sha256"]
    assert page.locator("#pareto-chart svg g.point").count() == len(report["pareto"])
    page.screenshot(path=str(screens / "goal-report.png"), full_page=True)
