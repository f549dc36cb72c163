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

from wiki_embeddings.core.client import OllamaClient, ServerUnavailable
from wiki_embeddings.settings import LOCAL_SERVER_MODEL, Settings, mask_url


def database_url(settings: Settings) -> str:
    """DATABASE_URL when set; otherwise the embedded PostgreSQL (started if needed)."""
    if settings.database_url:
        return settings.database_url
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
        log(f"OLLAMA_URL {settings.ollama_url} answers; not starting a local embedding service")
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
