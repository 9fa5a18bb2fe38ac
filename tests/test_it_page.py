"""The IT page in headless Chromium (Debian's chromium driven by Playwright): a study goes dead-letter while
the PACS is down, the page shows it, requeue is clicked there, and the page sees the study dispatched.
The screenshot is kept under test-artifacts/ (gitignored; CI keeps it as an artifact)."""

import json
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from node.synth import write_chest_ct
from tests.conftest import require
from tests.support.api import IT_PASSWORD, api_config, base_url
from tests.support.pipeline import events, lung_config, result_instances, send, status

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def test_it_page_requeue_dead_letter_then_dispatched(tmp_path, orthanc, node_factory, monkeypatch):
    chromium = require("chromium", "chromium")
    ct = write_chest_ct(tmp_path / "ct", slices=40, slice_thickness=5.0)
    node = node_factory({**lung_config(orthanc, max_attempts=1, backoff_initial_s=0.2),
                         "api": api_config(monkeypatch)})
    url = base_url(node)
    orthanc.stop()  # the destination refuses: the results go dead-letter
    send(node, ct.files)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_context(http_credentials={"username": "it", "password": IT_PASSWORD},
                                       viewport={"width": 1400, "height": 1000}).new_page()
            page.goto(url + "/")
            expect(page.locator("#who")).to_have_text("(it, admin)")
            study = page.locator(f'tr.study[data-uid="{ct.study_uid}"]')
            expect(study).to_be_visible(timeout=30_000)
            problem = page.locator('tr.problem[data-job="1"]')
            expect(problem.locator(".state")).to_have_text("dead-letter", timeout=90_000)
            expect(problem).to_contain_text("pacs")
            expect(study.locator(".job-state")).to_have_text("dead-letter")
            page.screenshot(path=str(ARTIFACTS / "it-page-dead-letter.png"), full_page=True)

            orthanc.start()
            problem.locator("button.requeue").click()
            expect(page.locator("#msg")).to_contain_text("job 1: requeued", timeout=10_000)
            expect(study.locator(".job-state")).to_have_text("dispatched", timeout=60_000)
            expect(page.locator("tr.problem")).to_have_count(0)
            expect(page.locator("tr.plugin[data-name=ct_lung]")).to_contain_text("dispatched=1")
            page.screenshot(path=str(ARTIFACTS / "it-page-dispatched.png"), full_page=True)

            # A radiologist's verdict on a finding, from the page.
            expect(page.locator("#alerts")).to_contain_text("none")
            study.locator("button.review").click()
            finding = page.locator('#review tr.finding[data-number="1"]')
            expect(finding).to_be_visible(timeout=10_000)
            finding.locator("button.accept").click()
            expect(page.locator("#msg")).to_contain_text("job 1 finding 1: accept recorded", timeout=10_000)
        finally:
            browser.close()
    assert result_instances(orthanc, ct.study_uid) == {"SEG": 1, "SR": 1}
    assert "state=dispatched" in status(node)
    [req] = events(node, "requeue")
    assert req["requested_by"] == "api:it"
    assert any(r["path"] == "/api/jobs/1/requeue" and r["user"] == "it" and r["status"] == 202
               for r in events(node, "api-access"))
    assert (ARTIFACTS / "it-page-dispatched.png").stat().st_size > 10_000
    monitor = json.loads(node.cli("monitor", "--config", str(node.config_path), "--json").stdout)
    assert [(f["model"], f["accept"]) for f in monitor["feedback"]] == [("ct_lung:1.0.0", 1)]
