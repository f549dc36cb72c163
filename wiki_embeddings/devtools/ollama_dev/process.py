"""Process control: the server in its own process (:func:`start_subprocess`) and its command line (:func:`main`).

``python -m wiki_embeddings.devtools.ollama_server`` (or ``-m wiki_embeddings.devtools.ollama_dev``)
runs :func:`main`; every :class:`~.faults.Faults` field is a flag of its own (``--per-input-ms`` is another
name of ``--per-text-ms``), and ``--ollama-version``, ``--num-ctx``, ``--num-batch``, ``--reload-ms``,
``--crash-status`` choose the Ollama generation (:mod:`~.profiles`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from wiki_embeddings.devtools.ollama_dev.backends import BACKENDS
from wiki_embeddings.devtools.ollama_dev.faults import Faults
from wiki_embeddings.devtools.ollama_dev.models import DEFAULT_NUM_CTX, MINILM_CONTEXT_TOKENS, UNKNOWN_CONTEXT
from wiki_embeddings.devtools.ollama_dev.profiles import (
    DEFAULT_NUM_BATCH,
    DEFAULT_RELOAD_MS,
    GENERATIONS,
    OLLAMA_VERSION,
    Profile,
)
from wiki_embeddings.devtools.ollama_dev.replies import TOO_LONG
from wiki_embeddings.devtools.ollama_dev.server import OllamaServer

ENTRY_MODULE = "wiki_embeddings.devtools.ollama_server"  # what `python -m` runs (operators' and scripts' name)


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def start_subprocess(
    port: int = 0,
    backend: str = "hash",
    models: Sequence[str] | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    *,
    host: str = "127.0.0.1",
    timeout: float = 120.0,
    stdout: Any = subprocess.DEVNULL,
    stderr: Any = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """Run the server as ``python -m`` in a child process and wait until ``/api/version`` answers.

    A separate process lets a test kill the server outright, and lets the CLI start a local "Ollama".
    ``port=0`` picks a free port (retried if another process grabs it first). ``env`` is merged into
    the current environment. Stop it with :func:`stop_subprocess`.
    """
    import httpx

    attempts = 3 if port == 0 else 1
    for attempt in range(attempts):
        chosen = port or _free_port(host)
        cmd = [sys.executable, "-m", ENTRY_MODULE, "--host", host]
        cmd += ["--port", str(chosen), "--backend", backend]
        for model in models or ():
            cmd += ["--model", model]
        cmd += list(extra_args)
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=stdout, stderr=stderr)
        url = f"http://{f'[{host}]' if ':' in host else host}:{chosen}"
        deadline = time.monotonic() + timeout
        with httpx.Client(trust_env=False, timeout=2.0) as client:
            while True:
                if proc.poll() is not None:
                    break
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(url + "/api/version").status_code == 200:
                        return proc, url
                if time.monotonic() > deadline:
                    stop_subprocess(proc)
                    raise TimeoutError(f"ollama devtools server did not answer within {timeout} s: {cmd}")
                time.sleep(0.05)
        if attempt == attempts - 1:
            raise RuntimeError(f"ollama devtools server exited with status {proc.returncode}: {cmd}")
    raise AssertionError("unreachable")


def stop_subprocess(proc: subprocess.Popen[Any], timeout: float = 10.0) -> int:
    """SIGTERM the server process, escalating to SIGKILL after ``timeout``; returns its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


_FAULT_HELP = {
    "silent_truncate": "cut over-context inputs silently in any generation (truncate:false still answers 400)",
    "ignore_truncate": "cut even when truncate is false, wherever the generation or --silent-truncate cuts (a proxy)",
    "down": "every embed request answers 503 (Ollama's busy text)",
    "max_input_tokens": "every model's context in tokens, at runtime",
    "max_input_chars": "an extra context limit in characters",
    "load_ms": "model load time, paid again after keep_alive idle (default 5m) unloaded it",
    "per_text_ms": "service time per input text (--per-input-ms: the same), e.g. 10 for a GPU server",
    "serial_inputs": "evaluate a request's inputs one after another, uncached, as Ollama does (minilm: one "
    "encode per text instead of one batch; hash: the cache is bypassed)",
    "fail_rate": "this share (0-1) of embed requests answers --fail-status, drawn from --fail-seed: reproducible",
    "fail_seed": "the seed of --fail-rate (the same seed fails the same request numbers)",
    "fail_status": "the status of --fail-every-n and --fail-rate",
    "endless_body": "/api/embed answers 200 with a chunked body that never ends",
    "oversize_body_mb": "/api/embed answers are padded to this many MiB",
    "nan_marker": "inputs holding TEXT get a 500 'json: unsupported value: NaN', as real Ollama",
    "nan_json_marker": "inputs holding TEXT get a NaN literal inside a 200 answer",
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {ENTRY_MODULE}",
        description=(
            "Ollama-protocol embedding server for tests, the demo and benchmarks. By default it behaves like "
            f"current Ollama ({OLLAMA_VERSION}): context counted in tokens per model, and /api/embed answers 400 "
            f"'{TOO_LONG}' for any input over it, whatever 'truncate' says; a NaN in a vector is a 500. "
            "--ollama-version picks another generation's rules for long input; --silent-truncate cuts over-long "
            "inputs silently to the context (prompt_eval_count at the limit; truncate:false still answers 400)."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434, help="0 picks a free port (default 11434)")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="hash",
        help="hash: deterministic vectors, tokens estimated; minilm: the real all-MiniLM-L6-v2 and its tokenizer",
    )
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME[:DIM]",
        help="model to serve, repeatable (hash default: all-minilm:384 nomic-embed-text:768)",
    )
    parser.add_argument(
        "--context-tokens",
        type=int,
        metavar="N",
        help="every model's context in tokens, instead of the known models' context_length/num_ctx "
        f"(unknown models: {UNKNOWN_CONTEXT}; the minilm backend caps it at {MINILM_CONTEXT_TOKENS})",
    )
    parser.add_argument("--context-chars", type=int, metavar="N", help="an extra context limit in characters")
    gen = parser.add_argument_group("Ollama generation (long input; see the profiles module)")
    gen.add_argument(
        "--ollama-version",
        default="0.20",
        metavar="VERSION",
        help=f"one of {', '.join(GENERATIONS)} or a full version (0.13.4: before 0.13.5); default 0.20. 0.12: cut "
        "silently at num_ctx (truncate:false: 400); 0.20: 400 over num_ctx whatever truncate says; 0.30: cut "
        "silently at num_batch whatever truncate says; 0.31-crash: an input over num_batch within num_ctx "
        "crashes the runner (an error naming EOF, then a model reload); /api/version reports the version",
    )
    gen.add_argument(
        "--num-ctx",
        type=int,
        default=DEFAULT_NUM_CTX,
        metavar="N",
        help="default num_ctx (OLLAMA_CONTEXT_LENGTH) for models whose Modelfile sets none "
        f"(default {DEFAULT_NUM_CTX})",
    )
    gen.add_argument(
        "--num-batch",
        type=int,
        default=DEFAULT_NUM_BATCH,
        metavar="N",
        help="default physical batch num_batch, 0.30+ (a request's options.num_batch wins; "
        f"default {DEFAULT_NUM_BATCH})",
    )
    gen.add_argument(
        "--reload-ms",
        type=float,
        default=DEFAULT_RELOAD_MS,
        metavar="MS",
        help=f"0.31-crash: the model reload after a crash; requests wait for it (default {DEFAULT_RELOAD_MS:g})",
    )
    gen.add_argument(
        "--crash-status",
        type=int,
        default=400,
        metavar="N",
        help="0.31-crash: the status of a crash on /api/embed and /v1/embeddings (default 400, as 0.30/0.31's "
        "handler answers; 500 as older runners did)",
    )
    parser.add_argument("--cache-entries", type=int, default=200_000, help="vector cache entries (default 200000)")
    parser.add_argument("--cache-mb", type=int, default=512, help="vector cache size bound (MiB, default 512)")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    group = parser.add_argument_group("faults (see Faults; also settable at runtime: POST /_control/faults)")
    hints = typing.get_type_hints(Faults)
    for field in dataclasses.fields(Faults):
        flag = "--" + field.name.replace("_", "-")
        base = next(a for a in (typing.get_args(hints[field.name]) or (hints[field.name],)) if a is not type(None))
        what = _FAULT_HELP.get(field.name)
        flags = [flag, "--per-input-ms"] if field.name == "per_text_ms" else [flag]
        if base is bool:
            group.add_argument(*flags, dest=field.name, action="store_true", default=None, help=what)
        else:
            metavar = "MS" if field.name.endswith("_ms") else {int: "N", float: "X", str: "TEXT"}[base]
            what = f"{what} (default {field.default})" if what else f"default {field.default}"
            group.add_argument(*flags, dest=field.name, type=base, default=None, metavar=metavar, help=what)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Serve in the foreground; prints ``listening on URL`` when ready, stops on SIGTERM/SIGINT."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    fault_args = {f.name: getattr(args, f.name) for f in dataclasses.fields(Faults)}
    try:
        faults = Faults(**{k: v for k, v in fault_args.items() if v is not None})
        profile = Profile.of(
            args.ollama_version,
            num_ctx=args.num_ctx,
            num_batch=args.num_batch,
            reload_ms=args.reload_ms,
            crash_status=args.crash_status,
        )
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = OllamaServer(
        args.host,
        args.port,
        args.backend,
        args.models,
        faults,
        context_tokens=args.context_tokens,
        context_chars=args.context_chars,
        cache_entries=args.cache_entries,
        cache_mb=args.cache_mb,
        verbose=args.verbose,
        profile=profile,
    )
    server.start()
    try:
        print(f"listening on {server.url}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    return 0
