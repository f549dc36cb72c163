"""The runbook's preconditions on a machine that has nothing: a database and an embedding service.

- DATABASE_URL unset: the project's embedded PostgreSQL (pgvector included) is started and used.
- `--with-ollama` / `OLALA_START_OLLAMA=1`: when OLLAMA_URL does not answer, a local embedding service is
  started on a free port for this run (`ollama serve` when an `ollama` binary exists, else the project's
  own Ollama-protocol server with the real all-MiniLM-L6-v2 model) and stopped when the run ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from wiki_embeddings.core.embedders import OllamaClient, ServerUnavailable
from wiki_embeddings.settings import LOCAL_SERVER_MODEL, Settings, mask_url

#: `local` (default) or `production`. In production every connection comes from the environment: the embedded
#: PostgreSQL is never started, and a missing DATABASE_URL / DAGSTER_PG_URL is an error that names it.
DEPLOYMENT_ENV = "WIKI_EMBED_DEPLOYMENT"
DAGSTER_PG_URL_ENV = "DAGSTER_PG_URL"


def deployment() -> str:
    value = os.environ.get(DEPLOYMENT_ENV, "").strip().lower() or "local"
    if value not in ("local", "production"):
        raise ValueError(f"{DEPLOYMENT_ENV} must be 'local' or 'production', got {value!r}")
    return value


def embedded_allowed() -> tuple[bool, str]:
    """May the embedded PostgreSQL stand in for an unset URL? (allowed, why not)."""
    if deployment() == "production":
        return False, f"{DEPLOYMENT_ENV}=production takes every connection from the environment"
    import importlib.util

    if importlib.util.find_spec("pgserver") is None:
        return False, "the embedded PostgreSQL needs the `local` extra (pip install -e '.[local]')"
    return True, ""


def missing_connection(var: str, what: str, why: str) -> RuntimeError:
    return RuntimeError(f"{var} is not set: it must name {what} ({why})")


def database_url(settings: Settings) -> str:
    """DATABASE_URL when set; otherwise, locally, the embedded PostgreSQL (started if needed)."""
    if settings.database_url:
        return settings.database_url
    allowed, why = embedded_allowed()
    if not allowed:
        raise missing_connection("DATABASE_URL", "the database holding the chunk table", why)
    from wiki_embeddings.devtools import embedded_postgres

    return embedded_postgres.ensure_running()


def answers(url: str, timeout: float = 3.0) -> bool:
    """Does an Ollama-protocol server answer at `url`?"""

    async def probe() -> bool:
        client = OllamaClient([url], "probe", timeout_sec=timeout, retries=0, connect_timeout_sec=timeout)
        try:
            await client.version()
            return True
        except ServerUnavailable:
            return False
        finally:
            await client.aclose()

    return asyncio.run(probe())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def local_ollama(settings: Settings, model: str | None, log: Callable[[str], None] = print) -> Iterator[str | None]:
    """Yield the URL(s) to use: OLLAMA_URL when it answers, else a local service started for this run.

    Yields None when the opt-in is off (the caller uses OLLAMA_URL as it is).
    """
    if not settings.with_ollama:
        yield None
        return
    if all(answers(u) for u in settings.ollama_urls):
        shown = ", ".join(mask_url(u) for u in settings.ollama_urls)
        log(f"OLLAMA_URL {shown} answers; not starting a local embedding service")
        yield None
        return
    proc: subprocess.Popen | None = None
    try:
        ollama_bin = shutil.which("ollama")
        if ollama_bin:
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            env = {**os.environ, "OLLAMA_HOST": f"127.0.0.1:{port}"}
            log(f"starting `ollama serve` on {url}")
            proc = subprocess.Popen(
                [ollama_bin, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            _wait_until_answers(url, proc, 60)
            pull = model or settings.ollama_model
            if pull:
                log(f"pulling model {pull!r} if absent (the first pull may download several GB)")
                subprocess.run([ollama_bin, "pull", pull], env=env, check=True)
        else:
            from wiki_embeddings.devtools.ollama_server import start_subprocess

            log(
                "no `ollama` binary on PATH: starting the project's Ollama-protocol server with the real "
                f"all-MiniLM-L6-v2 model as {LOCAL_SERVER_MODEL!r}"
            )
            proc, url = start_subprocess(port=0, backend="minilm", models=[f"{LOCAL_SERVER_MODEL}:384"])
        log(f"local embedding service ready at {mask_url(url)} (used instead of OLLAMA_URL for this run)")
        yield url
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_until_answers(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the local embedding service exited with code {proc.returncode} before answering")
        if answers(url, timeout=1.0):
            return
        time.sleep(0.3)
    raise RuntimeError(f"the local embedding service at {url} did not answer within {timeout:.0f} s")


# ---------------------------------------------------------------------------- the Dagster UI with a model
def _ui_answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/server_info", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def dagster_ui(argv: list[str] | None = None) -> int:
    """`scripts/dagster_ui.sh`: the UI and the daemon (`dagster dev`) on this project's instance, with a model.

    DAGSTER_HOME, DAGSTER_PG_URL and DATABASE_URL come from the script (scripts/_dagster_env.sh). When OLLAMA_URL
    does not answer, the local embedding service is started first (as OLALA_START_OLLAMA=1 does for the CLI) and
    OLLAMA_URL points the runs at it; it stops with the UI. Prints the URL once the webserver answers. Ctrl-C or
    SIGTERM stops the webserver, the daemon, the code server and the local model server.
    """
    import argparse
    import signal
    import sys

    from wiki_embeddings.settings import from_env

    parser = argparse.ArgumentParser(prog="dagster_ui.sh", description=dagster_ui.__doc__)
    parser.add_argument("--host", default=os.environ.get("DAGSTER_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("DAGSTER_PORT", "3000")))
    parser.add_argument("--workspace", default=str(Path(__file__).resolve().parents[1] / "workspace.yaml"))
    parser.add_argument("--no-model", action="store_true", help="never start a local embedding service")
    args = parser.parse_args(argv)
    root = Path(args.workspace).resolve().parent
    home = Path(os.environ.get("DAGSTER_HOME") or root / ".dagster_home")
    log = lambda m: print(f"dagster_ui: {m}", file=sys.stderr, flush=True)  # noqa: E731
    # dagster dev runs in DAGSTER_HOME (else it warns that ./dagster.yaml "will not be used": it is, as the copy
    # there); relative paths the definitions read by default are pinned to the repo root instead.
    os.environ.setdefault("WIKI_EMBEDDINGS_ENV_FILE", str(root / ".env.beta"))

    settings = from_env(with_ollama=not args.no_model)
    with local_ollama(settings, settings.ollama_model or LOCAL_SERVER_MODEL, log=log) as local_url:
        if local_url:
            os.environ["OLLAMA_URL"] = local_url
            os.environ.setdefault("OLLAMA_MODEL", LOCAL_SERVER_MODEL)
        url = f"http://{args.host}:{args.port}"
        cmd = [str(Path(sys.executable).parent / "dagster"), "dev", "-w", args.workspace, "-h", args.host]
        cmd += ["-p", str(args.port)]
        proc = subprocess.Popen(cmd, cwd=home, start_new_session=True)
        stopping = False

        def stop(signum: int, _frame: object) -> None:
            nonlocal stopping
            stopping = True
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # dagster dev shuts its webserver, daemon and code server down

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        announced = False
        while proc.poll() is None:
            if not announced and not stopping and _ui_answers(url):
                model = "local embedding service " + mask_url(local_url) if local_url else "OLLAMA_URL"
                print(f"Dagster UI ready: {url}  (DAGSTER_HOME={home}; model: {model})", flush=True)
                announced = True
            time.sleep(1.0)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)  # anything dagster dev left behind in its group
        return 0 if stopping else int(proc.returncode or 0)


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["dagster-ui"]:
        return dagster_ui(argv[1:])
    print("usage: python -m wiki_embeddings.local_services dagster-ui [--host H] [--port P] [--no-model]")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
