"""Does a model server answer at all? One quick GET, for choosing which free server a run leases (core/spread.py).

Not a health verdict (the run's pool judges that from real requests, core/health.py): only "something speaks HTTP
there". Any answer below 500 counts, a 401/403 of a server that wants a key included; a refused connection, a
timeout or a 5xx does not. Ollama: GET /api/version. OpenAI-compatible: GET <base>/models (`/v1/models` for a bare
host:port, as the client sends its requests), else /health (TEI, llama.cpp's server, infinity-emb).
"""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx

PROBE_TIMEOUT_SEC = 2.0  # a black-holed server costs this much once per lease attempt


def probe_paths(url: str, api: str) -> list[str]:
    """The paths asked, in turn, until one answers below 500."""
    if api == "openai":
        base = "/v1" if not urlsplit(url).path.strip("/") else ""
        return [f"{base}/models", "/health"]
    return ["/api/version"]


def answers(url: str, api: str = "ollama", timeout_sec: float = PROBE_TIMEOUT_SEC) -> bool:
    """Whether the server at `url` answers HTTP (a status below 500) within `timeout_sec`; never raises."""
    root = url.rstrip("/")
    try:
        with httpx.Client(timeout=timeout_sec, trust_env=False, verify=root.startswith("https://")) as http:
            return any(http.get(f"{root}{path}").status_code < 500 for path in probe_paths(root, api))
    except (httpx.HTTPError, OSError, ValueError):
        return False
