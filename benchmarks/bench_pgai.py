"""pgai's vectorizer worker (PyPI `pgai`) as a second baseline, on the same server and texts.

pgai is not a dependency of the project: it goes into a throwaway virtual environment of the benchmark
(`$WIKI_BENCH_PGAI_VENV`, default /tmp/wiki-bench-pgai-venv), installed with pip once and reused. Its
vectorizer library installs into the database with `pgai.install(url)` (no `ai` extension needed since
pgai 0.10) and writes into a column of the source table (`ai.destination_column`, `ai.chunking_none`).
When any of this cannot be done, `measure` returns the reason instead of a figure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.common import DIM, MODEL, Bench, log

PGAI_REQUIREMENT = "pgai[vectorizer-worker]==0.12.1"
VENV = Path(os.environ.get("WIKI_BENCH_PGAI_VENV", "/tmp/wiki-bench-pgai-venv"))
DATABASE = "bench_pgai"


def _venv_ready() -> bool:
    py = VENV / "bin" / "python"
    if not py.exists() or not (VENV / "bin" / "pgai").exists():
        return False
    probe = subprocess.run([str(py), "-c", "import pgai, ollama"], capture_output=True, timeout=120)
    return probe.returncode == 0


def ensure_pgai() -> str | None:
    """Install pgai into the throwaway venv when needed; None when ready, else the reason it is not."""
    if _venv_ready():
        return None
    log(f"  pgai: installing {PGAI_REQUIREMENT} into {VENV} (once)")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True, capture_output=True)
        pip = subprocess.run(
            [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", PGAI_REQUIREMENT],
            capture_output=True,
            text=True,
            timeout=900,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"could not create the pgai venv: {exc}"
    if pip.returncode != 0:
        tail = (pip.stderr or pip.stdout).strip().splitlines()[-1:] or ["?"]
        return f"pip install {PGAI_REQUIREMENT} failed: {tail[0][:200]}"
    return None if _venv_ready() else "pgai installed but `import pgai, ollama` fails"


def _exited(pid: int) -> bool:
    """Has the child exited? (without reaping it, so os.wait4 can still read its resource usage)"""
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info is not None


def _db_url(bench: Bench) -> str:
    with bench.connect() as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone():
            conn.execute(f"CREATE DATABASE {DATABASE}")
    return bench.url.replace("/bench?", f"/{DATABASE}?")


def measure(bench: Bench, ollama_url: str, texts: Sequence[str], concurrency: int = 1) -> dict[str, Any] | str:
    """pgai worker chunks/s (steady state: from its first committed batch to its last), or why not measurable."""
    reason = ensure_pgai()
    if reason:
        return reason
    url = _db_url(bench)
    py = str(VENV / "bin" / "python")
    inst = subprocess.run(
        [py, "-c", "import sys, pgai; pgai.install(sys.argv[1])", url], capture_output=True, text=True
    )
    if inst.returncode != 0:
        return f"pgai.install failed: {inst.stderr.strip().splitlines()[-1][:200]}"
    n = len(texts)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS public.pgai_chunks CASCADE")
        conn.execute("DELETE FROM ai.vectorizer")  # earlier runs of this data dir; harmless when empty
        conn.execute("CREATE TABLE public.pgai_chunks (id bigint PRIMARY KEY, content text NOT NULL)")
        with conn.cursor() as cur, cur.copy("COPY public.pgai_chunks (id, content) FROM STDIN") as copy:
            for i, text in enumerate(texts, start=1):
                copy.write_row((i, text))
        conn.execute("VACUUM ANALYZE public.pgai_chunks")
        conn.execute(
            "SELECT ai.create_vectorizer('public.pgai_chunks'::regclass,"
            " loading => ai.loading_column('content'),"
            " destination => ai.destination_column('embedding'),"
            " chunking => ai.chunking_none(),"
            " embedding => ai.embedding_ollama(%s, %s, base_url => %s),"
            " formatting => ai.formatting_python_template('$chunk'),"
            " scheduling => ai.scheduling_none(),"
            " indexing => ai.indexing_none(),"
            " processing => ai.processing_default(batch_size => 64, concurrency => %s))",
            (MODEL, DIM, ollama_url, concurrency),
        )
        cmd = [str(VENV / "bin" / "pgai"), "vectorizer", "worker", "-d", url, "--once", "-c", str(concurrency)]
        cmd += ["--log-level", "WARN"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        first: tuple[float, int] | None = None
        last: tuple[float, int] = (time.perf_counter(), 0)
        deadline = time.monotonic() + 600
        while True:
            count = conn.execute("SELECT count(embedding) FROM public.pgai_chunks").fetchone()[0]  # type: ignore[index]
            now = time.perf_counter()
            if count and first is None:
                first = (now, count)
            if count != last[1]:
                last = (now, count)
            if count >= n or _exited(proc.pid) or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        _, status, usage = os.wait4(proc.pid, 0)
        output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        proc.returncode = os.waitstatus_to_exitcode(status)
        count = conn.execute("SELECT count(embedding) FROM public.pgai_chunks").fetchone()[0]  # type: ignore[index]
    if count < n or first is None:
        return f"pgai worker embedded {count}/{n} (exit {proc.returncode}): {output.strip()[-300:]}"
    steady = (last[1] - first[1]) / (last[0] - first[0]) if last[0] > first[0] else 0.0
    cpu = (usage.ru_utime + usage.ru_stime) / n * 1000
    log(f"  pgai worker: {steady:.0f} chunks/s steady, worker CPU {cpu:.3f} s/1000 chunks (incl. start-up)")
    return {
        "chunks_per_s": steady,
        "cpu_per_1k": cpu,
        "note": f"pgai {PGAI_REQUIREMENT.split('==')[1]}; worker process CPU {cpu:.2f} s/1k chunks incl. start-up",
    }
