"""The dashboard in a real browser (Debian's Chromium through Playwright) against a real gateway and worker:
upload a batch, watch its progress bar reach 100%, download the output, see the live charts drawn from
heartbeats, and the admin page refusing without the admin key and listing workers with it. Screenshots
of every page land in test-artifacts/."""
from __future__ import annotations

import json
import time

import pytest

from batch_files import chat_line, write_jsonl
from browser import chromium, screenshot
from stack import GatewayThread, gateway_settings

ADMIN_KEY = "admin-test-key"


@pytest.fixture(scope="module")
def site(database_url, broker_url, files_dir, start_worker):
    start_worker("w-dash").wait_registered()
    g = GatewayThread(gateway_settings(database_url, broker_url=broker_url, files_dir=files_dir,
                                       admin_key=ADMIN_KEY)).start()
    g.wait_for_workers(1)
    yield g
    g.stop()


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser, site):
    context = browser.new_context(viewport={"width": 1366, "height": 900}, accept_downloads=True,
                                  base_url=site.url)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    page.problems = problems  # a test that provokes an error on purpose takes it out
    yield page
    context.close()
    assert problems == [], problems


def test_upload_watch_progress_reach_100_and_download_output(page, tmp_path):
    lines = [chat_line(f"ui-{i}", max_tokens=6) for i in range(30)]
    path = write_jsonl(tmp_path / "dashboard-batch.jsonl", lines)
    page.goto("/ui/jobs")
    assert page.get_by_label("Batch input file (JSONL: one request per line)").is_visible()
    page.get_by_label("Batch input file (JSONL: one request per line)").set_input_files(str(path))
    page.get_by_role("button", name="Upload and start").click()
    page.get_by_role("status").get_by_text("is validating").wait_for()
    assert page.locator("#upload-progress").get_attribute("value") == "100"
    row = page.locator("tr", has_text="dashboard-batch.jsonl").first
    row.wait_for()
    screenshot(page, "jobs-running")
    # htmx polling moves the bar without a reload.
    row.locator("text=100%").wait_for(timeout=60_000)
    row.locator(".badge.completed").wait_for(timeout=30_000)
    assert row.locator("progress").get_attribute("value") == "100.0"
    assert "30 / 30" in row.inner_text()
    screenshot(page, "jobs-completed")

    with page.expect_download() as download:
        row.get_by_role("link", name="output").click()
    results = [json.loads(line) for line in open(download.value.path()).read().splitlines()]
    assert sorted(r["custom_id"] for r in results) == sorted(line["custom_id"] for line in lines)

    row.get_by_role("link", name=row.locator("a").first.inner_text()).click()
    page.get_by_role("heading", name="Progress over time").wait_for()
    assert page.locator("svg.chart").count() == 1
    assert "w-dash" in page.inner_text("main")
    screenshot(page, "job-detail")


def test_failed_validation_shows_errors_with_line_numbers(page, tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", [chat_line("a"), "{not json", chat_line("a")])
    page.goto("/ui/jobs")
    page.get_by_label("Batch input file (JSONL: one request per line)").set_input_files(str(path))
    page.get_by_role("button", name="Upload and start").click()
    row = page.locator("tr", has_text="broken.jsonl").first
    row.locator(".badge.failed").wait_for(timeout=20_000)
    row.locator("a").first.click()
    errors = page.get_by_role("table", name="Errors")
    errors.wait_for()
    text = errors.inner_text()
    assert "invalid_json_line" in text and "duplicate_custom_id" in text
    assert [c.inner_text() for c in errors.locator("tbody tr td:first-child").all()][:2] == ["2", "3"]
    screenshot(page, "job-failed-validation")


def test_live_charts_render_with_data(page, site):
    # Some online traffic, so the latency charts have points (heartbeats every 0.5 s here).
    import openai

    client = openai.OpenAI(base_url=f"{site.url}/v1", api_key="x", max_retries=0)
    for _ in range(4):
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hello"}],
                                       max_tokens=8, extra_body={"ignore_eos": True})
    page.wait_for_timeout(1500)
    page.goto("/ui/live?minutes=5")
    charts = page.locator("svg.chart")
    assert charts.count() == 4
    titles = " ".join(charts.nth(i).get_attribute("aria-label") or "" for i in range(4))
    for title in ("time to first token", "time per output token", "tokens per second"):
        assert title in titles.lower()
    ttft = charts.nth(0)
    assert ttft.locator("text=no data yet").count() == 0
    assert ttft.locator("polyline, path").count() >= 1
    assert "SLO 1000 ms" in ttft.inner_html()
    screenshot(page, "live")


def test_admin_page_refuses_without_the_key_and_lists_workers_with_it(page, site):
    response = page.goto("/ui/admin")
    assert response.status == 401
    assert "admin key" in page.inner_text("main").lower()
    assert page.locator("[data-worker]").count() == 0
    screenshot(page, "admin-refused")

    page.get_by_label("Admin key").fill("wrong")
    page.get_by_role("button", name="Save keys in this browser").click()
    assert page.locator("[data-worker]").count() == 0

    # The refusals above were the point; nothing else may have gone wrong.
    page.problems[:] = [p for p in page.problems if "status of 401" not in p]
    page.goto("/ui/login?next=/ui/admin")
    page.get_by_label("Admin key").fill(ADMIN_KEY)
    page.get_by_role("button", name="Save keys in this browser").click()
    page.wait_for_url("**/ui/admin")
    row = page.locator("[data-worker='w-dash']")
    row.wait_for()
    assert "alive" in row.inner_text() and "cpu" in row.inner_text()
    screenshot(page, "admin")


def test_playground_answers_a_chat(page):
    page.goto("/ui/playground")
    page.get_by_label("Message").fill("hello world")
    page.get_by_label("Max tokens").fill("5")
    page.get_by_role("button", name="Send").click()
    page.locator("#answer .card").wait_for()
    assert "tiny-chat" in page.inner_text("#answer")
    screenshot(page, "playground")


def test_admin_json_needs_the_admin_key(site):
    import httpx

    url = f"{site.url}/admin/api/workers"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"authorization": "Bearer wrong"}).status_code == 401
    api_key_only = httpx.get(url, cookies={"conserve_key": "whatever"})
    assert api_key_only.status_code == 401 and set(api_key_only.json()["error"]) == {"message", "type", "param", "code"}
    # The worker's first stats sample comes with a heartbeat (every 2 s), which a fresh site may not have had.
    deadline = time.monotonic() + 10
    while True:
        ok = httpx.get(url, headers={"authorization": f"Bearer {ADMIN_KEY}"})
        assert ok.status_code == 200
        [worker] = [w for w in ok.json()["data"] if w["id"] == "w-dash"]
        if worker["latest"] is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert worker["alive"] and worker["device"] == "cpu" and "kv_usage" in (worker["latest"] or {})


def test_cancel_button_stops_a_running_batch(page, tmp_path):
    lines = [chat_line(f"long-{i}", max_tokens=200) for i in range(300)]
    path = write_jsonl(tmp_path / "long-batch.jsonl", lines)
    page.goto("/ui/jobs")
    page.get_by_label("Batch input file (JSONL: one request per line)").set_input_files(str(path))
    page.get_by_role("button", name="Upload and start").click()
    row = page.locator("tr", has_text="long-batch.jsonl").first
    row.locator(".badge.in_progress").wait_for(timeout=20_000)
    page.once("dialog", lambda dialog: dialog.accept())  # hx-confirm asks first
    row.get_by_role("button", name="Cancel").click()
    row.locator(".badge.cancelled").wait_for(timeout=20_000)
    assert row.get_by_role("button", name="Cancel").count() == 0
    done, total = row.locator("td.num").first.inner_text().split(" / ")
    assert total == "300" and int(done) == 300  # every request ended: finished, or closed as cancelled
    screenshot(page, "jobs-cancelled")
