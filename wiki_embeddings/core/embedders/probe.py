"""Does a model server answer? For choosing which free server a run leases (core/spread.py).

Not a health verdict (the run's pool judges that from real requests, core/health.py). First one quick GET:
"something speaks HTTP there" — any answer below 500 counts, a 401/403 of a server that wants a key included; a
refused connection, a timeout or a 5xx does not. Ollama: GET /api/version. OpenAI-compatible: GET <base>/models
(`/v1/models` for a bare host:port, as the client sends its requests), else /health (TEI, llama.cpp's server,
infinity-emb). Then, when the model is known, one short text embedded: a server whose API answers but whose embeds
fail (a broken runner, a full GPU: an error status or an unusable vector) does not count; a slow answer does (a
model loading: the run's first request waits for it under its load allowance).
"""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx

from wiki_embeddings.core.embedders.base import EmbedFailure, validate_vectors

PROBE_TIMEOUT_SEC = 2.0  # a black-holed server costs this much once per lease attempt
EMBED_PROBE_TIMEOUT_SEC = 3.0  # longer than a warm embed of one word; a model loading answers later (counted yes)
EMBED_PROBE_TEXT = "ping"


def _v1(url: str) -> str:
    """The OpenAI API's prefix on this URL: `/v1` for a bare host:port (as the client sends), none under a path."""
    return "/v1" if not urlsplit(url).path.strip("/") else ""


def probe_paths(url: str, api: str) -> list[str]:
    """The paths asked, in turn, until one answers below 500."""
    if api == "openai":
        return [f"{_v1(url)}/models", "/health"]
    return ["/api/version"]


def answers(
    url: str,
    api: str = "ollama",
    timeout_sec: float = PROBE_TIMEOUT_SEC,
    *,
    model: str | None = None,
    api_key: str | None = None,
) -> bool:
    """Whether the server at `url` answers HTTP (a status below 500) within `timeout_sec` and, given `model`, embeds
    a short text (or is still busy with it after EMBED_PROBE_TIMEOUT_SEC); never raises."""
    root = url.rstrip("/")
    try:
        with httpx.Client(timeout=timeout_sec, trust_env=False, verify=root.startswith("https://")) as http:
            if not any(http.get(f"{root}{path}").status_code < 500 for path in probe_paths(root, api)):
                return False
            return model is None or _embeds(http, root, api, model, api_key)
    except (httpx.HTTPError, OSError, ValueError):
        return False


def _embeds(http: httpx.Client, root: str, api: str, model: str, api_key: str | None) -> bool:
    if api == "openai":
        path, body = f"{_v1(root)}/embeddings", {"model": model, "input": [EMBED_PROBE_TEXT]}
    else:
        path, body = "/api/embed", {"model": model, "input": [EMBED_PROBE_TEXT]}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        reply = http.post(f"{root}{path}", json=body, headers=headers, timeout=EMBED_PROBE_TIMEOUT_SEC)
        if reply.status_code == 404 and api == "openai" and path == "/v1/embeddings":
            # No /v1 on a bare host:port: the API at the root (infinity-emb's default), as the client falls back.
            reply = http.post(f"{root}/embeddings", json=body, headers=headers, timeout=EMBED_PROBE_TIMEOUT_SEC)
    except httpx.TimeoutException:
        return True  # a model loading (or a long queue): the run's first request waits for it
    if reply.status_code >= 400:
        return False
    try:
        data = reply.json()
        validate_vectors([data["data"][0]["embedding"] if api == "openai" else data["embeddings"][0]], 1, None, None)
    except (ValueError, KeyError, IndexError, TypeError, EmbedFailure):
        return False
    return True
