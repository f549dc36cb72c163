"""The Dagster UI in a real browser, as a newcomer drives it: `scripts/dagster_ui.sh`, Debian's Chromium through
PyPI `playwright` (executable_path; never `playwright install`).

Checks that the asset graph renders, that a range embedded outside Dagster shows as materialized with no click,
that one partition launched by clicking succeeds, and that the check's pass and the readiness flag's flip are
visible. Screenshots go to a temp dir; WIKI_EMBED_SCREENSHOTS=docs writes the README's into docs/ instead.
"""

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from wiki_embeddings.core.readiness import read_flag
from wiki_embeddings.devtools import embedded_postgres
from wiki_embeddings_tests.integration.conftest import TEST_MODEL

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("WIKI_EMBED_CHROMIUM", "/usr/lib/chromium/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
FIRST = "00000000-00099999"
SECOND = "00100000-00199999"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/server_info", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _graphql(base: str, query: str) -> dict:
    request = urllib.request.Request(
        f"{base}/graphql", data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())["data"]


def _materialized(base: str, asset: str) -> bool:
    data = _graphql(
        base,
        f'{{ assetOrError(assetKey: {{path: ["{asset}"]}}) {{ ... on Asset {{ assetMaterializations(limit: 1) '
        "{ timestamp } } } }",
    )
    return bool((data["assetOrError"] or {}).get("assetMaterializations"))


def _wait_for(base: str, what: str, ready, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(1)


@pytest.mark.slow
def test_a_newcomer_drives_the_ui_in_a_real_browser(make_table, ollama, pg_url, pg_data_dir, tmp_path):
    # Fails, never skips, without the browser: scripts/test.sh installs Debian's chromium.
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: run scripts/test.sh (it installs Debian's chromium)"
    from playwright.sync_api import expect, sync_playwright

    shots = REPO / "docs" if os.environ.get("WIKI_EMBED_SCREENSHOTS") == "docs" else tmp_path / "shots"
    shots.mkdir(exist_ok=True)
    table = make_table()
    table.load([(i, f"first range chunk {i}") for i in range(1, 31)])
    table.load([(100_000 + i, f"second range chunk {i}") for i in range(1, 21)])
    table.backfill(id_min=100_000, id_max=199_999)  # embedded outside Dagster (the CLI's engine)

    home = tmp_path / "dagster_home"
    (home / ".nux").mkdir(parents=True)
    (home / ".nux" / "nux.yaml").write_text("seen: 1\n")  # else a "what's new" modal covers the page
    env_file = tmp_path / ".env.beta"
    env_file.write_text("WIKI_EMBEDDINGS_READY=false\n")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_")}
    env.update(
        DAGSTER_HOME=str(home),
        DAGSTER_PORT=str(port),
        DAGSTER_PG_URL=embedded_postgres.dagster_storage_url(pg_data_dir),
        WIKI_EMBED_PGDATA=str(pg_data_dir),
        DATABASE_URL=pg_url,
        WIKI_EMBED_TABLE=table.settings.table,
        EMBED_STOP_FILE=table.settings.stop_file,
        OLLAMA_URL=ollama.url,
        OLLAMA_MODEL=TEST_MODEL,
        WIKI_EMBEDDINGS_ENV_FILE=str(env_file),
        WIKI_EMBED_SENSOR_INTERVAL_SEC="5",
        DAGSTER_TELEMETRY_DISABLED="1",
    )
    log = (tmp_path / "ui.log").open("wb")
    ui = subprocess.Popen(
        ["bash", str(REPO / "scripts" / "dagster_ui.sh"), "--no-model"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    started = time.monotonic()
    try:
        while not _answers(base):
            assert ui.poll() is None, (tmp_path / "ui.log").read_text()[-3000:]
            assert time.monotonic() - started < 90, "the UI did not answer within 90 s"
            time.sleep(1)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.set_default_timeout(60_000)
            expect.set_options(timeout=60_000)  # waits on text, never on network idle (the UI polls every 2 s)

            # The graph renders: every asset of the group, the readiness flag included.
            page.goto(f"{base}/asset-groups/wiki_embeddings")
            for name in ("wiki_chunks", "missing_wiki_chunks", "wiki_chunk_embeddings", "embedding_coverage"):
                expect(page.get_by_text(name, exact=True).first).to_be_visible()
            expect(page.get_by_text("readiness", exact=True).first).to_be_visible()
            page.wait_for_timeout(1500)
            page.screenshot(path=str(shots / "dagster-graph.png"))

            # With no click: what is missing, coverage and the check are evaluated by themselves on a new instance
            # (so a launch never asks "upstream assets have not been materialized")...
            _wait_for(base, "missing_wiki_chunks materialized", lambda: _materialized(base, "missing_wiki_chunks"))
            # ...and the range embedded outside Dagster and the 98 empty ranges show as done.
            partitions = f"{base}/assets/wiki_chunk_embeddings?view=partitions"
            page.goto(partitions)
            expect(page.get_by_text("Materialized (99)")).to_be_visible(timeout=90_000)
            expect(page.get_by_text("Missing (1)")).to_be_visible()

            # Launch the missing range by clicking; no "upstream never materialized" question on the way.
            page.get_by_role("button", name="Materialize…").first.click()
            dialog = page.locator("[role=dialog]").filter(has_text="Partition selection").last
            expect(dialog).to_be_visible()
            dialog.locator("button", has_text=re.compile(r"^\s*Missing\s*$")).first.click()
            expect(dialog.get_by_text(re.compile(r"^1 partition$")).first).to_be_visible()
            page.screenshot(path=str(shots / "dagster-launch-backfill.png"))
            dialog.locator("button", has_text=re.compile(r"^\s*Launch")).last.click()
            expect(page.get_by_text("Materialized (100)")).to_be_visible(timeout=120_000)
            expect(page.get_by_text("Failed (0)")).to_be_visible()
            page.screenshot(path=str(shots / "dagster-partitions.png"))

            # The check passes by itself (coverage refreshed by the automation), and the flag flips.
            page.goto(f"{base}/assets/embedding_coverage?view=checks")
            expect(page.get_by_text("missing_is_zero").first).to_be_visible()
            expect(page.get_by_text("Passed").first).to_be_visible(timeout=120_000)
            page.goto(f"{base}/assets/embedding_coverage?view=checks&checkDetail=missing_is_zero")
            page.wait_for_timeout(1500)
            page.screenshot(path=str(shots / "dagster-check.png"))

            page.goto(f"{base}/assets/readiness?view=events")
            expect(page.get_by_text(re.compile("set WIKI_EMBEDDINGS_READY=true")).first).to_be_visible(timeout=90_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(shots / "dagster-readiness.png"))
            browser.close()
        assert read_flag(env_file) is True
        assert table.status()["missing"] == 0
        assert time.monotonic() - started < 180, "the browser test must stay under 3 minutes"
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait(5)
        log.close()
