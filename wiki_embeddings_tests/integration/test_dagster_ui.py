"""The definitions load as the UI loads them: `dagster definitions validate`, and the webserver on PostgreSQL."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from wiki_embeddings.devtools import embedded_postgres

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

QUERY = """
{
  repositoriesOrError {
    ... on RepositoryConnection {
      nodes {
        name
        location { name }
        jobs { name }
        schedules { name cronSchedule }
        sensors { name }
        assetNodes { assetKey { path } assetChecksOrError { ... on AssetChecks { checks { name } } } }
      }
    }
    ... on PythonError { message }
  }
}
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_")}
    env.update(extra)
    return env


def test_dagster_definitions_validate_passes(pg_url, pg_data_dir):
    # From the repo root with no DAGSTER_HOME, Dagster builds its temporary instance from ./dagster.yaml:
    # that file is checked too, on the session's PostgreSQL.
    proc = subprocess.run(
        [str(BIN / "dagster"), "definitions", "validate"],
        cwd=REPO,
        env=_env(DAGSTER_PG_URL=embedded_postgres.dagster_storage_url(pg_data_dir)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "All code locations passed validation" in proc.stdout + proc.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _post(url: str, query: str) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
def test_the_webserver_on_postgresql_lists_assets_check_jobs_schedule_and_sensor(pg_url, pg_data_dir, tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    storage_url = embedded_postgres.dagster_storage_url(pg_data_dir)  # the session server's `dagster` database
    port = _free_port()
    log = (tmp_path / "webserver.log").open("wb")
    proc = subprocess.Popen(
        [str(BIN / "dagster-webserver"), "-w", str(REPO / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO,
        env=_env(DAGSTER_HOME=str(home), DAGSTER_PG_URL=storage_url, DATABASE_URL=pg_url),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 50
        data = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "webserver.log").read_text()[-3000:]
            try:
                data = _post(f"{base}/graphql", QUERY)["data"]["repositoriesOrError"]
                if data.get("nodes"):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert data and data.get("nodes"), f"no repository loaded: {data}"
        [repo] = [r for r in data["nodes"] if r["location"]["name"] == "wiki_embeddings"]
        assets = {"/".join(a["assetKey"]["path"]) for a in repo["assetNodes"]}
        assert assets >= {
            "wiki_chunks",
            "missing_wiki_chunks",
            "wiki_chunk_embeddings",
            "wiki_chunk_embeddings_maintenance",
            "embedding_coverage",
        }
        checks = {c["name"] for a in repo["assetNodes"] for c in (a["assetChecksOrError"] or {}).get("checks", [])}
        assert "missing_is_zero" in checks
        jobs = {j["name"] for j in repo["jobs"]}
        assert jobs >= {"bootstrap_job", "maintenance_job", "coverage_job", "stop_job", "resume_job"}
        assert {(s["name"], s["cronSchedule"]) for s in repo["schedules"]} == {("maintenance_schedule", "0 * * * *")}
        assert {"readiness_sensor", "coverage_automation_sensor"} <= {s["name"] for s in repo["sensors"]}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()
